"""Tests of dropkey.functional: exactness, agreement of backends, distribution, dtypes, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stat_assertions import assert_within_standard_errors

import theory
from dropkey import functional as fn
from dropkey.kernels import cpu_kernel, fused, fused_flash
from dropkey.kernels.cpu_kernel import cpp_available
from dropkey.masks import dropattention_keep_mask, dropkey_keep_mask

BACKENDS = ("reference", "sdpa", "fused", "auto")
FAST_BACKENDS = ("sdpa", "fused", "auto")
CONVENTIONS = fn.ALL_DROPPED_CONVENTIONS


def _qkv(batch=(2, 3), nq=5, nk=4, d=8, dv=6, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, nq, d, generator=g).to(dtype)
    k = torch.randn(*batch, nk, d, generator=g).to(dtype)
    v = torch.randn(*batch, nk, dv, generator=g).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _grads(out, inputs):
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * weight).sum(), inputs)


# --------------------------------------------------------------------------- same mask -> same output


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("nq,nk,r", [(5, 4, 0.6), (3, 2, 0.8), (17, 17, 0.1), (6, 9, 0.3)])
def test_backend_matches_reference_on_the_same_mask(backend, convention, nq, nk, r):
    """dropkey_attention(seed) of every backend == reference attention on dropkey_keep_mask(seed): values and grads."""
    q, k, v = _qkv(nq=nq, nk=nk, requires_grad=True)
    out = fn.dropkey_attention(q, k, v, r, all_dropped=convention, generator=7, backend=backend)
    keep = dropkey_keep_mask((2, 3, nq, nk), r, generator=7)
    ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_logits", [1, 50, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_fused_chunking_is_exact(monkeypatch, chunk_logits, dtype, convention):
    """The fused backend's chunking (one slice per chunk, a few, all at once) changes nothing: values and grads."""
    q, k, v = _qkv(batch=(3, 4), nq=3, nk=2, dtype=dtype, requires_grad=True, seed=2)
    keep = dropkey_keep_mask((3, 4, 3, 2), 0.7, generator=8)
    assert (~keep.any(-1)).sum() >= 3  # all-dropped rows in several chunks
    monkeypatch.setattr(fused, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(fused, "MIN_CHUNK_LOGITS", chunk_logits)
    out = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="fused")
    ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("chunk_logits", [1, 50, 1 << 30])
@pytest.mark.parametrize("nq,nk,r", [(3, 3, 0.7), (2, 2, 0.9), (5, 4, 0.05), (1, 7, 0.5)])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_fused_streamed_mask_is_the_reference_mask(monkeypatch, chunk_logits, nq, nk, r, convention):
    """dropkey_attention(fused) draws its mask chunk by chunk and keeps it bit-packed; whatever the
    chunking (byte-unaligned Nq * Nk included) it uses exactly dropkey_keep_mask(seed): values and grads."""
    monkeypatch.setattr(fused, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(fused, "MIN_CHUNK_LOGITS", chunk_logits)
    q, k, v = _qkv(batch=(5, 3), nq=nq, nk=nk, requires_grad=True, seed=4)
    out = fn.dropkey_attention(q, k, v, r, all_dropped=convention, generator=21, backend="fused")
    keep = dropkey_keep_mask((5, 3, nq, nk), r, generator=21)
    ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_logits", [1, 40, 100, 1 << 30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_permuted_qkv_like_timm(monkeypatch, chunk_logits, backend):
    """q, k, v as timm makes them (a permuted view of one qkv tensor, not flattenable): every chunking
    (within a batch entry, whole batch entries, all at once) agrees with the reference on contiguous copies."""
    monkeypatch.setattr(fused, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(fused, "MIN_CHUNK_LOGITS", chunk_logits)
    batch, tokens, heads, dim = 3, 5, 4, 6
    x = torch.randn(batch, tokens, 3 * heads * dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x.requires_grad_(True)
    q, k, v = x.reshape(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = fn.dropkey_attention(q, k, v, 0.5, generator=3, backend=backend, all_dropped="undropped")
    ref = fn.dropkey_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.5, generator=3, backend="reference", all_dropped="undropped"
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (got,) = torch.autograd.grad((out.transpose(1, 2) * weight.transpose(1, 2)).sum(), x)
    (want,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- fused on CPU: torch's flash kernels


def _chunking(monkeypatch, chunk_logits):
    monkeypatch.setattr(fused, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(fused, "MIN_CHUNK_LOGITS", chunk_logits)


_FLASH_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


@pytest.mark.parametrize("chunk_logits", [1, 70, 1 << 30])
@pytest.mark.parametrize("dtype", list(_FLASH_TOL))
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("nk,r", [(3, 0.7), (16, 0.9), (20, 0.1)])
def test_flash_path_matches_reference_on_the_same_mask(monkeypatch, chunk_logits, dtype, convention, nk, r):
    """d == dv (every ViT): on CPU the fused backend runs torch's flash kernels with the streamed mask as a
    0 / -inf bias, chunk by chunk; all-dropped rows (nk = 3: found row by row; nk = 16: behind the packed-byte
    check) in several chunks. Values and grads equal the reference on dropkey_keep_mask(seed), computed in
    float64 from the same inputs."""
    _chunking(monkeypatch, chunk_logits)
    q, k, v = _qkv(batch=(3, 4), nq=5, nk=nk, d=8, dv=8, dtype=dtype, requires_grad=True, seed=6)
    assert fused_flash.uses_flash(q, k)
    out = fn.dropkey_attention(q, k, v, r, all_dropped=convention, generator=11, backend="fused")
    keep = dropkey_keep_mask((3, 4, 5, nk), r, generator=11)
    if r > 0.5:
        assert (~keep.any(-1)).sum() >= 3
    wide = tuple(t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = fn.attention_from_keep_mask(*wide, keep, all_dropped=convention, backend="reference")
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **_FLASH_TOL[dtype])
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weight).sum(), wide)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **_FLASH_TOL[dtype])


@pytest.mark.parametrize("chunk_logits", [1, 300, 1 << 30])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_flash_path_with_a_given_mask_and_odd_shapes(monkeypatch, chunk_logits, convention):
    """attention_from_keep_mask (Block/Cross masks) on the flash path: a contiguous mask with all-dropped rows
    behind the 8-byte-word check, a broadcast one, 1 and 3 leading dims, d > dv and d < dv (zero padding)."""
    _chunking(monkeypatch, chunk_logits)
    cases = [
        ((2, 3), 6, 17, 8, 8), ((5,), 4, 16, 6, 6), ((2, 2, 3), 3, 15, 4, 4), ((2, 3), 4, 18, 8, 5),
        ((2, 3), 4, 18, 5, 8),
    ]
    for lead, nq, nk, d, dv in cases:
        q, k, v = _qkv(batch=lead, nq=nq, nk=nk, d=d, dv=dv, requires_grad=True, seed=nk)
        for keep in (
            dropkey_keep_mask((*lead, nq, nk), 0.2, generator=nq),
            dropattention_keep_mask((*lead, nq, nk), 0.5, generator=1),
        ):
            keep = keep.clone()
            keep[..., -1, :] = False  # an all-dropped row in every slice
            out = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="fused")
            ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Replay:
    """A stand-in for BernoulliStream that replays given flags."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags, self.cursor = flags.reshape(-1), 0

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.flags[self.cursor : self.cursor + out.numel()])
        self.cursor += out.numel()
        return out


@pytest.mark.parametrize("nk", [15, 16, 17, 24, 65])
def test_every_all_dropped_row_is_found_at_any_offset(nk):
    """The quick checks (a 0xFF packed byte; an 8-byte word of Trues) never miss an all-dropped row of
    Nk >= 15 keys, wherever it starts within a byte or word; the packed mask is pack_bits of the flags."""
    from dropkey.masks import pack_bits

    rows = 11
    for dead in range(rows):
        drop = torch.rand(rows, nk, generator=torch.Generator().manual_seed(dead)) < 0.3
        drop[:, 0] = False
        drop[dead] = True
        assert fused_flash.all_dropped_rows(drop).tolist() == [dead]
        for piece in (1, 8 * nk, 1 << 20):
            packed, found = fused_flash.draw_packed(_Replay(drop), drop.numel(), nk, piece, torch.device("cpu"))
            assert found is not None and found.tolist() == [dead]
            padded = torch.zeros(-(-drop.numel() // 8) * 8, dtype=torch.bool)
            padded[: drop.numel()] = drop.view(-1)
            assert torch.equal(packed, pack_bits(padded))
    drop[:] = False
    assert fused_flash.all_dropped_rows(drop) is None
    assert fused_flash.draw_packed(_Replay(drop), drop.numel(), nk, 64, torch.device("cpu"))[1] is None


@pytest.mark.parametrize("backend", ["fused", "cpp"])
def test_saved_state_is_at_most_one_bit_per_logit(backend):
    """What autograd keeps for backward besides q, k, v and the output: per-row state (the log-sum-exp) and,
    for the fused path, the packed mask (1 bit per logit); the cpp kernel keeps its hash seed (one int64) and
    recomputes the mask. Nothing of N x N floats."""
    q, k, v = _qkv(batch=(4, 3), nq=24, nk=24, d=16, dv=16, dtype=torch.float32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn.dropkey_attention(q, k, v, 0.1, generator=0, backend=backend)
    known = {t.untyped_storage().data_ptr() for t in (q, k, v, out)}
    extra = {
        t.untyped_storage().data_ptr(): t
        for t in saved
        if t is not None and t.untyped_storage().data_ptr() not in known
    }
    sizes = sorted((str(t.dtype), tuple(t.shape)) for t in extra.values())
    expected = [("torch.float32", (4, 3, 24))]
    if backend == "fused":
        expected.append(("torch.uint8", (4 * 3 * 24 * 24 // 8,)))
    else:  # the hash seed, kept as a tensor
        expected.append(("torch.int64", (1,)))
    assert sizes == sorted(expected)


def test_non_finite_inputs_are_not_hidden():
    """A NaN logit from a non-finite input stays NaN (only truly all-dropped rows are rewritten)."""
    q, k, v = _qkv(nq=3, nk=3)
    q = q.clone()
    q[0, 0, 1, 0] = float("nan")
    keep = torch.ones(3, 3, dtype=torch.bool)
    for backend in ("reference", "fused"):
        out = fn.attention_from_keep_mask(q, k, v, keep, all_dropped="zero", backend=backend)
        assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("keep_shape", ["full", "shared_queries", "unbatched"])
def test_attention_from_keep_mask_backends_agree(backend, convention, keep_shape):
    """Every backend of attention_from_keep_mask equals the reference, for broadcast masks too; keep is untouched."""
    q, k, v = _qkv(nq=4, nk=3, requires_grad=True, seed=1)
    if keep_shape == "full":
        keep = dropkey_keep_mask((2, 3, 4, 3), 0.6, generator=3)
    elif keep_shape == "shared_queries":
        keep = dropattention_keep_mask((2, 3, 4, 3), 0.6, generator=3)
    else:
        keep = dropkey_keep_mask((4, 3), 0.6, generator=3)
    keep[..., 0, :] = False  # at least one all-dropped row
    before = keep.clone()
    out = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend=backend)
    ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
    assert torch.equal(keep, before)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_all_dropped_rows_follow_the_convention():
    q, k, v = _qkv(nq=2, nk=3)
    keep = torch.tensor([[False, False, False], [True, False, True]])
    plain = fn.plain_attention(q, k, v, backend="reference")
    for backend in BACKENDS:
        zero = fn.attention_from_keep_mask(q, k, v, keep, all_dropped="zero", backend=backend)
        uniform = fn.attention_from_keep_mask(q, k, v, keep, all_dropped="uniform", backend=backend)
        undropped = fn.attention_from_keep_mask(q, k, v, keep, all_dropped="undropped", backend=backend)
        assert torch.equal(zero[..., 0, :], torch.zeros_like(zero[..., 0, :]))
        torch.testing.assert_close(uniform[..., 0, :], v.mean(dim=-2))
        torch.testing.assert_close(undropped[..., 0, :], plain[..., 0, :])
        torch.testing.assert_close(zero[..., 1, :], uniform[..., 1, :])


# --------------------------------------------------------------------------- same distribution as the theory


def _empirical_weights(backend, convention, n, r, samples, seed, dtype=torch.float64):
    """Empirical weights: v = eye(N) so the output row is the weight row. Returns (p, weights (S, Nq, N)).

    q, k, v are drawn in ``dtype``; p is the float64 softmax of their logits as computed in ``dtype``.
    """
    g = torch.Generator().manual_seed(100 + n)
    nq = 3
    q = torch.randn(1, nq, 4, generator=g, dtype=dtype) * 1.5
    k = torch.randn(1, n, 4, generator=g, dtype=dtype) * 1.5
    v = torch.eye(n, dtype=dtype).unsqueeze(0)
    p = torch.softmax((q @ k.transpose(-2, -1)).double() / 2.0, dim=-1)[0].numpy()
    qs, ks, vs = (t.expand(samples, *t.shape[1:]) for t in (q, k, v))
    w = fn.dropkey_attention(qs, ks, vs, r, all_dropped=convention, generator=seed, backend=backend)
    return p, w.double().numpy()


def _assert_weights_match_theory(backend, convention, n, r, *, dtype, rounding, sum_atol):
    """E[w] over 20000 masks within 5 SE (+ ``rounding``) of theory.expected_attention; rows sum to 1 but for zero."""
    samples = 20000
    p, w = _empirical_weights(backend, convention, n, r, samples, seed=n * 1000 + int(r * 100), dtype=dtype)
    expected = theory.expected_attention(p, r, all_dropped=convention)
    se = np.sqrt(theory.attention_variance(p, r, all_dropped=convention) / samples)
    assert_within_standard_errors(w.mean(axis=0), expected, se, atol=rounding, what=f"E[w] ({backend}, {convention})")
    if convention != "zero":
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=sum_atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("n,r", [(2, 0.5), (3, 0.7), (4, 0.4), (8, 0.1), (8, 0.9)])
def test_expected_weights_match_theory(backend, convention, n, r):
    """Empirical E[w] over 20000 masks matches theory.expected_attention within 5 standard errors.

    v = I_N makes each output row the weight row. The standard error of each mean is
    sqrt(Var[w_j] / S) with the exact variance theory.attention_variance (floor 1e-9).
    Small N with large r makes all-dropped rows frequent (r^N up to 0.34), so the
    convention matters. Seeds are fixed, so the test is deterministic.
    """
    _assert_weights_match_theory(backend, convention, n, r, dtype=torch.float64, rounding=1e-9, sum_atol=1e-12)


@pytest.mark.skipif(not cpp_available(), reason=f"C++ kernel unavailable: {cpu_kernel.cpp_unavailable_reason()}")
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("n,r", [(2, 0.5), (3, 0.7), (8, 0.1), (8, 0.9)])
def test_cpp_kernel_expected_weights_match_theory(convention, n, r):
    """The C++ kernel (float32 only) against the same theory: 1e-6 on top of 5 SE allows for float32
    rounding of the weights (the SEs are ~1e-3)."""
    _assert_weights_match_theory("cpp", convention, n, r, dtype=torch.float32, rounding=1e-6, sum_atol=1e-5)


def test_post_softmax_dropout_is_unbiased_and_plain_in_eval():
    """timm's attn_drop: E[w] = p (within 5 SE with Var = p^2 r/(1-r)); eval = reference plain path."""
    samples, n, r = 20000, 5, 0.3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, n, 4, generator=g, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).unsqueeze(0)
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)[0].numpy()
    qs, ks, vs = (t.expand(samples, *t.shape[1:]) for t in (q, k, v))
    w = fn.post_softmax_dropout_attention(qs, ks, vs, r, generator=11).numpy()
    se = np.sqrt(p**2 * r / (1 - r) / samples)
    assert_within_standard_errors(w.mean(axis=0), p, se, what="E[w] of post-softmax dropout")
    assert set(np.unique(np.round(w / p / (1 / (1 - r)), 9))) <= {0.0, 1.0}
    for training, ratio in ((False, r), (True, 0.0)):
        out = fn.post_softmax_dropout_attention(q, k, v, ratio, training=training)
        assert torch.equal(out, fn.plain_attention(q, k, v, backend="reference"))


# --------------------------------------------------------------------------- eval / r = 0 exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eval_and_zero_ratio_are_exactly_plain_attention(backend, dtype):
    q, k, v = _qkv(batch=(2, 2), nq=7, nk=9, d=16, dv=16, dtype=dtype)
    plain = fn.plain_attention(q, k, v, backend=backend)
    assert torch.equal(fn.dropkey_attention(q, k, v, 0.5, training=False, backend=backend), plain)
    assert torch.equal(fn.dropkey_attention(q, k, v, 0.0, training=True, backend=backend), plain)
    if backend == "reference":
        # half inputs: logits in float32 (no float16 overflow; issue 15), weights back in the input dtype
        weights = torch.softmax(q.float() @ k.float().transpose(-2, -1) * 0.25, dim=-1).to(dtype)
        assert torch.equal(plain, weights @ v)
    else:
        assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v))


# --------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_nan_at_high_ratio_small_n(backend, convention, dtype):
    """r = 0.9, N = 2: 81% of rows all-dropped; output and grads finite in every dtype."""
    q, k, v = _qkv(batch=(64, 2), nq=2, nk=2, d=8, dv=8, dtype=dtype, requires_grad=True, seed=3)
    out = fn.dropkey_attention(q, k, v, 0.9, all_dropped=convention, generator=0, backend=backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(torch.isfinite(grad).all() for grad in grads)
    if dtype != torch.float32:  # agrees with the float32 computation on the same mask
        q32, k32, v32 = (t.detach().float() for t in (q, k, v))
        kind = fn.resolve_backend(backend, "cpu", dtype)[1]  # auto: fused (Bernoulli) for half dtypes
        out32 = fn.dropkey_attention(
            q32, k32, v32, 0.9, all_dropped=convention, generator=0, backend=backend, mask=kind
        )
        torch.testing.assert_close(out.float(), out32, rtol=0.05, atol=0.05)


def test_masked_softmax_rows_and_dtypes():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-4.0, 0.0, 4.0]])
    keep = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    p = torch.softmax(logits, -1)
    for convention, dead in (("zero", torch.zeros(3)), ("uniform", torch.full((3,), 1 / 3)), ("undropped", p[1])):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            w = fn.masked_softmax(logits.to(dtype), keep, all_dropped=convention)
            assert w.dtype == dtype and torch.isfinite(w).all()
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
            torch.testing.assert_close(w[1].float(), dead.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(
                w[0].float(), torch.tensor([p[0, 0], 0, p[0, 2]]) / (p[0, 0] + p[0, 2]), rtol=tol, atol=tol
            )
            torch.testing.assert_close(w[2].float(), p[2], rtol=tol, atol=tol)
    assert torch.equal(fn.masked_softmax(logits, None), p)
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((fn.masked_softmax(x, keep, all_dropped="zero") * torch.arange(3.0)).sum(), x)
    assert torch.all(grad[~keep] == 0) and torch.isfinite(grad).all()


def test_paper_two_line_code_is_nan_in_float16_and_ours_is_not():
    """-1e12 overflows to -inf in float16, so an all-dropped row is softmax(-inf, ..., -inf) = NaN."""
    q, k, v = _qkv(batch=(16,), nq=2, nk=2, dtype=torch.float16)
    assert torch.isnan(fn.paper_dropkey_attention(q, k, v, 0.9, generator=0)).any()
    for backend in BACKENDS:
        assert torch.isfinite(fn.dropkey_attention(q, k, v, 0.9, generator=0, backend=backend)).all()


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_with_seed_and_generator(backend):
    q, k, v = _qkv(nq=6, nk=6)
    a = fn.dropkey_attention(q, k, v, 0.3, generator=1, backend=backend)
    b = fn.dropkey_attention(q, k, v, 0.3, generator=1, backend=backend)
    c = fn.dropkey_attention(q, k, v, 0.3, generator=2, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = [fn.dropkey_attention(q, k, v, 0.3, generator=g1, backend=backend) for _ in range(2)]
    second = [fn.dropkey_attention(q, k, v, 0.3, generator=g2, backend=backend) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(4)
    d = fn.dropkey_attention(q, k, v, 0.3, backend=backend)
    torch.manual_seed(4)
    assert torch.equal(d, fn.dropkey_attention(q, k, v, 0.3, backend=backend))


def test_large_mask_uses_bounded_chunks(monkeypatch):
    """Chunked sampling (forced with a tiny chunk) gives the same distribution and the same seed-determinism."""
    import dropkey.masks as masks

    monkeypatch.setattr(masks, "_CHUNK", 97)
    monkeypatch.setattr(masks, "_MIN_CHUNK", 97)
    q, k, v = _qkv(batch=(8, 4), nq=16, nk=16)
    for r in (0.05, 0.3, 0.95):
        out = fn.dropkey_attention(q, k, v, r, generator=5)
        torch.testing.assert_close(out, fn.dropkey_attention(q, k, v, r, generator=5, backend="reference"))


# --------------------------------------------------------------------------- torch.compile


def _compiled_matches_eager(compile_backend, backend="fused", mask=None):
    torch._dynamo.reset()
    q, k, v = _qkv(batch=(2, 2), nq=5, nk=5, dtype=torch.float32, requires_grad=True)

    def step(q, k, v):
        return fn.dropkey_attention(q, k, v, 0.3, generator=3, backend=backend, mask=mask, all_dropped="zero")

    compiled = torch.compile(step, backend=compile_backend)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, step(q, k, v))
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(step(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mask", ["bernoulli", "hash"])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused"])
def test_torch_compile_aot_eager(backend, mask):
    """Every mask backend traces (the sdpa one failed under torch.compile until its in-place mask fix-up was skipped
    there)."""
    _compiled_matches_eager("aot_eager", backend, mask)


def test_torch_compile_keeps_the_hash_mask_one_op():
    """Under torch.compile the hash mask is one opaque op (its seed a tensor: no graph break, fullgraph works).

    Traced op by op, the hash's few dozen integer ops made inductor's code generation take time
    exponential in their depth: one small mask was still compiling after 200 s on a 2-core CPU.
    """
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    q, k, v = _qkv(batch=(2, 2), nq=5, nk=5, dtype=torch.float32)
    compiled = torch.compile(lambda q, k, v: fn.dropkey_attention(q, k, v, 0.3, backend="reference", mask="hash"),
                             backend=recording_backend, fullgraph=True)
    torch.manual_seed(8)
    out = compiled(q, k, v)
    torch.manual_seed(8)
    torch.testing.assert_close(out, fn.dropkey_attention(q, k, v, 0.3, backend="reference", mask="hash"))
    (graph,) = graphs
    assert "dropkey_lab.hash_drop_mask" in graph and "bitwise_xor" not in graph and "__xor__" not in graph


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_inductor_with_the_hash_mask():
    """inductor compiles the hash-mask path in seconds (it still ran after 150 s before the mask became one op)."""
    _compiled_matches_eager("inductor", "fused", "hash")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_inductor():
    _compiled_matches_eager("inductor")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_invalid_drop_ratio(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"drop_ratio.*\[0, 1\)"):
        fn.dropkey_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"drop_ratio.*\[0, 1\)"):
        fn.post_softmax_dropout_attention(q, k, v, bad)


def test_invalid_arguments_raise_value_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="all_dropped"):
        fn.dropkey_attention(q, k, v, 0.1, all_dropped="nan")
    with pytest.raises(ValueError, match="backend"):
        fn.dropkey_attention(q, k, v, 0.1, backend="triton-please")
    with pytest.raises(ValueError, match="floating"):
        fn.dropkey_attention(q.long(), k.long(), v.long(), 0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        fn.dropkey_attention(q, k.float(), v, 0.1)
    with pytest.raises(ValueError, match="feature size"):
        fn.dropkey_attention(q, k[..., :3], v, 0.1)
    with pytest.raises(ValueError, match="number of keys"):
        fn.dropkey_attention(q, k, v[..., :2, :], 0.1)
    with pytest.raises(ValueError, match="at least one key"):
        fn.dropkey_attention(q, k[..., :0, :], v[..., :0, :], 0.1)
    with pytest.raises(ValueError, match="leading"):
        fn.dropkey_attention(q, k[:1], v[:1], 0.1)
    with pytest.raises(ValueError, match="scale"):
        fn.dropkey_attention(q, k, v, 0.1, scale=-1.0)
    with pytest.raises(ValueError, match="training"):
        fn.dropkey_attention(q, k, v, 0.1, training="yes")
    with pytest.raises(ValueError, match="generator"):
        fn.dropkey_attention(q, k, v, 0.1, generator="seed")
    with pytest.raises(ValueError, match="keep"):
        fn.attention_from_keep_mask(q, k, v, torch.ones(2, 3, 5, 4))
    with pytest.raises(ValueError, match="keep"):
        fn.attention_from_keep_mask(q, k, v, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="all_dropped"):
        fn.masked_softmax(torch.zeros(3), None, all_dropped="ones")
    with pytest.raises(ValueError, match="logits"):
        fn.masked_softmax(torch.zeros(3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="keep"):
        fn.masked_softmax(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backends_agree_and_are_finite(backend, dtype):
    q, k, v = (t.cuda() for t in _qkv(batch=(4, 2), nq=8, nk=8, d=16, dv=16, dtype=dtype))
    for t in (q, k, v):
        t.requires_grad_(True)
    # mask="bernoulli": on CUDA "auto" would otherwise pick the triton backend and its hash mask
    # (tested against the reference on the same mask in tests/test_triton_kernel.py)
    out = fn.dropkey_attention(q, k, v, 0.9, generator=1, backend=backend, mask="bernoulli")
    keep = dropkey_keep_mask((4, 2, 8, 8), 0.9, generator=1, device="cuda")
    ref = fn.attention_from_keep_mask(q, k, v, keep, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.02, atol=0.02)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert math.isfinite(float(out.float().sum()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    """Empty query sets, an empty batch and unbatched (N, d) inputs work and agree with the reference."""
    for q_shape, kv_lead in (((2, 3, 0, 8), (2, 3)), ((0, 3, 5, 8), (0, 3)), ((5, 8), ())):
        q = torch.randn(*q_shape, dtype=torch.float64, requires_grad=True)
        k = torch.randn(*kv_lead, 4, 8, dtype=torch.float64, requires_grad=True)
        v = torch.randn(*kv_lead, 4, 8, dtype=torch.float64, requires_grad=True)
        out = fn.dropkey_attention(q, k, v, 0.3, generator=0, backend=backend)
        ref = fn.dropkey_attention(q, k, v, 0.3, generator=0, backend="reference")
        assert out.shape == (*q_shape[:-1], 8)
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
