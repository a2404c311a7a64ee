"""The equations each study and experiment page states, as sympy expressions rendered to MathML.

These are the *definitions* a page measures (what is estimated, compared or plotted); the
derivations that prove the claims live in :mod:`theory.derivations` and on ``theory.html``.
A study states its own (its page module's ``equations()``, see :mod:`simulations.registry`); the
real-ViT experiments' are built here. All are printed by :func:`reports.html.expression_record`,
so every page's mathematics comes from sympy, never from hand-written markup.
"""

from __future__ import annotations

import sympy as sp

from reports.html import expression_record
from reports.studies import study, study_names
from simulations.pages.symbols import K, N, j, k, n, s, w


def _paired_difference():
    d = sp.IndexedBase("d")
    mean = sp.Sum(d[s], (s, 1, n)) / n
    return [
        ("paired difference over seeds", sp.Eq(sp.Symbol("Delta"), mean)),
        ("its standard error",
         sp.Eq(sp.Symbol("SE"), sp.sqrt(sp.Sum((d[s] - sp.Symbol("Delta")) ** 2, (s, 1, n)) / (n - 1)) / sp.sqrt(n))),
        ("the 95% interval the verdict reads (Student t, n - 1 degrees of freedom)",
         sp.Eq(sp.Symbol("CI"), sp.Symbol("Delta") + sp.Symbol("pm") * sp.Symbol("t_{0.975,n-1}") * sp.Symbol("SE"))),
    ]


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
                      ("the drop-free fine-tune's own learning rate at step t of its T steps (no warmup)",
                       sp.Eq(sp.Symbol("eta_t"), sp.Symbol("eta_ft") * (1 + sp.cos(sp.pi * sp.Symbol("t")
                                                                                     / sp.Symbol("T"))) / 2)),
                      *accuracy],
        "structured": accuracy,
        "drop_ratio": accuracy,
        "gradient_mechanism": [
            ("first-order change of block l's clean peak along one step of the training-set gradient g_R under "
             "regulariser R (M = 1: a plain step; M = Adam's 1/(sqrt(v_hat) + eps): its preconditioned step)",
             sp.Eq(sp.Symbol("Delta P_l"), -sp.Symbol("eta") * sp.Symbol("nabla_theta P_l") * sp.Symbol("M")
                   * sp.Symbol("g_R"))),
            ("the paired difference of one mask pass k (the replicates; g_none is exact)",
             sp.Eq(sp.Indexed("d", k), sp.Indexed("Delta P_l^{DropKey}", k) - sp.Symbol("Delta P_l^{none}"))),
            ("expected logit gradient of row i's most-attended key against the others (Eq. 11's counterpart)",
             sp.Eq(sp.Symbol("log G_i"), sp.log((N - 1) * sp.Abs(sp.Indexed("E[g]", i, top))
                                                 / (sp.Sum(sp.Abs(sp.Indexed("E[g]", i, j)), (j, 1, N))
                                                    - sp.Abs(sp.Indexed("E[g]", i, top)))))),
            *accuracy[1:]],
        "collapse": [("DeepViT cross-layer similarity of column T, head h (blocks p and q: maps A, B)",
                      sp.Eq(sp.Symbol("M^{p,q}_{h,T}"), cosine)),
                     ("centred similarity: the same with each column centred on its mean over queries",
                      sp.Eq(sp.Symbol("rho^{p,q}_{h,T}"), centred)),
                     *accuracy],
    }


def page_equations(page: str) -> list[dict[str, str]]:
    """MathML records (name, text, mathml) of the page's equations: a study name or ``vit_<experiment>``.

    A study's equations come from its :class:`simulations.registry.Study`; an experiment's are listed here.
    """
    if page in study_names():
        items = study(page).equations()
    else:
        items = {f"vit_{name}": items for name, items in _experiment_equations().items()}.get(page, [])
    return [expression_record(name, expression) for name, expression in items]
