"""The equations each study and experiment page states, as sympy expressions rendered to MathML.

These are the *definitions* a page measures (what is estimated, compared or plotted); the
derivations that prove the claims live in :mod:`theory.derivations` and on ``theory.html``.
Expressions are built with sympy here and printed by :func:`reports.html.expression_record`,
so every page's mathematics comes from sympy, never from hand-written markup.
"""

from __future__ import annotations

import sympy as sp

from reports.html import expression_record

# symbols shared by the pages
r, t, M, K, L, n = sp.symbols("r t M K L n", positive=True)
j, k, s, m, N = sp.symbols("j k s m N", integer=True, positive=True)
p = sp.IndexedBase("p")
w = sp.IndexedBase("w")
c = sp.IndexedBase("c")
v = sp.IndexedBase("v")
beta = sp.IndexedBase("beta")
alpha = sp.IndexedBase("alpha")
gamma = sp.Symbol("gamma", positive=True)


def _expected_weight():
    return sp.Eq(sp.Symbol("E[w_j]"), c[j] * p[j])


def _integral_coefficient():
    others = sp.Product(r + (1 - r) * sp.exp(-t * p[k]), (k, 1, N)) / (r + (1 - r) * sp.exp(-t * p[j]))
    return sp.Eq(c[j], (1 - r) * sp.Integral(sp.exp(-t * p[j]) * others, (t, 0, sp.oo)))


def _paired_difference():
    d = sp.IndexedBase("d")
    mean = sp.Sum(d[s], (s, 1, n)) / n
    return [
        ("paired difference over seeds", sp.Eq(sp.Symbol("Delta"), mean)),
        ("its standard error", sp.Eq(sp.Symbol("SE"), sp.sqrt(sp.Sum((d[s] - sp.Symbol("Delta")) ** 2, (s, 1, n)) / (n - 1)) / sp.sqrt(n))),
        ("the 95% interval the verdict reads (Student t, n - 1 degrees of freedom)",
         sp.Eq(sp.Symbol("CI"), sp.Symbol("Delta") + sp.Symbol("pm") * sp.Symbol("t_{0.975,n-1}") * sp.Symbol("SE"))),
    ]


def _study_equations() -> dict[str, list[tuple[str, sp.Basic]]]:
    undamped = p[s] / p[sp.Symbol("t_")]
    return {
        "coefficients": [
            ("expected weight (Eq. 3)", _expected_weight()),
            ("smoothing coefficient, integral form", _integral_coefficient()),
            ("Monte-Carlo estimate from M sampled masks",
             sp.Eq(sp.Symbol("hat{c}_j"), sp.Sum(w[j, m], (m, 1, M)) / (M * p[j]))),
        ],
        "gradient_damping": [
            ("beta-gradient of key j under DropKey", sp.Eq(sp.Symbol("dL/dbeta_j"), w[j] * (sp.Sum(w[k] * beta[k], (k, 1, N)) - M))),
            ("undamped ratio", sp.Eq(sp.Symbol("rho_0"), undamped)),
            ("first-order DropKey ratio", sp.Eq(sp.Symbol("rho_1"), c[s] * p[s] / (c[sp.Symbol("t_")] * p[sp.Symbol("t_")]))),
        ],
        "toy_optimisation": [
            ("objective (Eq. 5)", sp.Eq(L, sp.Rational(1, 2) * (sp.Sum(p[j] * beta[j], (j, 1, N)) - M) ** 2
                                        + sp.Rational(1, 2) * sp.Sum(p[j] * alpha[j], (j, 1, N)) ** 2)),
            ("logit-gradient gap (Eq. 11)", sp.Eq(sp.Symbol("dL/dp_s - dL/dp_t"),
                                                  (sp.Sum(p[j] * beta[j], (j, 1, N)) - M) * (beta[s] - beta[sp.Symbol("t_")])
                                                  + sp.Sum(p[j] * alpha[j], (j, 1, N)) * (alpha[s] - alpha[sp.Symbol("t_")]))),
        ],
        "train_test_mismatch": [
            ("training expectation", sp.Eq(sp.Symbol("E_train[o]"), sp.Sum(c[j] * p[j] * v[j], (j, 1, N)))),
            ("plain inference", sp.Eq(sp.Symbol("o_test"), sp.Sum(p[j] * v[j], (j, 1, N)))),
            ("Monte-Carlo inference with K masks", sp.Eq(sp.Symbol("hat{o}_K"), sp.Sum(sp.Indexed("o", k), (k, 1, K)) / K)),
            ("its RMS error", sp.Eq(sp.Symbol("RMS_K"), sp.Symbol("sigma") / sp.sqrt(K))),
        ],
        "toy_regimes": [
            ("exact expected training loss under DropKey (all 2^N masks b, P(b) = r^(N-|b|) (1-r)^|b|)",
             sp.Eq(sp.Symbol("E_b[L]"), sp.Sum(sp.Symbol("P(b)") * sp.Rational(1, 2)
                                                * (sp.Sum(w[j] * v[j], (j, 1, N)) - sp.Symbol("y")) ** 2, (sp.Symbol("b"), 1, 2 ** N)))),
            ("exact expected training loss under post-softmax dropout",
             sp.Eq(sp.Symbol("E_b[L_dropout]"), sp.Rational(1, 2) * (sp.Sum(p[j] * v[j], (j, 1, N)) - sp.Symbol("y")) ** 2
                   + r / (2 * (1 - r)) * sp.Sum(p[j] ** 2 * v[j] ** 2, (j, 1, N)))),
        ],
        "structured_masks": [
            ("effective coefficient", sp.Eq(sp.Symbol("c^eff_j"), sp.Symbol("E[w_j]") / p[j])),
            ("seed-rate calibration", sp.Eq(sp.Sum(1 - (1 - gamma) ** sp.Indexed("C", j), (j, 1, N)) / N, r)),
            ("total-variation distance", sp.Eq(sp.Symbol("TV(a, b)"), sp.Rational(1, 2) * sp.Sum(sp.Abs(sp.Indexed("a", j) - sp.Indexed("b", j)), (j, 1, N)))),
        ],
    }


def _experiment_equations() -> dict[str, list[tuple[str, sp.Basic]]]:
    i, h, q_, T = sp.symbols("i h q T", integer=True, positive=True)
    A = sp.IndexedBase("A")
    entropy = ("attention entropy of row i", sp.Eq(sp.Symbol("H_i"), -sp.Sum(w[i, j] * sp.log(w[i, j]), (j, 1, N))))
    peak = ("peak weight of row i", sp.Eq(sp.Symbol("peak_i"), sp.Function("max_j")(w[i, j])))
    g = sp.IndexedBase("g")  # g_ij = dL/ds_ij, the gradient on logit s_ij
    top = sp.Symbol("j^*")
    accuracy = _paired_difference()
    ratio = sp.Symbol("r_bar")
    spread = sp.Symbol("Delta_r")
    layer = sp.Symbol("l", integer=True, nonnegative=True)
    cosine = sp.Sum(A[h, i, T] * sp.Indexed("B", h, i, T), (i, 1, N)) / (
        sp.sqrt(sp.Sum(A[h, i, T] ** 2, (i, 1, N))) * sp.sqrt(sp.Sum(sp.Indexed("B", h, i, T) ** 2, (i, 1, N))))
    a_c = A[h, i, T] - sp.Sum(A[h, q_, T], (q_, 1, N)) / N
    b_c = sp.Indexed("B", h, i, T) - sp.Sum(sp.Indexed("B", h, q_, T), (q_, 1, N)) / N
    centred = sp.Sum(a_c * b_c, (i, 1, N)) / (sp.sqrt(sp.Sum(a_c**2, (i, 1, N))) * sp.sqrt(sp.Sum(b_c**2, (i, 1, N))))
    return {
        "attention_dynamics": [entropy, peak,
                               ("gradient ratio: g_ij = dL/ds_ij, j* the most-attended key",
                                sp.Eq(sp.Symbol("G_i"), (N - 1) * sp.Abs(g[i, top])
                                      / (sp.Sum(sp.Abs(g[i, j]), (j, 1, N)) - sp.Abs(g[i, top])))),
                               *accuracy],
        "accuracy": accuracy,
        "schedules": [("linear decreasing schedule over blocks l = 0..D-1",
                       sp.Eq(sp.Symbol("r_l"), ratio + spread / 2 - spread * layer / (sp.Symbol("D") - 1))), *accuracy],
        "alignment": [("Monte-Carlo inference: mean of K masked passes' probabilities",
                       sp.Eq(sp.Symbol("hat{P}_K(y|x)"), sp.Sum(sp.Indexed("softmax(f(x; b_k))", k), (k, 1, K)) / K)),
                      *accuracy],
        "structured": accuracy,
        "collapse": [("DeepViT cross-layer similarity of column T, head h (blocks p and q: maps A, B)",
                      sp.Eq(sp.Symbol("M^{p,q}_{h,T}"), cosine)),
                     ("centred similarity: the same with each column centred on its mean over queries",
                      sp.Eq(sp.Symbol("rho^{p,q}_{h,T}"), centred)),
                     *accuracy],
    }


def page_equations(page: str) -> list[dict[str, str]]:
    """MathML records (name, text, mathml) of the page's equations: a study name or ``vit_<experiment>``."""
    table = _study_equations()
    table.update({f"vit_{name}": items for name, items in _experiment_equations().items()})
    return [expression_record(name, expression) for name, expression in table.get(page, [])]
