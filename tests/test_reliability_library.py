"""Issue 15, the attention library's part: NaN in -> NaN out on every backend, float16 logits without
overflow, one rule for caller-blanked rows, a clear ValueError for every bad input, and a kernel
cache that never loads a truncated or planted library. Each test failed on the code before the fix."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dropkey import functional as fn
from dropkey import regularisers
from dropkey.kernels import cpu_kernel
from dropkey.kernels.kernel_cache import digest_path, verified_library
from dropkey.models import ViTConfig, create_model
from dropkey.modules import DropKeyAttention

NAN_AT = (0, 1, 2, 1)  # (batch, head, token, feature) of the NaN


def _qkv(seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 5, 4, generator=g).to(dtype) for _ in range(3)]


def _expected_nan(where: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The documented rule (docs/attention.md, "NaN"): q's row i -> output row i; any key -> every row
    of that (batch, head); v[j, c] -> column c of every row of that (batch, head)."""
    b, h, i, c = NAN_AT
    expected = torch.zeros(shape, dtype=torch.bool)
    if where == "q":
        expected[b, h, i, :] = True
    elif where == "k":
        expected[b, h] = True
    else:
        expected[b, h, :, c] = True
    return expected


# --------------------------------------------------------------------------- item 3: NaN in, NaN out


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", fn.BACKENDS)
def test_nan_reaches_the_output_on_every_backend(backend, where, training):
    # Before: eval on auto/sdpa/fused/cpp gave a row of zeros for a NaN in q; training on reference,
    # cpp and triton (and auto, which picks cpp) hid a NaN key in the rows that dropped it.
    # ("undropped": no row falls back to a constant.) Eight seeds: masks that keep and that drop
    # the NaN key in some rows.
    tensors = _qkv()
    tensors["qkv".index(where)][NAN_AT] = float("nan")
    for seed in range(8):
        out = fn.dropkey_attention(*tensors, 0.3, training=training, backend=backend, generator=seed,
                                   all_dropped="undropped")
        assert torch.equal(torch.isnan(out), _expected_nan(where, tuple(out.shape))), seed


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", fn.BACKENDS)
def test_nan_reaches_the_output_of_the_module(backend, where, fused_attn, training):
    module = DropKeyAttention(8, 2, variant=regularisers.create("dropkey", all_dropped="undropped"), drop_ratio=0.3,
                              backend=backend, fused_attn=fused_attn, generator=3).train(training)
    tensors = _qkv()
    tensors["qkv".index(where)][NAN_AT] = float("nan")
    out, _ = module.attend(*tensors)
    assert torch.equal(torch.isnan(out), _expected_nan(where, tuple(out.shape)))


@pytest.mark.parametrize("convention", ["zero", "uniform", "undropped"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", fn.HASH_BACKENDS)
def test_the_kernels_put_nan_where_the_reference_does(backend, where, convention):
    # The same hash mask on reference: NaN exactly where it is, under each all_dropped convention
    # (a zero/uniform all-dropped row ignores its logits). Before: cpp and triton hid a dropped NaN
    # key; triton took a NaN q row for an all-dropped one (its running max skips NaN) and gave it
    # mean(v) under "uniform". r = 0.6 on 5 keys: rows that drop everything, too.
    tensors = _qkv(seed=4)
    tensors["qkv".index(where)][NAN_AT] = float("nan")
    for seed in range(3):
        args = dict(training=True, generator=seed, all_dropped=convention)
        out = fn.dropkey_attention(*tensors, 0.6, backend=backend, **args)
        expected = fn.dropkey_attention(*tensors, 0.6, backend="reference", mask="hash", **args)
        assert torch.equal(torch.isnan(out), torch.isnan(expected)), seed
        torch.testing.assert_close(out, expected, equal_nan=True)


def test_nan_reaches_the_output_of_timms_plain_fused_call():
    # backend="auto", eval: the module's own verbatim SDPA call (timm's), not plain_attention
    module = DropKeyAttention(8, 2).eval()
    q, k, v = _qkv()
    q[NAN_AT] = float("nan")
    assert torch.equal(torch.isnan(module.attend(q, k, v)[0]), _expected_nan("q", (2, 2, 5, 4)))


# --------------------------------------------------------------------------- item 4: float16 logits, blanked rows


def test_float16_reference_is_exact_at_logits_near_3e4():
    # q . k = 6e4 * 2 > 65504: the float16 product overflowed (NaN after the softmax) before.
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 2, 6, 4), 120.0) + torch.rand(1, 2, 6, 4, generator=g)
    k = torch.full((1, 2, 6, 4), 125.0) + torch.rand(1, 2, 6, 4, generator=g)
    v = torch.randn(1, 2, 6, 4, generator=g)
    q16, k16, v16 = (t.half() for t in (q, k, v))
    logits = (q16.float() @ k16.float().transpose(-2, -1)) / 2.0
    assert logits.min() > 2.9e4  # the regime of the report
    expected = torch.softmax(logits, dim=-1) @ v16.float()  # float32 from the same float16 inputs
    for training in (False, True):
        out = fn.dropkey_attention(q16, k16, v16, 0.2, training=training, backend="reference", generator=1,
                                   all_dropped="undropped")
        assert torch.isfinite(out).all()
        if not training:  # the only rounding left is float16 weights and output: 2 ulps of |v| <= 4
            torch.testing.assert_close(out.float(), expected, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(fn.plain_attention(q16, k16, v16, backend="reference"),
                               fn.plain_attention(q16, k16, v16, backend="sdpa"), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("backend", fn.BACKENDS)
def test_a_caller_blanked_row_is_zero_on_every_backend(backend, mask_kind, fused_attn, training):
    module = DropKeyAttention(8, 2, drop_ratio=0.3, backend=backend, fused_attn=fused_attn,
                              generator=2).train(training)
    q, k, v = (t.requires_grad_() for t in _qkv())
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[2] = False  # query 2 may attend to no key
    allowed[3, :2] = False
    mask = allowed if mask_kind == "bool" else torch.zeros(5, 5).masked_fill(~allowed, float("-inf"))
    out, _ = module.attend(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isfinite(out).all()
    out.sum().backward()  # and no NaN in the gradients either
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- items 5 and 9: bad inputs


@pytest.mark.parametrize(
    "field, value",
    [("norm_eps", -1.0), ("norm_eps", math.nan), ("norm_eps", 0.0), ("mlp_ratio", 1e-9), ("mlp_ratio", math.inf),
     ("qkv_bias", "no"), ("fused_attn", "no"), ("mask_seed", -5), ("backend", "cuda"), ("depth", 2**40),
     ("drop_ratio", 10**400)],
)
def test_create_model_names_each_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        create_model("vit_tiny_8", **{field: value})
    with pytest.raises(ValueError, match=field):
        ViTConfig(**{field: value})


def test_create_model_names_a_name_that_is_not_a_string():
    with pytest.raises(ValueError, match="name must be one of"):
        create_model(["vit_tiny_8"])


@pytest.mark.parametrize("backend", fn.BACKENDS)
def test_bad_attention_arguments_are_value_errors_naming_them(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="drop_ratio"):
        fn.dropkey_attention(q, k, v, 10**400, backend=backend)
    with pytest.raises(ValueError, match="generator"):
        fn.dropkey_attention(q, k, v, 0.1, generator=2**64, backend=backend)
    empty = torch.zeros(2, 2, 5, 0)
    with pytest.raises(ValueError, match="feature size d >= 1"):
        fn.dropkey_attention(empty, empty, v, 0.1, backend=backend)
    with pytest.raises(ValueError, match="feature size d >= 1"):
        fn.plain_attention(empty, empty, v, backend=backend)


def test_bad_module_arguments_are_value_errors_naming_them():
    with pytest.raises(ValueError, match="drop_ratio"):
        DropKeyAttention(8, 2, drop_ratio=10**400)
    with pytest.raises(ValueError, match="generator"):
        DropKeyAttention(8, 2, generator=2**64)
    for name in ("qkv_bias", "proj_bias", "fused_attn", "record_weights"):
        with pytest.raises(ValueError, match=name):
            DropKeyAttention(8, 2, **{name: "no"})
    module = DropKeyAttention(8, 2)
    for x in (torch.randn(5, 8), torch.randn(1, 5, 7), torch.ones(1, 5, 8, dtype=torch.long), [[0.0] * 8]):
        with pytest.raises(ValueError, match="x must be a floating tensor"):
            module(x)


@pytest.mark.parametrize("dim, heads", [(2**64, 1), (2**64, 2**64)])
def test_an_absurd_module_size_is_a_value_error(dim, heads):
    # Found by the slow fuzz of DropKeyAttention (tests/test_fuzz_library.py, which now draws small sizes):
    # torch.empty failed with a TypeError not naming dim; now every size is bounded by MAX_SIZE.
    with pytest.raises(ValueError, match="dim|num_heads"):
        DropKeyAttention(dim, heads)


# --------------------------------------------------------------------------- item 8: the kernel cache

needs_compiler = pytest.mark.skipif(not cpu_kernel.cpp_available(), reason="needs a working C++ compiler")


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A kernel cache holding one genuine build (library and digest record), made once for this module."""
    root = tmp_path_factory.mktemp("kernel-cache")
    saved = os.environ.get("DROPKEY_LAB_KERNEL_CACHE")
    os.environ["DROPKEY_LAB_KERNEL_CACHE"] = str(root)
    cpu_kernel._load.cache_clear()
    try:
        assert cpu_kernel.cpp_available(), cpu_kernel.cpp_unavailable_reason()
        library = cpu_kernel.kernel_library_path()
    finally:
        os.environ.pop("DROPKEY_LAB_KERNEL_CACHE")
        if saved is not None:
            os.environ["DROPKEY_LAB_KERNEL_CACHE"] = saved
        cpu_kernel._load.cache_clear()
    assert digest_path(library).exists()
    return library


def _copy_genuine(genuine: Path, root: Path) -> Path:
    """The genuine library and its digest record, copied to the same place under the cache ``root``."""
    library = root / genuine.parent.name / genuine.name
    library.parent.mkdir(parents=True)
    for path in (genuine, digest_path(genuine)):
        shutil.copy2(path, library.parent / path.name)
    return library


def _planted_library(path: Path, marker: Path) -> None:
    """A shared library whose constructor writes ``marker`` when it is loaded."""
    source = path.with_suffix(".c")
    source.write_text(
        '#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
        f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n'
    )
    done = subprocess.run([cpu_kernel._compiler(), "-x", "c", "-shared", "-fPIC", str(source), "-o", str(path)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"cannot compile a test library: {done.stderr[-500:]}")
    source.unlink()


_CHECK_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
import dropkey.functional as fn
q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
out = fn.dropkey_attention(q, k, v, 0.25, backend="cpp", generator=11)
torch.testing.assert_close(out, fn.dropkey_attention(q, k, v, 0.25, backend="reference", mask="hash", generator=11))
"""


def _run_fresh_process(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DROPKEY_LAB_KERNEL_CACHE": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHECK_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env)


@needs_compiler
def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(built_cache, tmp_path):
    # Before: ctypes.CDLL mapped the truncated file and the process died of SIGBUS.
    library = _copy_genuine(built_cache, tmp_path / "cache")
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])
    done = _run_fresh_process(tmp_path / "cache")
    assert done.returncode == 0, done.stderr  # no crash, and the kernel computes the right thing
    assert "does not match the size and SHA-256" in done.stderr and "rebuilding" in done.stderr
    assert library.read_bytes()[:4] == b"\x7fELF" and len(library.read_bytes()) > len(data) // 2


@needs_compiler
def test_a_planted_library_is_never_loaded(built_cache, tmp_path, monkeypatch):
    # Before: any file at the cache path was loaded, running its constructor.
    library = _copy_genuine(built_cache, tmp_path / "cache")
    marker = tmp_path / "constructor-ran"
    _planted_library(library, marker)  # keeps the genuine digest record beside it
    monkeypatch.setenv("DROPKEY_LAB_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernel._load.cache_clear()
    try:
        assert cpu_kernel.cpp_available(), cpu_kernel.cpp_unavailable_reason()
        assert cpu_kernel.kernel_library_path() == library
    finally:
        cpu_kernel._load.cache_clear()
    assert not marker.exists()
    assert verified_library(library)  # rebuilt in its place, with its own digest record


@needs_compiler
@pytest.mark.skipif(os.name != "posix", reason="POSIX owners and modes")
def test_a_cache_others_can_write_is_not_used(built_cache, tmp_path, monkeypatch, caplog):
    # A planted library with a matching digest record, in a folder others can write: not trusted at all.
    library = _copy_genuine(built_cache, tmp_path / "cache")
    marker = tmp_path / "constructor-ran"
    _planted_library(library, marker)
    from dropkey.kernels.kernel_cache import install_library

    shutil.copy2(library, tmp_path / "planted.so")
    install_library(tmp_path / "planted.so", library)  # its own, matching, digest record
    library.parent.chmod(0o777)
    monkeypatch.setenv("DROPKEY_LAB_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernel._load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cpu_kernel.cpp_available(), cpu_kernel.cpp_unavailable_reason()
        q, k, v = _qkv()
        out = fn.dropkey_attention(q, k, v, 0.3, backend="cpp", generator=4)
        ref = fn.dropkey_attention(q, k, v, 0.3, backend="reference", mask="hash", generator=4)
        torch.testing.assert_close(out, ref)
    finally:
        cpu_kernel._load.cache_clear()
    assert not marker.exists()
    assert "not private" in caplog.text and "writable by group or others" in caplog.text
