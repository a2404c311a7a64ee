"""Benchmark (GPU only): the fused Triton DropKey kernel against SDPA, FlexAttention, the reference and \
the paper's code.

For ViT-like shapes B x H x N x d with N in {65, 197, 577, 1024}, d = 64, H = 12,
bfloat16, drop ratio 0.1 and a batch B = --tokens // N large enough to fill the
device, this checks every variant's correctness first (on the timed inputs, against
the reference backend on the identical mask), then times them all in ONE run,
interleaved round-robin, with CUDA events:

- forward (inputs require grad, as in a training step) and step = forward +
  backward: median and min of ``--repeats`` after ``--warmup`` calls (the warm-up
  also runs Triton's autotuner and torch.compile); backward = step - forward
  (medians); ratios vs ``sdpa_nomask`` of the same run;
- peak memory: ``torch.cuda.max_memory_allocated`` during one step above the
  memory allocated before it;
- saved for backward: bytes of the tensors autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), split into N x N state (any saved
  tensor other than q, k, v or the output with at least one bit per logit) and the
  rest;
- the fraction of the memory-bandwidth floor reached: a fused kernel must at least
  read q, k, v and write the output (forward) and, in the backward, read q, k, v,
  the output and dO and write dq, dk, dv: 12 * B*H*N*d elements per step. Floor =
  those bytes / the device's bandwidth (a measured device-to-device copy, and the
  nominal figure where the device is known); fraction = floor / measured time.

Variants:
``sdpa_nomask``  ``F.scaled_dot_product_attention(q, k, v)`` forced to the flash kernel: the speed of light;
``triton``       ``dropkey_attention(backend="triton")``: the fused kernel with its hash mask;
``triton_nomask`` the same kernel at r = 0 (its mask compiled out): splits ``triton``'s gap to SDPA into
                 the kernel's own (triton_nomask / sdpa_nomask) and the mask's (triton / triton_nomask);
``sdpa_mask``    ``dropkey_attention(backend="sdpa")``: SDPA with a boolean mask (Bernoulli mask drawn per call);
``reference``    ``dropkey_attention(backend="reference", mask="hash")``: the materialised specification;
``paper``        :func:`dropkey.functional.paper_dropkey_attention`: the paper's two-line code;
``flex_hash``    compiled FlexAttention with a ``score_mod`` that computes the same hash mask (int64 ops; the
                 per-row half of the hash looked up from an O(B*H*N) table, as the Triton kernel computes it
                 once per row block); fully dropped rows give 0 there (the ``zero`` convention).

Targets (MET / NOT MET, from medians): ``triton`` step within 1.15x of
``sdpa_nomask`` at N = 197 and 577; ``triton`` step >= 3x faster than ``paper`` at
every N; zero bytes of N x N state saved for backward by ``triton``.

Results (device, versions, commit) go to benchmarks/results/attention_gpu.{md,json},
written atomically after every shape, so a run stopped by a time limit keeps the shapes
it finished (the report says PARTIAL). Without CUDA the script says so and exits with
status 1.

``--dry-run`` checks the script itself where there is no GPU: the same code on the CPU,
every variant checked and timed at one tiny shape, the Triton kernels through Triton's
interpreter (start Python with TRITON_INTERPRET=1). Its timings mean nothing; it writes
attention_gpu_dry_run.{md,json} only into an explicit --output. FlexAttention has no
backward on the CPU, so ``flex_hash`` reports that error there
(tests/test_bench_gpu.py checks its mask in a forward pass instead).

Usage: python benchmarks/bench_gpu.py [--quick | --dry-run] [--repeats 20] [--warmup 3] [--ratio 0.1]
       [--tokens 65536] [--heads 12] [--seq-lens 65,197,577,1024] [--variants ...] [--output DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dropkey.functional import dropkey_attention, paper_dropkey_attention
from dropkey.kernels import hash_mask as _hash
from dropkey.kernels import hash_threshold
from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LENS = (65, 197, 577, 1024)
HEAD_DIM = 64
# flex_hash last: its torch.compile is the slowest preparation (table and preparation order)
VARIANTS = ("sdpa_nomask", "triton", "triton_nomask", "sdpa_mask", "reference", "paper", "flex_hash")
BASELINE = "sdpa_nomask"
FUSED = "triton"
FUSED_UNMASKED = "triton_nomask"
TARGET_STEP_VS_SDPA = 1.15
TARGET_STEP_VS_SDPA_AT = (197, 577)
TARGET_SPEEDUP_VS_PAPER = 3.0
# --dry-run: one tiny shape on the CPU, every variant through the same code as on a GPU
DRY_RUN = {"repeats": 2, "warmup": 1, "tokens": 130, "heads": 2, "seq_lens": (65,)}
# elements of B*H*N*d moved by an ideal fused kernel: forward q, k, v, out; backward q, k, v, out, dO, dq, dk, dv
FLOOR_ELEMENTS = {"forward": 4, "step": 12}
# nominal HBM bandwidth (GB/s) by device-name substring, for the nominal floor
NOMINAL_BANDWIDTH_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                         "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0,
                         "RTX 4090": 1008.0}
NO_GPU_MESSAGE = (
    "bench_gpu.py needs a CUDA device and torch.cuda.is_available() is False here: nothing was measured. "
    "Run it on a machine with an NVIDIA GPU and triton installed (pip install \"dropkey-lab[triton]\")."
)


# --------------------------------------------------------------------------- CPU-checkable parts


def _seq_lens(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq-lens must be comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--seq-lens must be comma-separated positive ints, got {text!r}")
    return values


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--ratio must be in (0, 1), got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens, 5 repeats: a smoke run")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script itself on the CPU (TRITON_INTERPRET=1): every variant at one tiny "
                             "shape; the timings mean nothing; files only with --output")
    parser.add_argument("--repeats", type=_positive, default=None, help="timed calls per variant (default 20, quick 5)")
    parser.add_argument("--warmup", type=_positive, default=None, help="untimed calls per variant first (default 3)")
    parser.add_argument("--ratio", type=_ratio, default=0.1, help="drop ratio (default 0.1)")
    parser.add_argument("--tokens", type=_positive, default=None,
                        help="B * N per shape, B = tokens // N (default 65536)")
    parser.add_argument("--heads", type=_positive, default=None, help="H (default 12)")
    parser.add_argument("--seq-lens", type=_seq_lens, default=None, help="comma-separated N (default 65,197,577,1024)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for attention_gpu[_quick|_dry_run].{md,json} (default benchmarks/results; "
                             "a dry run writes nothing without it)")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or BASELINE not in variants:
        parser.error(f"--variants must be a subset of {VARIANTS} including {BASELINE!r}, got {args.variants!r}")
    if args.quick and args.dry_run:
        parser.error("--quick and --dry-run exclude each other")
    args.variants = tuple(v for v in VARIANTS if v in variants)
    defaults = DRY_RUN if args.dry_run else {"repeats": 5 if args.quick else 20, "warmup": 3, "tokens": 65536,
                                              "heads": 12, "seq_lens": SEQ_LENS}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.tokens = max(1, args.tokens // 4)
    if args.output is None and not args.dry_run:
        args.output = RESULTS
    return args


def batch_for(n: int, tokens: int) -> int:
    """Batch size B = max(1, tokens // N): about the same work per shape."""
    return max(1, tokens // n)


def floor_seconds(shape: tuple[int, int, int, int], element_bytes: int, bandwidth_gbs: float) -> dict[str, float]:
    """The memory-bandwidth floor (seconds) of forward and step for a (B, H, N, d) problem."""
    batch, heads, n, d = shape
    return {
        mode: count * batch * heads * n * d * element_bytes / (bandwidth_gbs * 1e9)
        for mode, count in FLOOR_ELEMENTS.items()
    }


def nominal_bandwidth(device_name: str) -> Optional[float]:
    for key, value in NOMINAL_BANDWIDTH_GBS.items():  # most specific first
        if key in device_name:
            return value
    return None


def saved_state(
    call: Callable[[], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    logits: int,
    row_shapes: tuple[tuple[int, int], ...],
) -> dict[str, int]:
    """Bytes autograd saves for backward during ``call()`` (a forward), split into N x N state and the rest.

    Saved tensors sharing storage with ``inputs`` or the output are not counted (each
    storage once). A counted tensor is N x N state when it holds at least one bit per
    logit (``logits`` = B*H*Nq*Nk: float weights, bool or bit-packed masks) and is not
    shaped like q, k, v or the output (trailing dims in ``row_shapes``, e.g. (N, d)).
    """
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    known = {t.untyped_storage().data_ptr() for t in (*inputs, out)}
    seen: set[int] = set()
    state = rest = 0
    for t in saved:
        pointer = t.untyped_storage().data_ptr()
        if pointer in known or pointer in seen:
            continue
        seen.add(pointer)
        size = t.numel() * t.element_size()
        per_row = t.dim() >= 2 and tuple(t.shape[-2:]) in row_shapes
        if size * 8 >= logits and not per_row:
            state += size
        else:
            rest += size
    return {"nn_state_bytes": state, "other_saved_bytes": rest}


def _step_ratio(numerator: dict, denominator: dict) -> Optional[float]:
    if "step_median_ms" in numerator and "step_median_ms" in denominator:
        return numerator["step_median_ms"] / denominator["step_median_ms"]
    return None


def evaluate_targets(cases: list[dict]) -> dict[str, str]:
    """MET / NOT MET lines for the three targets, from the measured cases (NOT MEASURED where a value is missing)."""
    out: dict[str, str] = {}
    for case in cases:
        n, rows = case["shape"][2], case["variants"]
        fused, base, paper = rows.get(FUSED, {}), rows.get(BASELINE, {}), rows.get("paper", {})
        label = "x".join(str(s) for s in case["shape"])
        checks = []  # (target, measured value or None, met?, how the value reads)
        if n in TARGET_STEP_VS_SDPA_AT:
            ratio = _step_ratio(fused, base)
            checks.append((f"{FUSED} fwd+bwd within {TARGET_STEP_VS_SDPA}x of SDPA flash without mask", ratio,
                           ratio is not None and ratio <= TARGET_STEP_VS_SDPA, f"{ratio or 0:.2f}x"))
        speedup = _step_ratio(paper, fused)
        checks.append((f"{FUSED} fwd+bwd >= {TARGET_SPEEDUP_VS_PAPER}x faster than the paper's code", speedup,
                       speedup is not None and speedup >= TARGET_SPEEDUP_VS_PAPER, f"{speedup or 0:.2f}x"))
        state = fused.get("nn_state_bytes")
        checks.append((f"{FUSED} saves zero bytes of N x N state for backward", state, state == 0,
                       f"{state} bytes; other saved: {fused.get('other_saved_bytes')} bytes"))
        for target, value, met, reading in checks:
            out[f"{label}: {target}"] = (
                "NOT MEASURED" if value is None else f"{'MET' if met else 'NOT MET'} ({reading})"
            )
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def render(meta: dict, cases: list[dict]) -> str:
    """The markdown report: one table row per (shape, variant), then notes and targets."""
    lines = ["# DropKey attention on GPU", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN on the CPU**: a check that the script runs end to end (Triton interpreter, tiny shape). "
                  "The timings, ratios and targets below say nothing about GPU speed.", ""]
    done, planned = len(cases), meta.get("shapes_planned", len(cases))
    if done < planned:
        lines += [f"**PARTIAL**: {done} of {planned} shapes measured so far (the run stopped or is still running).", ""]
    lines += [
        f"Device: {meta['device']}; torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
        f"CUDA {meta['versions'].get('cuda')}; commit {meta['git_commit']}.",
        "",
        f"{meta['dtype']}, d = {HEAD_DIM}, H = {meta['heads']}, drop ratio {meta['ratio']}, B = {meta['tokens']} // N; "
        f"median (min) of {meta['repeats']} timed calls after {meta['warmup']} warm-up, round-robin over variants; "
        "fwd = forward with autograd graph, step = forward + backward, bwd = step - fwd (medians); "
        "ratios are of medians "
        f"vs `{BASELINE}` in the same run. Peak = max allocated during one step above the memory before it. "
        "Saved N x N = bytes of N x N state autograd keeps for backward. Floor = the memory-bandwidth floor of a fused "
        f"step (12 B*H*N*d elements) at the measured copy bandwidth ({meta['copy_bandwidth_gbs']:.0f} GB/s"
        + (f"; nominal {meta['nominal_bandwidth_gbs']:.0f} GB/s" if meta.get("nominal_bandwidth_gbs") else "")
        + "); % floor = floor / measured step time.",
        "",
        "| shape BxHxNxd | variant | check | fwd ms | bwd ms | step ms (min) | step / SDPA | fwd / SDPA | "
        "speed-up vs paper | peak MiB | saved N x N B | % floor (step) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        label = "x".join(str(s) for s in case["shape"])
        for name, row in case["variants"].items():
            if "error" in row:
                lines.append(f"| {label} | {name} | {row.get('check', '-')} | {row['error']} | | | | | | | | |")
                continue
            step = _cell(row, "step_median_ms", ".3f")
            if "step_min_ms" in row:
                step += f" ({row['step_min_ms']:.3f})"
            cells = [
                label, name, row.get("check", "-"),
                _cell(row, "forward_median_ms", ".3f"), _cell(row, "backward_median_ms", ".3f"), step,
                _cell(row, "step_vs_sdpa_nomask", ".2f") + "x", _cell(row, "forward_vs_sdpa_nomask", ".2f") + "x",
                _cell(row, "step_speedup_vs_paper", ".2f") + "x", _cell(row, "step_peak_mib", ".1f"),
                _cell(row, "nn_state_bytes", "d"), _cell(row, "step_floor_fraction_pct", ".1f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- {key}: {value}" for key, value in meta["targets"].items()]
    split = decompose(cases)
    if split:
        lines += ["", f"## Where `{FUSED}`'s time goes (step medians)", ""]
        lines += split
    return "\n".join(lines) + "\n"


def decompose(cases: list[dict]) -> list[str]:
    """Per shape: the kernel's own gap to SDPA (at r = 0) and the mask's cost (r > 0 vs r = 0), from step medians."""
    out = []
    for case in cases:
        rows = case["variants"]
        kernel = _step_ratio(rows.get(FUSED_UNMASKED, {}), rows.get(BASELINE, {}))
        mask = _step_ratio(rows.get(FUSED, {}), rows.get(FUSED_UNMASKED, {}))
        if kernel is not None and mask is not None:
            label = "x".join(str(s) for s in case["shape"])
            out.append(f"- {label}: kernel at r = 0 / SDPA {kernel:.2f}x; mask (r > 0 / r = 0) {mask:.2f}x")
    return out


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians and minima (ms) of forward and step timings; backward = step - forward of the medians."""
    row = {}
    for mode in ("forward", "step"):
        if times.get(mode):
            row[f"{mode}_median_ms"] = statistics.median(times[mode])
            row[f"{mode}_min_ms"] = min(times[mode])
    if "forward_median_ms" in row and "step_median_ms" in row:
        row["backward_median_ms"] = row["step_median_ms"] - row["forward_median_ms"]
    return row


def add_ratios(rows: dict[str, dict], floor: dict[str, float]) -> None:
    """Ratios vs the baseline and the paper, and the % of the bandwidth floor, in place."""
    base, paper = rows.get(BASELINE, {}), rows.get("paper", {})
    for row in rows.values():
        for mode in ("forward", "step"):
            key = f"{mode}_median_ms"
            if key not in row:
                continue
            if key in base:
                row[f"{mode}_vs_sdpa_nomask"] = row[key] / base[key]
            if key in paper:
                row[f"{mode}_speedup_vs_paper"] = paper[key] / row[key]
            row[f"{mode}_floor_fraction_pct"] = 100.0 * floor[mode] * 1e3 / row[key]


# --------------------------------------------------------------------------- the run (CUDA; the CPU in a dry run)


def _flex_variant(ratio: float, shape: tuple[int, int, int, int], seed: int, device: torch.device) -> Callable:
    """Compiled FlexAttention whose ``score_mod`` drops the hash mask of ``seed`` for inputs of ``shape``.

    The per-row half of the hash (``hash_row_keys``, O(B*H*N)) and the key terms are looked up
    from tables, as the Triton kernel computes them once per row block; only ``hash_bits`` (one
    fmix32) runs per logit. Computing the whole hash inline made the compilation grow
    exponentially with the hash's depth (torch 2.13 CPU: 12 s for one fmix32, 24 s for two,
    over 10 minutes and 10 GB for the full hash's four).
    """
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, n, _ = shape
    threshold = hash_threshold(ratio)
    row_keys = _hash.hash_row_keys(seed, batch * heads, n, device=device).view(batch, heads, n)
    column_terms = _hash.hash_column_terms(n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, q_idx, kv_idx):
        bits = _hash.hash_bits(row_keys[b, h, q_idx], column_terms[kv_idx])
        return torch.where((bits >> (32 - _hash.HASH_BITS)) < threshold, float("-inf"), score)

    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod)


def make_variant(
    name: str, ratio: float, shape: tuple[int, int, int, int], seed: int, device: torch.device
) -> Callable:
    """The callable (q, k, v) -> out of a variant for inputs of ``shape`` on ``device``; hash variants use ``seed``."""
    if name == "sdpa_nomask":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return sdpa_flash
    if name == "triton":
        return lambda q, k, v: dropkey_attention(q, k, v, ratio, generator=seed, backend="triton")
    if name == "triton_nomask":  # dropkey_attention at r = 0 is plain attention: call the kernel itself
        from dropkey.kernels import triton_attention

        return lambda q, k, v: triton_attention(q, k, v, 0.0, seed=_hash.hash_seed(seed))
    if name == "sdpa_mask":
        return lambda q, k, v: dropkey_attention(q, k, v, ratio, generator=seed, backend="sdpa", mask="bernoulli")
    if name == "flex_hash":
        return _flex_variant(ratio, shape, _hash.hash_seed(seed), device)
    if name == "reference":
        return lambda q, k, v: dropkey_attention(q, k, v, ratio, generator=seed, backend="reference", mask="hash")
    if name == "paper":
        return lambda q, k, v: paper_dropkey_attention(
            q, k, v, ratio, generator=torch.Generator(device).manual_seed(seed)
        )
    raise ValueError(f"unknown variant {name!r}")


def _expected(name: str, q, k, v, ratio: float, seed: int) -> Optional[torch.Tensor]:
    """float32 reference output on the identical mask."""
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    if name in ("triton", "reference"):
        return dropkey_attention(q32, k32, v32, ratio, generator=seed, backend="reference", mask="hash")
    if name == "flex_hash":
        return dropkey_attention(
            q32, k32, v32, ratio, generator=seed, backend="reference", mask="hash", all_dropped="zero"
        )
    if name == "sdpa_mask":
        return dropkey_attention(q32, k32, v32, ratio, generator=seed, backend="reference", mask="bernoulli")
    if name == "paper":  # the same bernoulli draw on the same generator state; uniform rows (bf16 -1e12 overflow-free)
        gen = torch.Generator(q.device).manual_seed(seed)
        shape = (*q.shape[:-1], k.shape[-2])
        drop = torch.bernoulli(torch.ones(shape, device=q.device, dtype=q.dtype) * ratio, generator=gen).bool()
        from dropkey.functional import attention_from_keep_mask

        return attention_from_keep_mask(q32, k32, v32, ~drop, backend="reference")
    return F.scaled_dot_product_attention(q32, k32, v32)


def check_variant(name: str, method: Callable, q, k, v, ratio: float, seed: int) -> str:
    """Correctness on the timing inputs: output vs the float32 reference on the same mask; finite grads.

    The inputs of the timed shape itself, and the callable that will be timed: a compiled variant
    (flex_hash) compiles once per shape, not once for a check shape and again for timing.
    """
    out = method(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    if not (torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)):
        return "FAIL (not finite)"
    want = _expected(name, q, k, v, ratio, seed)
    error = (out.float() - want).abs().max().item()
    tolerance = 3e-2 * max(1.0, want.abs().max().item())
    return f"ok ({error:.1e})" if error <= tolerance else f"FAIL ({error:.1e} > {tolerance:.1e})"


def _inputs(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3))
    return q, k, v, torch.randn(shape, device=device, generator=g, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(call: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock on the CPU (dry run)."""
    if device.type != "cuda":
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory of one step above the memory allocated before it (CUDA's allocator)."""
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_case(shape, variants, ratio, repeats, warmup, dtype, copy_gbs, device, seed=7) -> dict:
    batch, heads, n, d = shape
    rows: dict[str, dict] = {}
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    q, k, v, grad = _inputs(shape, dtype, device)
    for name in variants:
        row: dict = {}
        rows[name] = row
        try:
            method = make_variant(name, ratio, shape, seed, device)
            row["check"] = check_variant(name, method, q, k, v, ratio, seed)

            def forward(method=method):
                return method(q, k, v)

            def step(method=method):
                for t in (q, k, v):
                    t.grad = None
                method(q, k, v).backward(grad)

            for _ in range(warmup):
                forward()
                step()
            _synchronize(device)
            row.update(saved_state(forward, (q, k, v), batch * heads * n * n, ((n, d),)))
            for t in (q, k, v):
                t.grad = None
            if device.type == "cuda":  # the CPU (dry run) has no allocator statistics
                row["step_peak_mib"] = _step_peak_mib(step, device)
            calls[name] = {"forward": forward, "step": step}
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as error:  # a variant unavailable here (e.g. flex on an old torch) must not stop the run
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    times = {name: {"forward": [], "step": []} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():  # round-robin
            for mode in ("forward", "step"):
                times[name][mode].append(_time_ms(call[mode], device))
    for name in calls:
        rows[name].update(summarise(times[name]))
    floor = floor_seconds(shape, torch.finfo(dtype).bits // 8, copy_gbs)
    add_ratios(rows, floor)
    return {"shape": list(shape), "floor_ms": {mode: 1e3 * s for mode, s in floor.items()}, "variants": rows}


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 2048, repeats: int = 10) -> float:
    """Achievable bandwidth: a device-to-device copy reads and writes each byte (median of ``repeats``)."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_time_ms(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * src.numel() / (statistics.median(times) * 1e-3) / 1e9


def versions() -> dict[str, str]:
    out = dict(provenance()["versions"])
    try:
        out["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        out["triton"] = "not installed"
    out["cuda"] = str(torch.version.cuda)
    return out


def dry_run_problem() -> Optional[str]:
    """Why a dry run cannot run here (None if it can): it needs triton and its interpreter."""
    try:
        from dropkey.kernels import triton_dropkey
    except ImportError as error:
        return f"--dry-run runs the Triton kernels under Triton's interpreter, and triton does not import: {error}"
    if not triton_dropkey.INTERPRETED:
        return ("--dry-run runs the Triton kernels under Triton's interpreter: start Python with TRITON_INTERPRET=1 "
                "in the environment (Triton reads it when it is first imported)")
    return None


def write_results(output: Path, stem: str, meta: dict, cases: list[dict]) -> str:
    """Writes ``stem``.md and .json into ``output`` atomically; returns the markdown."""
    text = render(meta, cases)
    write_text_atomic(output / f"{stem}.md", text)
    write_json_atomic(output / f"{stem}.json", {"meta": meta, "cases": cases})
    return text


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        problem = dry_run_problem()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        device = torch.device("cpu")
        device_name = f"CPU ({platform.processor() or platform.machine()}), dry run: Triton interpreter"
    elif not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 1
    else:
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
    dtype = torch.bfloat16
    record = provenance(seed=7)
    meta = {
        "device": device_name,
        "dry_run": args.dry_run,
        "versions": versions(),
        "git_commit": record["git_commit"],
        "provenance": record,
        "dtype": str(dtype).replace("torch.", ""),
        "heads": args.heads,
        "tokens": args.tokens,
        "ratio": args.ratio,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device, megabytes=64 if args.dry_run else 2048),
        "nominal_bandwidth_gbs": None if args.dry_run else nominal_bandwidth(device_name),
        "shapes_planned": len(args.seq_lens),
    }
    stem = "attention_gpu" + ("_dry_run" if args.dry_run else "_quick" if args.quick else "")
    cases: list[dict] = []
    for n in args.seq_lens:
        shape = (batch_for(n, args.tokens), args.heads, n, HEAD_DIM)
        print(f"  {shape} ...", file=sys.stderr, flush=True)
        cases.append(run_case(shape, args.variants, args.ratio, args.repeats, args.warmup, dtype,
                              meta["copy_bandwidth_gbs"], device))
        meta["targets"] = evaluate_targets(cases)
        if args.output is not None:  # after every shape: a time limit or a crash keeps the shapes done
            text = write_results(args.output, stem, meta, cases)
    if args.output is None:
        text = render(meta, cases)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
