"""The contract every attention backend and every registered regulariser must pass.

Backends of :func:`dropkey.functional.dropkey_attention` (reference, sdpa, fused, cpp where the
kernel builds, triton under its interpreter where triton is installed):

- shapes and dtypes: (..., Nq, dv) in the inputs' dtype;
- eval mode and r = 0 are exactly :func:`~dropkey.functional.plain_attention` of that backend;
- on the same (hash) mask every backend computes the reference's output and gradients;
- gradients flow (finite, non-zero) to q, k and v;
- in training, E[w] is theory.expected_attention(p, r, all_dropped) within 5 standard errors
  (fixed seeds; SE from theory.attention_variance), for every all-dropped convention.

Regularisers (:func:`dropkey.regularisers.names`, through :class:`~dropkey.modules.DropKeyAttention`):

- shapes and dtypes; eval mode and r = 0 are exactly plain attention;
- the fast path equals the reference path (the regulariser's ``weights``) on the same mask;
- the reference weights are a distribution per row where the regulariser renormalises;
- gradients flow to the parameters;
- in training, E[w] matches the theory where an exact one exists within 5 standard errors
  (DropKey, DropAttention: theory.expected_attention; dropout, none: the softmax; DropKey-Block
  and -Cross: an exact enumeration of their masks on a small grid), on both paths.

NaN inputs are not part of the contract yet. The triton statistics are slow under the interpreter
(marked slow).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from stat_assertions import assert_within_standard_errors, sample_mean_and_standard_error

import theory
from dropkey import functional as fn
from dropkey import masks, regularisers
from dropkey.kernels import cpp_available, triton_available
from dropkey.modules import DropKeyAttention
from theory.conventions import renormalise_kept

CONVENTIONS = fn.ALL_DROPPED_CONVENTIONS
DIM, HEADS, GRID = 16, 2, (2, 3)
TOKENS = 1 + GRID[0] * GRID[1]


def _backends() -> list:
    found = ["reference", "sdpa", "fused"]
    found.append("cpp" if cpp_available() else pytest.param("cpp", marks=pytest.mark.skip(reason="no C++ kernel")))
    found.append(triton_available() and "triton" or pytest.param("triton", marks=pytest.mark.skip(reason="no triton")))
    return found


BACKENDS = _backends()
# The dtypes each backend runs (cpp: float32 only; triton: no float64).
DTYPES = {"cpp": (torch.float32,), "triton": (torch.float32, torch.bfloat16)}
DEFAULT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _qkv(dtype=torch.float32, lead=(2, 3), nq=5, nk=7, d=8, dv=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*lead, n, size, generator=g).to(dtype) for n, size in ((nq, d), (nk, d), (nk, dv))]
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_shapes_dtypes_and_plain_attention_in_eval_and_at_zero_ratio(backend):
    for dtype in DTYPES.get(backend, DEFAULT_DTYPES):
        q, k, v = _qkv(dtype, dv=4 if backend != "triton" else 8)
        out = fn.dropkey_attention(q, k, v, 0.3, generator=1, backend=backend)
        assert out.shape == (2, 3, 5, v.shape[-1]) and out.dtype == dtype
        assert torch.isfinite(out).all()
        plain = fn.plain_attention(q, k, v, backend=backend)
        assert torch.equal(fn.dropkey_attention(q, k, v, 0.3, training=False, backend=backend), plain)
        assert torch.equal(fn.dropkey_attention(q, k, v, 0.0, backend=backend), plain)
        assert not torch.equal(out, plain)  # the regulariser acts in training


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_the_reference_on_the_same_mask_values_and_gradients(backend, convention):
    """r = 0.6 over 7 keys: some rows are all dropped, so the convention is exercised."""
    q, k, v = _qkv(torch.float32, lead=(4, 3), requires_grad=True)
    out = fn.dropkey_attention(q, k, v, 0.6, all_dropped=convention, generator=5, backend=backend, mask="hash")
    ref = fn.dropkey_attention(q, k, v, 0.6, all_dropped=convention, generator=5, backend="reference", mask="hash")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all() and got.abs().sum() > 0  # gradients flow
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _sampled_weights(backend: str, convention: str, n: int, r: float, samples: int, seed: int):
    """(p (nq, n), w (samples, nq, n)): rows of the output with V = identity."""
    dtype = torch.float32 if backend in ("cpp", "triton") else torch.float64
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 3, 4, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(1, n, 4, generator=g, dtype=torch.float64) * 1.5
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)[0].numpy()
    q, k, v = q.to(dtype), k.to(dtype), torch.eye(n, dtype=dtype).unsqueeze(0)
    qs, ks, vs = (t.expand(samples, *t.shape[1:]) for t in (q, k, v))
    w = fn.dropkey_attention(qs, ks, vs, r, all_dropped=convention, generator=seed, backend=backend)
    return p, w.double().numpy()


def _assert_backend_matches_theory(backend: str, convention: str, samples: int) -> None:
    n, r = 4, 0.5  # all-dropped rows have probability 1/16: the conventions differ by many SE
    p, w = _sampled_weights(backend, convention, n, r, samples, seed=17)
    se = np.sqrt(theory.attention_variance(p, r, all_dropped=convention) / samples)
    rounding = 1e-6 if backend in ("cpp", "triton") else 1e-9  # float32 weights
    expected = theory.expected_attention(p, r, all_dropped=convention)
    assert_within_standard_errors(w.mean(axis=0), expected, se, atol=rounding, what=f"E[w] ({backend}, {convention})")


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_backend_expected_weights_match_the_theory(backend, convention):
    _assert_backend_matches_theory(backend, convention, samples=6000)


@pytest.mark.slow
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_expected_weights_match_the_theory(convention):
    _assert_backend_matches_theory("triton", convention, samples=2000)


# --------------------------------------------------------------------------- regularisers


def _regulariser(name: str, **settings) -> regularisers.Regulariser:
    cls = regularisers.get(name)
    if cls.needs_grid:
        settings = {"grid": GRID, "num_prefix_tokens": 1} | settings
    return regularisers.create(name, **settings)


def _pair(name: str, ratio: float, dtype=torch.float64, **settings) -> tuple[DropKeyAttention, DropKeyAttention]:
    """(module with the regulariser, plain module with the same weights)."""
    ratio = ratio if regularisers.get(name).has_rate else 0.0
    torch.manual_seed(0)
    module = DropKeyAttention(DIM, HEADS, variant=_regulariser(name, **settings), drop_ratio=ratio, qkv_bias=True,
                              dtype=dtype)
    plain = DropKeyAttention(DIM, HEADS, variant="none", qkv_bias=True, dtype=dtype)
    plain.load_state_dict(module.state_dict())
    return module, plain


def _tokens(batch: int = 3, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TOKENS, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def check_regulariser_contract(name: str, **settings) -> None:
    """The non-statistical contract of a registered regulariser (also run on docs/extending.md's example)."""
    for dtype in (torch.float32, torch.float64):
        module, plain = _pair(name, 0.5, dtype, **settings)
        x = _tokens(dtype=dtype)
        out = module.train()(x)
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
        # eval mode and r = 0 are plain attention, bit for bit
        assert torch.equal(module.eval()(x), plain.eval()(x))
        module.set_drop_ratio(0.0)
        assert torch.equal(module.train()(x), plain.train()(x))
    # the fast path equals the reference path (the regulariser's weights) on the same mask
    module, _ = _pair(name, 0.5, torch.float64, **settings)
    module.train()
    results = []
    for fused in (True, False):
        module.fused_attn = fused
        module.set_generator(7)
        results.append(module(x.double()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    # the reference weights: rows sum to 1 unless the regulariser rescales instead of renormalising
    module.set_generator(7)
    _, weights = module(x.double(), return_weights=True)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    if not module.regulariser.rescales:
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), rtol=0, atol=1e-12)
    # gradients flow to every parameter
    module.zero_grad()
    module(x.double()).pow(2).sum().backward()
    for param_name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", regularisers.names())
def test_regulariser_contract(name):
    check_regulariser_contract(name)


# --------------------------------------------------------------------------- regularisers: E[w] vs theory
#
# The module's mean weights over M draws (V = identity: each output row is a weight row) against the
# exact expectation, within 5 SE (sample SD / sqrt(M)) plus 1e-6 for float rounding. DropKey and
# DropAttention: theory.expected_attention (DropAttention shares one mask across the queries of a
# (batch, head), but each single row still sees independent Bernoulli key drops); dropout: the
# softmax; none: exact. r = 0.5 with 4 keys makes all-dropped rows common (1/16), so the conventions
# differ by several SE and are really tested.
#
# DropKey-Block / -Cross, by enumeration: on a 2 x 3 patch grid plus a class token (Nk = 7) every
# mask is one of 2^6 seed patterns (each patch position a seed independently with the calibrated
# rate gamma = masks.calibrated_seed_rate) times 2 class-token states (dropped independently w.p.
# r). Summing the masked-softmax weights of each pattern times its probability gives E[w] exactly;
# the footprints are written out here from their definitions, independently of dropkey.masks.

SAMPLES, KEYS, HEAD_DIM = 20_000, 4, 8
STRUCT_CASES = {  # name -> (variant, footprint size setting, size)
    "block_side3": ("dropkey_block", "block_side", 3),
    "block_side2": ("dropkey_block", "block_side", 2),
    "cross_arm1": ("dropkey_cross", "cross_arm", 1),
}


def _module_weights(variant: str, r: float, convention: str, *, fused: bool, keys: int = KEYS, qk_seed: int = 3,
                    mask_seed: int = 11, **settings) -> tuple[torch.Tensor, np.ndarray]:
    """(SAMPLES, 2, keys, keys) weight rows of a module (V = identity) and the softmax rows p (2 keys, keys)."""
    regulariser = _regulariser(variant, all_dropped=convention, **settings)
    ratio = r if regulariser.has_rate else 0.0
    module = DropKeyAttention(2 * HEAD_DIM, 2, variant=regulariser, drop_ratio=ratio, fused_attn=fused,
                              generator=mask_seed).train()
    g = torch.Generator().manual_seed(qk_seed)
    q = 1.5 * torch.randn(1, 2, keys, HEAD_DIM, generator=g, dtype=torch.float64)
    k = 1.5 * torch.randn(1, 2, keys, HEAD_DIM, generator=g, dtype=torch.float64)
    p = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(-1).reshape(-1, keys).numpy()
    v = torch.eye(keys, dtype=torch.float64).expand(SAMPLES, 2, keys, keys)
    out, _ = module.attend(q.expand(SAMPLES, -1, -1, -1), k.expand(SAMPLES, -1, -1, -1), v)
    return out, p


def _assert_mean_weights(samples: torch.Tensor, expected: np.ndarray, what: str = "E[w]") -> None:
    mean, se = sample_mean_and_standard_error(samples.reshape(samples.shape[0], -1, samples.shape[-1]))
    assert_within_standard_errors(mean, expected, se, atol=1e-6, what=what)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("name", ["dropkey", "dropattention"])
def test_expected_weights_match_the_theory(name, convention, fused):
    samples, p = _module_weights(name, 0.5, convention, fused=fused)
    _assert_mean_weights(samples, theory.expected_attention(p, 0.5, all_dropped=convention))


def test_expected_weights_distinguish_the_conventions():
    # power: the zero convention's samples are > 5 SE away from the uniform theory
    samples, p = _module_weights("dropkey", 0.5, "zero", fused=True)
    with pytest.raises(AssertionError):
        _assert_mean_weights(samples, theory.expected_attention(p, 0.5, all_dropped="uniform"))


@pytest.mark.parametrize("fused", [True, False])
def test_post_softmax_dropout_is_unbiased(fused):
    """Attention dropout: E[w] = p (no first-moment smoothing), and Var[w] = r / (1 - r) p^2 (within 5%)."""
    r = 0.3
    samples, p = _module_weights("dropout", r, "uniform", fused=fused)
    _assert_mean_weights(samples, theory.dropout_expected_attention(p, r))
    var = samples.reshape(SAMPLES, -1, KEYS).var(dim=0).numpy()
    np.testing.assert_allclose(var, theory.dropout_attention_variance(p, r), rtol=0.05)


def test_no_regulariser_is_the_softmax():
    samples, p = _module_weights("none", 0.5, "uniform", fused=True)
    np.testing.assert_allclose(samples.reshape(SAMPLES, -1, KEYS)[0].numpy(), p, rtol=0, atol=1e-12)
    assert torch.equal(samples[0], samples[-1])


def _covers(case: str, seed: tuple[int, int], cell: tuple[int, int]) -> bool:
    """Does a seed at ``seed`` drop patch ``cell``? (the definitions in dropkey.masks' doc)"""
    _, _, size = STRUCT_CASES[case]
    dy, dx = cell[0] - seed[0], cell[1] - seed[1]
    if case.startswith("block"):  # side x side window; an even side extends one more cell after the seed
        low = -((size - 1) // 2)
        return low <= dy < low + size and low <= dx < low + size
    return (dy == 0 and abs(dx) <= size) or (dx == 0 and abs(dy) <= size)  # plus of arm `size`


def _exact_structured_expectation(case: str, p: np.ndarray, r: float, all_dropped: str) -> np.ndarray:
    """E[w] (rows, Nk) for softmax rows p (rows, Nk), summing over all 2^(H W) x 2 masks."""
    variant, _, size = STRUCT_CASES[case]
    kind = "block" if variant == "dropkey_block" else "cross"
    gamma = masks.calibrated_seed_rate(r, GRID, kind=kind, side=size, arm=size)
    cells = [(y, x) for y in range(GRID[0]) for x in range(GRID[1])]
    expected, total_probability = np.zeros_like(p), 0.0
    for pattern in itertools.product((False, True), repeat=len(cells)):
        seeds = [cell for cell, is_seed in zip(cells, pattern, strict=True) if is_seed]
        seed_probability = gamma ** len(seeds) * (1 - gamma) ** (len(cells) - len(seeds))
        patch_kept = [not any(_covers(case, seed, cell) for seed in seeds) for cell in cells]
        for class_dropped in (False, True):
            probability = seed_probability * (r if class_dropped else 1 - r)
            keep = np.array([not class_dropped, *patch_kept], dtype=float)
            expected += probability * renormalise_kept(p, keep.astype(bool), all_dropped)
            total_probability += probability
    assert abs(total_probability - 1.0) < 1e-12
    return expected


def _structured_weights(case: str, r: float, convention: str, *, fused: bool) -> tuple[torch.Tensor, np.ndarray]:
    variant, setting, size = STRUCT_CASES[case]
    return _module_weights(variant, r, convention, fused=fused, keys=TOKENS, qk_seed=4, mask_seed=21,
                           **{setting: size})


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", sorted(STRUCT_CASES))
def test_structured_expected_weights_match_exact_enumeration(case, convention, fused):
    samples, p = _structured_weights(case, 0.5, convention, fused=fused)
    _assert_mean_weights(samples, _exact_structured_expectation(case, p, 0.5, convention))


@pytest.mark.parametrize("case", sorted(STRUCT_CASES))
def test_structured_enumeration_has_power(case):
    # the same samples are > 5 SE away from (a) independent DropKey's exact expectation and
    # (b) the enumeration under another all_dropped convention: the test tells them apart
    r = 0.5
    samples, p = _structured_weights(case, r, "zero", fused=True)
    _assert_mean_weights(samples, _exact_structured_expectation(case, p, r, "zero"))
    with pytest.raises(AssertionError):
        _assert_mean_weights(samples, theory.expected_attention(p, r, all_dropped="zero"))
    with pytest.raises(AssertionError):
        _assert_mean_weights(samples, _exact_structured_expectation(case, p, r, "uniform"))


def test_the_contract_has_power():
    """A backend with a biased mask fails the statistical check: the zero convention's samples against the
    uniform convention's theory."""
    p, w = _sampled_weights("reference", "zero", 4, 0.5, 6000, seed=17)
    se = np.sqrt(theory.attention_variance(p, 0.5, all_dropped="zero") / 6000)
    with pytest.raises(AssertionError, match="beyond 5 SE"):
        assert_within_standard_errors(w.mean(axis=0), theory.expected_attention(p, 0.5, all_dropped="uniform"), se)
