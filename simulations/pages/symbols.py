"""The sympy symbols the report's pages share in their equations (study and experiment pages alike)."""

from __future__ import annotations

import sympy as sp

r, t, M, K, L, n = sp.symbols("r t M K L n", positive=True)
j, k, s, m, N = sp.symbols("j k s m N", integer=True, positive=True)
p = sp.IndexedBase("p")
w = sp.IndexedBase("w")
c = sp.IndexedBase("c")
v = sp.IndexedBase("v")
beta = sp.IndexedBase("beta")
alpha = sp.IndexedBase("alpha")
gamma = sp.Symbol("gamma", positive=True)
