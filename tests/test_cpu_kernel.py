"""The ``cpp`` backend: the fused C++ CPU kernel (dropkey/kernels/dropkey_cpu.cpp).

Its specification is the ``reference`` backend on the same hash mask
(``mask="hash"``): outputs and gradients must agree for every all-dropped convention,
tile count, layout and leading shape. The kernel is compiled at first use; where a
C++ compiler exists on Linux it must build (a silently skipped kernel would hide a
broken build), elsewhere these tests skip.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch

import dropkey.functional as fn
from dropkey.kernels import cpu_kernel, hash_drop_mask, hash_mask
from dropkey.kernels.cpu_kernel import CppKernelUnavailableError, cpp_attention, cpp_available

CONVENTIONS = fn.ALL_DROPPED_CONVENTIONS
needs_kernel = pytest.mark.skipif(
    not cpp_available(), reason=f"C++ kernel unavailable: {cpu_kernel.cpp_unavailable_reason()}"
)


def _qkv(lead=(2, 3), nq=5, nk=4, d=8, dv=6, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*lead, nq, d, generator=g) * scale).requires_grad_()
    k = torch.randn(*lead, nk, d, generator=g).requires_grad_()
    v = torch.randn(*lead, nk, dv, generator=g).requires_grad_()
    return q, k, v


def _reference(q, k, v, seed, r, convention, scale=None):
    keep = hash_drop_mask(seed, (*q.shape[:-1], k.shape[-2]), r).logical_not_()
    return fn.attention_from_keep_mask(q, k, v, keep, all_dropped=convention, scale=scale, backend="reference")


def _grads(out, inputs):
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    return torch.autograd.grad((out * weight).sum(), inputs)


def test_kernel_builds_where_a_compiler_exists():
    if not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("the build is only required on Linux with a C++ compiler")
    assert cpp_available(), cpu_kernel.cpp_unavailable_reason()


# --------------------------------------------------------------------------- the specification


@needs_kernel
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(
    "lead,nq,nk,d,dv,r",
    [
        ((2, 3), 65, 65, 64, 64, 0.1),  # one tile per slice
        ((2, 2), 5, 3, 16, 16, 0.6),  # all-dropped rows frequent (0.6**3 = 0.22)
        ((1, 4), 2, 2, 8, 8, 0.9),  # 81% all-dropped rows
        ((1, 2), 300, 70, 32, 24, 0.3),  # 2 query tiles (234 + 66 rows); d != dv
        ((1, 1), 40, 3000, 16, 8, 0.5),  # 8-row tiles over long rows; Nq != Nk
    ],
)
def test_matches_reference_on_the_same_hash_mask(convention, lead, nq, nk, d, dv, r):
    q, k, v = _qkv(lead, nq, nk, d, dv, seed=nq + nk)
    seed = 2**63 + 12345  # the upper seed word matters too
    out = cpp_attention(q, k, v, r, seed=seed, all_dropped=convention)
    ref = _reference(q, k, v, seed, r, convention)
    torch.testing.assert_close(out, ref)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


@needs_kernel
def test_dropkey_attention_cpp_equals_reference_with_the_hash_mask():
    """Through the public API: one seed drawn from the generator, the same mask as reference + mask="hash"."""
    q, k, v = _qkv(nq=9, nk=9)
    out = fn.dropkey_attention(q, k, v, 0.4, generator=7, backend="cpp", scale=0.3)
    ref = fn.dropkey_attention(q, k, v, 0.4, generator=7, backend="reference", mask="hash", scale=0.3)
    torch.testing.assert_close(out, ref)
    assert not torch.equal(out, fn.dropkey_attention(q, k, v, 0.4, generator=8, backend="cpp", scale=0.3))
    torch.manual_seed(3)
    first = fn.dropkey_attention(q, k, v, 0.4, backend="auto")
    torch.manual_seed(3)
    assert torch.equal(first, fn.dropkey_attention(q, k, v, 0.4, backend="auto"))


# E[w] against theory.expected_attention: tests/test_functional.py::test_cpp_kernel_expected_weights_match_theory


# --------------------------------------------------------------------------- layouts, shapes, threads


@needs_kernel
def test_reads_permuted_qkv_in_place_and_returns_a_vit_friendly_layout():
    """q, k, v as the permuted views of a fused qkv projection (B, N, 3, H, d) give the contiguous result,
    and out.transpose(1, 2) is contiguous (so a ViT's reshape to (B, N, H * d) is free)."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(3, 17, 3, 4, 8, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = cpp_attention(q, k, v, 0.3, seed=11)
    dense = cpp_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.3, seed=11)
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-7)
    assert out.transpose(1, 2).is_contiguous()
    # a non-unit feature stride is copied first, not misread
    q_strided = torch.randn(3, 4, 17, 16, generator=g)[..., ::2]
    torch.testing.assert_close(
        cpp_attention(q_strided, k, v, 0.3, seed=11), cpp_attention(q_strided.contiguous(), k, v, 0.3, seed=11)
    )


@needs_kernel
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 2, 3)])
def test_leading_dims(lead):
    q, k, v = _qkv(lead, nq=6, nk=7, d=4, dv=3)
    out = cpp_attention(q, k, v, 0.5, seed=3, all_dropped="zero")
    assert out.shape == (*lead, 6, 3)
    torch.testing.assert_close(out, _reference(q, k, v, 3, 0.5, "zero"))
    for got, want in zip(_grads(out, (q, k, v)), _grads(_reference(q, k, v, 3, 0.5, "zero"), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


@needs_kernel
def test_a_single_query_row_with_any_row_stride():
    """(B, H, 1, d) views whose (unused) row stride is below d, as a transpose can make them."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 8, 1, generator=g).transpose(-1, -2).requires_grad_()  # row stride 1 < d = 8
    _, k, v = _qkv(nq=1, nk=6, d=8, dv=5)
    assert q.stride(-2) < q.shape[-1]
    out = cpp_attention(q, k, v, 0.4, seed=6, all_dropped="undropped")
    ref = _reference(q, k, v, 6, 0.4, "undropped")
    torch.testing.assert_close(out, ref)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    q, k, v = _qkv((3, 2), nq=300, nk=80, d=16, dv=16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = cpp_attention(q, k, v, 0.2, seed=5)
            results.append((out, *_grads(out, (q, k, v))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_kernel
def test_empty_inputs():
    q, k, v = _qkv(nq=0, nk=3)
    out = cpp_attention(q, k, v, 0.5, seed=1)
    assert out.shape == (2, 3, 0, 6)
    assert all(
        g.abs().sum() == 0 for g in torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True) if g is not None
    )


# --------------------------------------------------------------------------- finiteness


@needs_kernel
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_finite_at_high_ratio_and_large_logits(convention):
    """r = 0.9, N = 2 (81% all-dropped rows) and logits of size ~1e3: outputs and gradients finite."""
    q, k, v = _qkv((64, 2), nq=2, nk=2, d=8, dv=8, scale=300.0)
    out = cpp_attention(q, k, v, 0.9, seed=4, all_dropped=convention)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v)))
    torch.testing.assert_close(out, _reference(q, k, v, 4, 0.9, convention))


@needs_kernel
def test_nan_inputs_stay_nan():
    """A NaN in q makes its own output row NaN (never hidden) and leaves the other rows finite."""
    q, k, v = _qkv(nq=3, nk=5)
    with torch.no_grad():
        q[0, 0, 1, 0] = float("nan")
    out = cpp_attention(q, k, v, 0.2, seed=1)
    assert torch.isnan(out[0, 0, 1]).all()
    out[0, 0, 1] = 0.0
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- errors and fallback


@needs_kernel
def test_unsupported_inputs_raise_value_errors():
    q, k, v = _qkv()
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match="backend='cpp' runs on CPU float32 tensors; q is torch"):
            fn.dropkey_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.1, backend="cpp")
    with pytest.raises(ValueError, match="all_dropped must be one of"):
        cpp_attention(q, k, v, 0.1, seed=1, all_dropped="nan")
    with pytest.raises(ValueError, match="seed must be an int"):
        cpp_attention(q, k, v, 0.1, seed=-1)
    with pytest.raises(ValueError, match="drop_ratio"):
        cpp_attention(q, k, v, 1.0, seed=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        fn.attention_from_keep_mask(q, k, v, torch.ones(5, 4, dtype=torch.bool), backend="cpp")


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader with its own cache dir and no memory of earlier loads; restored afterwards."""
    monkeypatch.setenv("DROPKEY_LAB_KERNEL_CACHE", str(tmp_path))
    cpu_kernel._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernel._load.cache_clear()


def test_disabled_kernel_falls_back_to_fused(fresh_loader, monkeypatch):
    monkeypatch.setenv("DROPKEY_LAB_CPP", "0")
    assert not cpp_available()
    assert "DROPKEY_LAB_CPP=0" in cpu_kernel.cpp_unavailable_reason()
    assert fn.resolve_backend("auto", "cpu", torch.float32) == ("fused", "bernoulli")
    q, k, v = _qkv()
    with pytest.raises(CppKernelUnavailableError, match="DROPKEY_LAB_CPP=0"):
        fn.dropkey_attention(q, k, v, 0.1, backend="cpp")
    auto = fn.dropkey_attention(q, k, v, 0.3, generator=2)
    assert torch.equal(auto, fn.dropkey_attention(q, k, v, 0.3, generator=2, backend="fused"))


def test_a_failing_compiler_is_reported(fresh_loader, monkeypatch, caplog):
    fake = fresh_loader / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no such luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with caplog.at_level(logging.WARNING, logger="dropkey.kernels.cpu_kernel"):
        assert not cpp_available()
    assert "fake compiler: no such luck" in cpu_kernel.cpp_unavailable_reason()
    assert "unavailable" in caplog.text
    assert not list(fresh_loader.rglob("*.so"))  # no half-written library left behind


@pytest.mark.skipif(not cpp_available(), reason="needs a working compiler")
def test_the_build_is_cached_and_a_broken_cache_is_rebuilt(fresh_loader):
    assert cpp_available()
    (library,) = list(fresh_loader.rglob("dropkey_cpu.so"))
    assert library == cpu_kernel.kernel_library_path()
    built = library.stat().st_mtime_ns
    cpu_kernel._load.cache_clear()
    assert cpp_available() and library.stat().st_mtime_ns == built  # reused, not recompiled
    # A corrupt cached file (a new inode: this process keeps the loaded one mapped) is rebuilt
    # by a fresh process, which then computes the right thing.
    library.unlink()
    library.write_bytes(b"not a shared library")
    script = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from dropkey.kernels import cpu_kernel, hash_drop_mask\n"
        "import dropkey.functional as fn\n"
        "assert cpu_kernel.cpp_available(), cpu_kernel.cpp_unavailable_reason()\n"
        "q, k, v = (torch.randn(2, 5, 8) for _ in range(3))\n"
        "keep = hash_drop_mask(9, (2, 5, 5), 0.3).logical_not_()\n"
        "ref = fn.attention_from_keep_mask(q, k, v, keep, backend='reference')\n"
        "torch.testing.assert_close(cpu_kernel.cpp_attention(q, k, v, 0.3, seed=9), ref)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rebuilding" in done.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_the_cache_key_covers_source_flags_and_cpu(monkeypatch):
    base = cpu_kernel.kernel_library_path("c++")
    monkeypatch.setattr(cpu_kernel, "_cpu_identity", lambda: "another cpu")
    assert cpu_kernel.kernel_library_path("c++") != base
    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernel, "_FLAGS", cpu_kernel._FLAGS + ("-O2",))
    assert cpu_kernel.kernel_library_path("c++") != base


@needs_kernel
def test_module_default_backend_uses_the_kernel_and_its_paths_agree():
    """DropKeyAttention(backend="auto") on CPU float32: the fast path is the kernel (hash mask) and equals the
    reference path (weights materialised) drawn from the same generator state."""
    from dropkey.modules import DropKeyAttention

    torch.manual_seed(0)
    module = DropKeyAttention(32, 4, qkv_bias=True, drop_ratio=0.4).train()
    x = torch.randn(3, 10, 32, requires_grad=True)
    module.set_generator(5)
    fast = module(x)
    module.set_generator(5)
    reference, weights = module(x, return_weights=True)
    torch.testing.assert_close(fast, reference)
    assert (weights == 0).any()
    assert fn.resolve_backend("auto", "cpu", torch.float32) == ("cpp", "hash")
    for got, want in zip(torch.autograd.grad(fast.sum(), x), torch.autograd.grad(reference.sum(), x), strict=True):
        torch.testing.assert_close(got, want)


@needs_kernel
# the deprecation warning comes from torch.compile internals
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_keeps_the_kernel_in_one_graph():
    """The kernel is a pair of torch custom ops and its seed a tensor: torch.compile(fullgraph=True) traces
    dropkey_attention (auto and cpp, global RNG) without a graph break, and it equals the reference on the
    same hash mask, values and gradients."""
    q, k, v = _qkv(nq=9, nk=9)
    for backend in ("auto", "cpp"):
        compiled = torch.compile(
            lambda q, k, v, backend=backend: fn.dropkey_attention(q, k, v, 0.3, backend=backend), fullgraph=True
        )
        torch.manual_seed(4)
        out = compiled(q, k, v)
        torch.manual_seed(4)
        ref = fn.dropkey_attention(q, k, v, 0.3, backend="reference", mask="hash")
        torch.testing.assert_close(out, ref)
        for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
            torch.testing.assert_close(got, want)


def test_seed_tensor_round_trips_every_64_bit_seed():
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        assert hash_mask.seed_word(cpu_kernel.seed_tensor(seed)) == seed
    with pytest.raises(ValueError, match="seed must be an int or a one-element int64 tensor"):
        cpu_kernel.seed_tensor(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed must be an int or a one-element int64 tensor"):
        cpu_kernel.seed_tensor(torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="CPU tensor"):
        cpu_kernel.seed_tensor(torch.zeros(1, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 18446744073709551615\]"):
        cpu_kernel.seed_tensor(2**64)


@needs_kernel
def test_the_custom_ops_pass_torch_opcheck():
    """torch.library.opcheck: schema, fake (shape) implementation, autograd registration agree with the kernel."""
    q, k, v = _qkv((2, 3), nq=7, nk=5, d=8, dv=4)
    seed = cpu_kernel.seed_tensor(2**63 + 5)
    torch.library.opcheck(cpu_kernel._forward_op, (q, k, v, seed, 1 << 22, 0.3, 1))
    out, lse = cpu_kernel._forward_op(q.detach(), k.detach(), v.detach(), seed, 1 << 22, 0.3, 1)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        cpu_kernel._backward_op, (grad, q.detach(), k.detach(), v.detach(), out, lse, seed, 1 << 22, 0.3, 1)
    )
