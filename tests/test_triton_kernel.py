"""The fused Triton DropKey kernel and its counter-based hash mask.

The kernel is checked against the reference backend on the *identical* mask
(``mask="hash"``): outputs and gradients of q, k, v, for every all_dropped
convention, in float32 (tight) and float16/bfloat16 (to their precision). On a
machine without CUDA the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py) on CPU tensors at small
shapes; with CUDA the same tests run the compiled kernels,
and the ``gpu`` tests add ViT-sized shapes. Tests that need triton skip cleanly
without it; the hash-mask tests are pure torch and always run.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from stat_assertions import assert_within_standard_errors

import dropkey.kernels as kernels
from dropkey import functional as fn
from dropkey.kernels import HASH_BITS, hash_drop_mask, hash_seed, hash_seed_tensor, hash_threshold
from dropkey.kernels import hash_mask as hm
from dropkey.modules import DropKeyAttention

CONVENTIONS = fn.ALL_DROPPED_CONVENTIONS
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _load_kernels():
    """dropkey.kernels.triton_dropkey, or None without triton.

    Without CUDA the kernels must be built for the interpreter: tests/conftest.py sets
    TRITON_INTERPRET=1 before collection (triton reads it when first imported, and
    torch._dynamo imports triton); set here too for a run of this file alone.
    """
    if not CUDA and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not kernels.triton_available():
        return None
    return importlib.import_module("dropkey.kernels.triton_dropkey")


tk = _load_kernels()
if tk is None:
    _SKIP = 'triton is not installed (pip install "dropkey-lab[triton]")'
elif not CUDA and not tk.INTERPRETED:
    _SKIP = "no CUDA and triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1"
else:
    _SKIP = ""
needs_triton = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)
interpreter_only = pytest.mark.skipif(
    bool(_SKIP) or not tk.INTERPRETED, reason=_SKIP or "explicit block sizes: interpreter only"
)

# float32: tight; half dtypes: max |error| relative to max(1, max |reference|) (float64 reference on the
# same rounded inputs), a few units of the format's epsilon times the accumulation depth.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _qkv(batch=(2, 1), nq=5, nk=7, d=16, dv=16, dtype=torch.float32, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*batch, nq, d, generator=g) * magnitude).to(dtype)
    k = (torch.randn(*batch, nk, d, generator=g) * magnitude).to(dtype)
    v = torch.randn(*batch, nk, dv, generator=g).to(dtype)
    return tuple(t.to(DEVICE).requires_grad_(True) for t in (q, k, v))


def _weights(out):
    g = torch.Generator().manual_seed(123)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)


def _fused_and_reference(q, k, v, r, convention, generator=11):
    """(output, grads) of the triton backend and of the float64 reference on the same hash mask."""
    out = fn.dropkey_attention(q, k, v, r, all_dropped=convention, generator=generator, backend="triton")
    grads = torch.autograd.grad((out.double() * _weights(out)).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = fn.dropkey_attention(
        q64, k64, v64, r, all_dropped=convention, generator=generator, backend="reference", mask="hash"
    )
    ref_grads = torch.autograd.grad((ref * _weights(ref)).sum(), (q64, k64, v64))
    return (out, *grads), (ref, *ref_grads)


def _assert_matches(got, want, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} not finite"
        error = (a.double() - b).abs().max().item() if a.numel() else 0.0
        bound = TOLERANCE[dtype] * max(1.0, b.abs().max().item() if b.numel() else 0.0)
        assert error <= bound, f"{name}: max error {error:.2e} > {bound:.2e} ({dtype})"


# --------------------------------------------------------------------------- the hash mask (pure torch)


def _spec_bits(seed: int, s: int, i: int, j: int) -> int:
    """The hash of hash_mask.py's docstring in plain Python ints (the specification)."""
    m = 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m
        return h ^ (h >> 16)

    slice_key = fmix((seed & m) ^ fmix(((seed >> 32) + s * 0x9E3779B1) & m))
    row_key = fmix(slice_key ^ ((i * 0x85EBCA77) & m))
    return fmix((row_key + j * 0xC2B2AE3D) & m)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 7, 2**32 + 5, 2**63 - 2, 2**64 - 1])
@pytest.mark.parametrize("r", [0.3, 0.9])
def test_hash_mask_is_the_specified_hash(seed, r):
    """hash_drop_mask == (spec_bits >> 8) < T entry by entry (torch's 16-bit-split multiply is exact)."""
    shape = (2, 3, 4, 5)
    threshold = hash_threshold(r)
    want = torch.tensor(
        [
            [
                [
                    [(_spec_bits(seed, b * 3 + h, i, j) >> (32 - HASH_BITS)) < threshold for j in range(5)]
                    for i in range(4)
                ]
                for h in range(3)
            ]
            for b in range(2)
        ]
    )
    assert torch.equal(hash_drop_mask(seed, shape, r), want)


def test_hash_halves_are_the_specified_hash():
    """hash_row_keys (any first slice) and hash_column_terms combine through hash_bits into the specified words."""
    seed = 2**40 + 3
    rows = hm.hash_row_keys(seed, 3, 4, first_slice=5)
    assert rows.shape == (3, 4) and rows.dtype == torch.int64
    assert torch.equal(rows, hm.hash_row_keys(seed, 8, 4)[5:])
    bits = hm.hash_bits(rows.unsqueeze(-1), hm.hash_column_terms(6))
    want = torch.tensor([[[_spec_bits(seed, 5 + s, i, j) for j in range(6)] for i in range(4)] for s in range(3)])
    assert torch.equal(bits, want)
    with pytest.raises(ValueError, match="seed"):
        hm.hash_row_keys(-1, 1, 1)
    with pytest.raises(ValueError, match=r"nq must be an integer in \[0, inf\)"):
        hm.hash_row_keys(1, 2, -3)
    with pytest.raises(ValueError, match=r"nk must be an integer in \[0, inf\)"):
        hm.hash_column_terms(2.5)


def test_hash_mask_takes_its_seed_as_a_tensor_and_its_op_passes_opcheck():
    """A one-element int64 seed tensor (two's complement above 2**63) gives the int seed's mask;
    the custom op that torch.compile sees passes torch.library.opcheck."""
    shape = (2, 3, 4, 5)
    for seed in (0, 9, 2**63 + 5, 2**64 - 1):
        assert torch.equal(hash_drop_mask(hm.seed_tensor(seed), shape, 0.3), hash_drop_mask(seed, shape, 0.3))
    assert torch.equal(hash_drop_mask(hash_seed_tensor(4), shape, 0.3), hash_drop_mask(hash_seed(4), shape, 0.3))
    torch.library.opcheck(hm._hash_drop_mask_op, (hm.seed_tensor(9), list(shape), 0.3, torch.device("cpu")))
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        hash_drop_mask(torch.zeros(2, dtype=torch.int64), shape, 0.3)


def test_hash_mask_is_a_pure_function_of_its_counters(monkeypatch):
    """Same seed -> same mask, whatever the chunking; another seed, slice or shape prefix changes it consistently."""
    shape = (3, 4, 9, 11)
    mask = hash_drop_mask(42, shape, 0.5)
    assert torch.equal(mask, hash_drop_mask(42, shape, 0.5))
    monkeypatch.setattr(hm, "_CHUNK_LOGITS", 7)  # one slice per chunk
    assert torch.equal(mask, hash_drop_mask(42, shape, 0.5))
    # (batch, head) flattening: (3, 4) leading dims == 12 slices; a prefix of rows/keys is the same mask
    assert torch.equal(mask.view(12, 9, 11), hash_drop_mask(42, (12, 9, 11), 0.5))
    assert torch.equal(mask[..., :5, :6], hash_drop_mask(42, (3, 4, 5, 6), 0.5))
    assert not torch.equal(mask, hash_drop_mask(43, shape, 0.5))
    assert not torch.equal(mask[0, 0], mask[0, 1])
    # nested in r: a larger ratio drops a superset
    assert torch.all(hash_drop_mask(42, shape, 0.3) <= mask)


def test_hash_threshold_semantics():
    """T = floor(r * 2**24 + 1/2): P(drop) = T / 2**24 exactly, within 2**-25 of r."""
    assert hash_threshold(0.0) == 0 and hash_threshold(0.5) == 1 << 23
    assert hash_threshold(2.0**-26) == 0  # below half a step: never dropped
    assert hash_threshold(1 - 2.0**-26) == 1 << 24  # above 1 - half a step: always dropped
    for r in (0.1, 1 / 3, 0.999):
        assert abs(hash_threshold(r) / 2**HASH_BITS - r) <= 2.0**-25
    assert not hash_drop_mask(5, (4, 8, 8), 2.0**-26).any()
    assert hash_drop_mask(5, (4, 8, 8), 1 - 2.0**-26).all()


@pytest.mark.parametrize("r", [0.02, 0.1, 0.5, 0.9])
def test_hash_drop_rate_is_unbiased_and_pairs_independent(r):
    """Over n = 2**20 logits the drop rate is p = T / 2**24 within 5 standard errors, SE = sqrt(p (1 - p) / n).

    Pairs of neighbours (next key, next query, next slice) are both dropped at rate
    p**2 within 5 SE, SE = sqrt(p**2 (1 - p**2) / m) for m pairs (an approximation:
    overlapping pairs are only nearly independent). Seeds are fixed: deterministic.
    """
    shape = (8, 8, 128, 128)
    mask = hash_drop_mask(2024, shape, r)
    n = mask.numel()
    p = hash_threshold(r) / 2**HASH_BITS
    rate = mask.double().mean().item()
    assert_within_standard_errors(rate, p, math.sqrt(p * (1 - p) / n), what="hash drop rate")
    flat = mask.view(64, 128, 128)
    for a, b in ((flat[..., 1:], flat[..., :-1]), (flat[:, 1:], flat[:, :-1]), (flat[1:], flat[:-1])):
        m = a.numel()
        both = (a & b).double().mean().item()
        assert_within_standard_errors(both, p * p, math.sqrt(p * p * (1 - p * p) / m), what="pair drop rate")


def test_hash_seed_is_one_randint_draw():
    """hash_seed: reproducible from an int or a seeded generator, advances the generator, in [0, 2**63 - 1)."""
    assert hash_seed(7) == hash_seed(7) != hash_seed(8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = [hash_seed(g1), hash_seed(g1)]
    assert first == [hash_seed(g2), hash_seed(g2)] and first[0] != first[1]
    g3 = torch.Generator().manual_seed(3)
    assert first[0] == int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=g3))
    torch.manual_seed(5)
    a = hash_seed(None)
    torch.manual_seed(5)
    assert a == hash_seed(None) and 0 <= a < 2**63 - 1


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused", "auto"])
def test_every_mask_backend_takes_the_hash_mask(backend):
    """mask="hash" on the reference/sdpa/fused backends == attention on hash_drop_mask(hash_seed(generator))."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    for convention in CONVENTIONS:
        out = fn.dropkey_attention(q, k, v, 0.7, all_dropped=convention, generator=9, backend=backend, mask="hash")
        keep = ~hash_drop_mask(hash_seed(9), (2, 3, 6, 6), 0.7)
        assert (~keep.any(-1)).any()  # all-dropped rows present
        ref = fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(
            torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resolve_backend(monkeypatch):
    """auto: on CPU cpp (hash) for float32 when the C++ kernel loads, else fused; on CUDA triton (hash) when
    triton imports and the dtype fits, else sdpa (bernoulli)."""
    monkeypatch.setattr(kernels, "cpp_available", lambda: True)
    assert fn.resolve_backend("auto", "cpu", torch.float32) == ("cpp", "hash")
    assert fn.resolve_backend("auto", "cpu", None) == ("cpp", "hash")
    assert fn.resolve_backend("auto", "cpu", torch.float32, "bernoulli") == ("fused", "bernoulli")
    assert fn.resolve_backend("auto", "cpu", torch.bfloat16) == ("fused", "bernoulli")
    assert fn.resolve_backend("auto", "cpu", torch.float64, "hash") == ("fused", "hash")
    assert fn.resolve_backend("cpp", "cpu") == ("cpp", "hash")
    monkeypatch.setattr(kernels, "cpp_available", lambda: False)
    assert fn.resolve_backend("auto", "cpu", torch.float32) == ("fused", "bernoulli")
    assert fn.resolve_backend("auto", "cpu", torch.float32, "hash") == ("fused", "hash")
    assert fn.resolve_backend("triton", "cpu") == ("triton", "hash")
    assert fn.resolve_backend("reference", "cuda") == ("reference", "bernoulli")
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert fn.resolve_backend("auto", "cuda", torch.bfloat16) == ("triton", "hash")
    assert fn.resolve_backend("auto", "cuda", torch.float64) == ("sdpa", "bernoulli")
    assert fn.resolve_backend("auto", "cuda", torch.float16, "bernoulli") == ("sdpa", "bernoulli")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert fn.resolve_backend("auto", "cuda", torch.bfloat16) == ("sdpa", "bernoulli")


def test_invalid_arguments_raise_value_errors():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match=r"mask must be one of \('bernoulli', 'hash'\)"):
        fn.dropkey_attention(q, k, v, 0.1, mask="philox")
    with pytest.raises(ValueError, match="mask must be 'hash'"):
        fn.dropkey_attention(q, k, v, 0.1, backend="triton", mask="bernoulli")
    with pytest.raises(ValueError, match="mask must be 'hash'"):
        fn.dropkey_attention(q, k, v, 0.1, backend="cpp", mask="bernoulli")
    with pytest.raises(ValueError, match="backend must be one of"):
        fn.attention_from_keep_mask(q, k, v, torch.ones(4, 4, dtype=torch.bool), backend="triton")
    for seed in (-1, 2**64, 1.5, True, "7"):
        with pytest.raises(ValueError, match="seed must be an int"):
            hash_drop_mask(seed, (4, 4), 0.1)
    with pytest.raises(ValueError, match=r"drop_ratio.*\[0, 1\)"):
        hash_drop_mask(0, (4, 4), 1.0)
    with pytest.raises(ValueError, match="shape"):
        hash_drop_mask(0, (4,), 0.1)
    with pytest.raises(ValueError, match="generator"):
        hash_seed("seed")


def test_without_triton_the_backend_says_how_to_install(monkeypatch):
    """With triton unimportable: everything else works, backend="triton" raises naming the install command."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "dropkey.kernels.triton_dropkey", raising=False)
    monkeypatch.delattr(kernels, "triton_dropkey", raising=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    with pytest.raises(kernels.TritonUnavailableError, match=r"pip install \"dropkey-lab\[triton\]\""):
        fn.dropkey_attention(q, k, v, 0.1, backend="triton")
    fn.dropkey_attention(q, k, v, 0.1, backend="reference", mask="hash")
    fn.dropkey_attention(q, k, v, 0.1, backend="triton", training=False)  # eval: plain attention (SDPA)


# --------------------------------------------------------------------------- the kernel vs the reference


@needs_triton
@pytest.mark.parametrize("seed", [0, 3, 2**31 + 1, 2**64 - 1])
def test_kernel_hash_mask_is_bit_exact(seed):
    """The Triton hash (uint32 ops) == the torch hash (int64 ops), bit for bit, at tile-unaligned shapes."""
    near_one = 1 - 2.0**-26  # T = 2**24: every logit dropped (the kernels' limit T * 2**8 - 1 wraps to 2**32 - 1)
    cases = (
        ((2, 3, 17, 33), 0.3), ((1, 1, 1, 1), 0.5), ((3, 5, 18), 0.9), ((2, 2, 2), 0.01), ((2, 9, 9), near_one),
        ((2, 9, 9), 0.0),
    )
    assert hash_threshold(near_one) == 2**HASH_BITS
    for shape, r in cases:
        got = tk.triton_hash_drop_mask(seed, shape, r, device=DEVICE)
        assert torch.equal(got.cpu(), hash_drop_mask(seed, shape, r))
    assert tk.triton_hash_drop_mask(seed, (2, 9, 9), near_one, device=DEVICE).all()


@needs_triton
@settings(max_examples=300)
@given(h=st.integers(0, 2**32 - 1), threshold=st.integers(1, 2**HASH_BITS))
def test_kernel_limit_compare_is_the_specified_threshold_compare(h, threshold):
    """The kernels test h <= T * 2**8 - 1 (one instruction less); hash_mask.py tests (h >> 8) < T: the same set."""
    limit = tk._hash_limit(threshold) & 0xFFFFFFFF  # the int32 bit pattern the kernels reinterpret as uint32
    assert (h <= limit) == ((h >> 8) < threshold)
    for edge in (threshold * 256 - 1, threshold * 256):
        if edge < 2**32:
            assert (edge <= limit) == ((edge >> 8) < threshold)
    with pytest.raises(ValueError, match="threshold"):
        tk._hash_limit(2**HASH_BITS + 1)


@needs_triton
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(
    "nq,nk,d,dv,r",
    [(1, 1, 16, 16, 0.5), (2, 2, 16, 32, 0.9), (5, 17, 32, 16, 0.3), (17, 33, 16, 16, 0.3), (33, 5, 32, 24, 0.6)],
)
def test_float32_matches_reference_on_the_same_mask(convention, nq, nk, d, dv, r):
    """Output and dq, dk, dv within 1e-5 of the float64 reference on the identical hash mask."""
    q, k, v = _qkv(nq=nq, nk=nk, d=d, dv=dv, seed=nq + nk)
    got, want = _fused_and_reference(q, k, v, r, convention)
    _assert_matches(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("nq,nk,r", [(17, 33, 0.3), (2, 2, 0.9)])
def test_half_dtypes_match_reference_to_their_precision(dtype, convention, nq, nk, r):
    q, k, v = _qkv(nq=nq, nk=nk, d=16, dv=16, dtype=dtype, seed=5)
    got, want = _fused_and_reference(q, k, v, r, convention)
    _assert_matches(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_all_dropped_rows_and_no_nan(dtype, convention):
    """N = 1 and 2 at r = 0.9 (dead rows at rate 0.9 and 0.81) with large logits: the convention exactly, no NaN."""
    for n in (1, 2):
        q, k, v = _qkv(batch=(4, 2), nq=n, nk=n, dtype=dtype, seed=n, magnitude=8.0)
        out = fn.dropkey_attention(q, k, v, 0.9, all_dropped=convention, generator=1, backend="triton")
        dead = hash_drop_mask(hash_seed(1), (4, 2, n, n), 0.9).all(-1).to(DEVICE)
        assert 0 < int(dead.sum()) < dead.numel()
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        rows = out[dead]
        if convention == "zero":
            assert torch.equal(rows, torch.zeros_like(rows))
            assert torch.equal(grads[0][dead], torch.zeros_like(grads[0][dead]))
        elif convention == "uniform":
            mean = v.detach().float().mean(-2, keepdim=True).expand(*v.shape[:-2], n, v.shape[-1])[dead]
            torch.testing.assert_close(rows.float(), mean, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        else:
            plain = F.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)))[dead]
            torch.testing.assert_close(rows.float(), plain, rtol=4 * TOLERANCE[dtype], atol=4 * TOLERANCE[dtype])
    # nearly every logit dropped (T = 2**24 - 17): still finite, and all rows dead -> the convention
    q, k, v = _qkv(batch=(2, 1), nq=5, nk=3, dtype=dtype, seed=9)
    out = fn.dropkey_attention(q, k, v, 1 - 1e-6, all_dropped=convention, generator=2, backend="triton")
    assert torch.isfinite(out).all()


@needs_triton
def test_kernel_mask_is_the_hash_mask_inside_attention():
    """With q = 0 (equal logits) and the zero convention, out @ I = keep / count: the kernel's own mask == hash mask."""
    n = 33
    q = torch.zeros(2, 2, n, 16, device=DEVICE)
    k = torch.randn(2, 2, n, 16, device=DEVICE)
    v = torch.eye(n, device=DEVICE).expand(2, 2, n, n).contiguous()
    out = fn.dropkey_attention(q, k, v, 0.4, all_dropped="zero", generator=17, backend="triton")
    assert torch.equal((out > 0).cpu(), ~hash_drop_mask(hash_seed(17), (2, 2, n, n), 0.4))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_and_zero_ratio_are_plain_attention(dtype):
    """training=False / r = 0: exactly plain_attention (SDPA); the kernel itself with nothing dropped == plain
    softmax."""
    q, k, v = _qkv(nq=9, nk=17, dtype=dtype, seed=2)
    plain = fn.plain_attention(q, k, v, backend="triton")
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(fn.dropkey_attention(q, k, v, 0.5, training=False, backend="triton"), plain)
    assert torch.equal(fn.dropkey_attention(q, k, v, 0.0, backend="triton"), plain)
    for r in (0.0, 2.0**-26):  # threshold 0: the kernel's no-drop path
        out = tk.triton_dropkey_attention(q, k, v, r, seed=1)
        torch.testing.assert_close(out.float(), plain.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@needs_triton
def test_layouts_leading_dims_and_reproducibility():
    """timm's permuted qkv views, 3-D and 5-D inputs, Nq != Nk, dv != d; seeds reproduce, new draws differ."""
    batch, tokens, heads, dim = 2, 7, 3, 16
    x = torch.randn(batch, tokens, 3 * heads * dim, device=DEVICE, requires_grad=True)
    q, k, v = x.reshape(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = fn.dropkey_attention(q, k, v, 0.5, generator=3, backend="triton", all_dropped="undropped")
    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    ref = fn.dropkey_attention(qc, kc, vc, 0.5, generator=3, backend="reference", mask="hash", all_dropped="undropped")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), x)
    grads = torch.autograd.grad(ref.sum(), (qc, kc, vc))
    want = torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(batch, tokens, -1)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    for shape_q, shape_kv in (((6, 5, 16), (6, 9, 16)), ((2, 2, 2, 5, 16), (2, 2, 2, 4, 16)), ((5, 16), (3, 16))):
        q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
        k = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
        v = torch.randn(*shape_kv[:-1], 8, device=DEVICE, requires_grad=True)
        out = fn.dropkey_attention(q, k, v, 0.3, generator=4, backend="triton")
        ref = fn.dropkey_attention(q, k, v, 0.3, generator=4, backend="reference", mask="hash")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(
            torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    q, k, v = _qkv(nq=6, nk=6)
    a = fn.dropkey_attention(q, k, v, 0.3, generator=1, backend="triton")
    assert torch.equal(a, fn.dropkey_attention(q, k, v, 0.3, generator=1, backend="triton"))
    assert not torch.equal(a, fn.dropkey_attention(q, k, v, 0.3, generator=2, backend="triton"))
    torch.manual_seed(4)
    b = fn.dropkey_attention(q, k, v, 0.3, backend="triton")
    torch.manual_seed(4)
    assert torch.equal(b, fn.dropkey_attention(q, k, v, 0.3, backend="triton"))


@needs_triton
def test_empty_inputs():
    for q_shape, kv_lead in (((2, 3, 0, 16), (2, 3)), ((0, 3, 5, 16), (0, 3))):
        q = torch.randn(*q_shape, device=DEVICE, requires_grad=True)
        k = torch.randn(*kv_lead, 4, 16, device=DEVICE, requires_grad=True)
        v = torch.randn(*kv_lead, 4, 16, device=DEVICE, requires_grad=True)
        out = fn.dropkey_attention(q, k, v, 0.3, generator=0, backend="triton")
        assert out.shape == (*q_shape[:-1], 16)
        out.sum().backward()
        assert q.grad.shape == q.shape and torch.equal(k.grad, torch.zeros_like(k))


@interpreter_only
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_forward_and_backward_tiles_may_differ(monkeypatch, convention):
    """The mask is a pure function of (seed, slice, query, key): other tile shapes in forward and backward agree."""
    monkeypatch.setattr(tk, "INTERPRET_FWD_BLOCKS", (32, 16))
    monkeypatch.setattr(tk, "INTERPRET_BWD_BLOCKS", (16, 32))
    q, k, v = _qkv(nq=20, nk=35, seed=8)
    got, want = _fused_and_reference(q, k, v, 0.5, convention)
    _assert_matches(got, want, torch.float32)


@needs_triton
def test_saves_no_n_by_n_state_for_backward():
    """Saved for backward: q, k, v, out, a float32 log-sum-exp and an int8 flag per row; nothing of size Nq x Nk."""
    q, k, v = _qkv(batch=(2, 3), nq=33, nk=33, d=16, dv=16)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn.dropkey_attention(q, k, v, 0.3, generator=0, backend="triton")
    assert saved and all(shape[-2:] != (33, 33) for shape, _ in saved)
    extra = sum(size for _, size in saved) - 4 * (2 * 3 * 33 * 16 * 4)  # beyond q, k, v, out
    assert extra == 2 * 3 * 33 * (4 + 1)  # lse float32 + dead int8 per row


@needs_triton
def test_module_fast_and_reference_paths_agree():
    """DropKeyAttention(backend="triton"): the fused path and the weights path draw the same hash mask."""
    module = DropKeyAttention(32, num_heads=2, drop_ratio=0.5, backend="triton").to(DEVICE).train()
    x = torch.randn(2, 9, 32, device=DEVICE)
    module.set_generator(5)
    fast = module(x)
    module.set_generator(5)
    reference, weights = module(x, return_weights=True)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert (weights == 0).any()


@needs_triton
def test_unsupported_inputs_raise_value_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dtypes"):
        fn.dropkey_attention(q.double(), k.double(), v.double(), 0.1, backend="triton")
    big = torch.zeros(1, 2, 300, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        fn.dropkey_attention(big, big, big, 0.1, backend="triton")
    with pytest.raises(ValueError, match="all_dropped"):
        tk.triton_dropkey_attention(q, k, v, 0.1, seed=0, all_dropped="nan")


# --------------------------------------------------------------------------- GPU (compiled kernels)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("n", [65, 197, 577])
def test_cuda_vit_shapes_match_reference(dtype, convention, n):
    q, k, v = _qkv(batch=(2, 3), nq=n, nk=n, d=64, dv=64, dtype=dtype, seed=n)
    got, want = _fused_and_reference(q, k, v, 0.1, convention)
    _assert_matches(got, want, dtype)


@pytest.mark.gpu
@needs_triton
def test_cuda_auto_picks_triton_and_is_finite_at_high_ratio():
    q, k, v = _qkv(batch=(64, 4), nq=2, nk=2, d=64, dv=64, dtype=torch.float16, seed=1)
    out = fn.dropkey_attention(q, k, v, 0.9, generator=3)  # auto -> triton on CUDA
    ref = fn.dropkey_attention(q, k, v, 0.9, generator=3, backend="triton")
    assert torch.equal(out, ref) and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@needs_triton
def test_cuda_drop_rate_from_the_kernel_is_unbiased():
    """The kernel's mask recovered from the output (q = 0, zero convention) drops p = T / 2**24 within 5 SE."""
    n = 256
    q = torch.zeros(8, 4, n, 64, device="cuda")
    k = torch.randn(8, 4, n, 64, device="cuda")
    v = torch.eye(n, device="cuda").expand(8, 4, n, n).contiguous()
    out = fn.dropkey_attention(q, k, v, 0.1, all_dropped="zero", generator=0, backend="triton")
    dropped = (out == 0).double()
    p, count = hash_threshold(0.1) / 2**HASH_BITS, dropped.numel()
    assert_within_standard_errors(dropped.mean().item(), p, math.sqrt(p * (1 - p) / count), what="kernel drop rate")
    np.testing.assert_array_equal((out == 0).cpu().numpy(), hash_drop_mask(hash_seed(0), (8, 4, n, n), 0.1).numpy())


@pytest.mark.gpu
@needs_triton
# the deprecation warning comes from torch.compile internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_cuda_torch_compile_of_the_kernel_equals_eager():
    """A compiled ViT-style call (auto -> triton on CUDA) gives the eager kernel's values and gradients
    (dynamo may capture the kernel or break the graph around it; either must be correct)."""
    q, k, v = _qkv(batch=(2, 3), nq=65, nk=65, d=64, dv=64, dtype=torch.bfloat16, seed=5)
    compiled = torch.compile(lambda q, k, v: fn.dropkey_attention(q, k, v, 0.1, generator=7))
    out = compiled(q, k, v)
    ref = fn.dropkey_attention(q, k, v, 0.1, generator=7, backend="triton")
    torch.testing.assert_close(out, ref)
    for got, want in zip(
        torch.autograd.grad(out.float().sum(), (q, k, v)),
        torch.autograd.grad(ref.float().sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
