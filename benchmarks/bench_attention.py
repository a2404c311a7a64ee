"""Benchmark: DropKey attention backends against SDPA without a mask and the paper's two-line code.

For ViT shapes (B x H x N x d) = 128x3x65x64, 64x6x197x64, 8x12x577x64 (issue 3's) and
128x4x65x16 (one attention layer of this suite's vit_tiny_32 at batch 128: head dim 16) in
float32 on CPU, drop ratio 0.1, this measures, in ONE run and interleaved round-robin (so
load from other processes hits every method alike):

- forward time (inputs require grad, so the autograd graph is recorded as in a
  training step) and forward+backward time: median (and min) of ``--repeats``
  repeats after ``--warmup`` warm-up calls, default ``torch.get_num_threads()``;
- peak extra memory, in a separate worker process (so that the timing process
  keeps glibc's default allocator behaviour): the rise of the process's peak
  resident set (Linux ``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs``) above the resident set before one call, with glibc's
  mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``) so that every large
  tensor is its own mapping and freed memory leaves the resident set. Reported in
  bytes per logit (B*H*N*N); gradients of q, k, v are reset to None before each
  call so they count the same for every method. A measurement, not an analytic
  count: it includes every temporary of the call (mask sampling included).

Methods: ``sdpa_nomask`` (``F.scaled_dot_product_attention(q, k, v)``: the speed of
light), ``paper`` (``attn + bernoulli(ones_like(attn) * r) * -1e12``, softmax, @ v),
and ``dropkey_attention`` with each CPU backend (``reference``, ``sdpa``, ``fused``, and
``cpp`` -- the C++ kernel ``auto`` picks -- where it builds).

Results (with machine, versions, commit) go to benchmarks/results/attention_cpu.{md,json}.
Usage: python benchmarks/bench_attention.py [--quick] [--repeats 7] [--warmup 2] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dropkey.functional import dropkey_attention, paper_dropkey_attention
from dropkey.kernels import cpp_available
from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((128, 3, 65, 64), (64, 6, 197, 64), (8, 12, 577, 64), (128, 4, 65, 16))
QUICK_SHAPES = ((32, 3, 65, 64), (16, 6, 197, 64), (2, 12, 577, 64), (32, 4, 65, 16))
# "cpp" only where the C++ kernel builds; the target rows are the backend "auto" picks on CPU
_CPP = cpp_available()
METHODS = ("sdpa_nomask", "paper", "reference", "sdpa", "fused") + (("cpp",) if _CPP else ())
DROPKEY_METHOD = "cpp" if _CPP else "fused"
TARGET_STEP_VS_SDPA = 1.3
TARGET_SPEEDUP_VS_PAPER_N197 = 2.0
TARGET_EXTRA_BYTES_PER_LOGIT = 1.0
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def make_method(name: str, ratio: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "sdpa_nomask":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "paper":
        return lambda q, k, v: paper_dropkey_attention(q, k, v, ratio)
    return lambda q, k, v: dropkey_attention(q, k, v, ratio, backend=name)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as stream:
        match = re.search(rf"{field}:\s+(\d+) kB", stream.read())
    assert match is not None
    return int(match.group(1)) * 1024


def _memory_probe_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def peak_extra_bytes(call: Callable[[], object]) -> int:
    """Rise of the peak resident set during ``call`` above the resident set before it."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")  # reset VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    call()
    return _status_bytes("VmHWM") - before


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    batch, heads, tokens, dim = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=g).requires_grad_(True) for _ in range(3))
    grad = torch.randn(batch, heads, tokens, dim, generator=g)
    return q, k, v, grad


def _calls(shape: tuple[int, ...], ratio: float) -> dict[str, dict[str, Callable[[], None]]]:
    q, k, v, grad = _inputs(shape)
    calls: dict[str, dict[str, Callable[[], None]]] = {}
    for name in METHODS:
        method = make_method(name, ratio)

        def forward(method=method) -> None:
            method(q, k, v)

        def step(method=method) -> None:
            for t in (q, k, v):
                t.grad = None
            method(q, k, v).backward(grad)

        calls[name] = {"forward": forward, "step": step}
    return calls


def time_case(shape: tuple[int, ...], ratio: float, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    calls = _calls(shape, ratio)
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "step": []} for name in METHODS}
    for _ in range(warmup):
        for name in METHODS:
            calls[name]["forward"]()
            calls[name]["step"]()
    for _ in range(repeats):
        for name in METHODS:  # round-robin
            for mode in ("forward", "step"):
                start = time.perf_counter()
                calls[name][mode]()
                times[name][mode].append(time.perf_counter() - start)
    return {
        name: {
            f"{mode}_{stat}_ms": 1e3 * fn(times[name][mode])
            for mode in ("forward", "step")
            for stat, fn in (("median", statistics.median), ("min", min))
        }
        for name in METHODS
    }


def memory_case(shape: tuple[int, ...], ratio: float) -> dict[str, dict[str, int]]:
    calls = _calls(shape, ratio)
    out = {}
    for name in METHODS:
        calls[name]["step"]()  # warm-up: one-time allocations are not the method's
        out[name] = {
            f"{mode}_peak_extra_bytes": min(peak_extra_bytes(calls[name][mode]) for _ in range(2))
            for mode in ("forward", "step")
        }
    return out


def memory_in_worker(shapes: tuple[tuple[int, ...], ...], ratio: float) -> Optional[list[dict]]:
    """Run :func:`memory_case` for every shape in a fresh process with the mmap threshold pinned."""
    if not sys.platform.startswith("linux") or not _memory_probe_available():
        return None
    import json
    import subprocess

    command = [sys.executable, __file__, "--memory-worker", "--ratio", str(ratio), "--shapes", json.dumps(shapes)]
    env = {**os.environ, _MMAP_ENV: "65536"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(shape: tuple[int, ...], ratio: float, repeats: int, warmup: int, memory: Optional[dict]) -> dict:
    batch, heads, tokens, _ = shape
    rows = time_case(shape, ratio, repeats, warmup)
    logits = batch * heads * tokens * tokens
    if memory is not None:
        for name, row in rows.items():
            for mode in ("forward", "step"):
                row[f"{mode}_peak_extra_bytes"] = memory[name][f"{mode}_peak_extra_bytes"]
                row[f"{mode}_peak_extra_bytes_per_logit"] = memory[name][f"{mode}_peak_extra_bytes"] / logits
    base, paper = rows["sdpa_nomask"], rows["paper"]
    for row in rows.values():
        for mode in ("forward", "step"):
            row[f"{mode}_vs_sdpa_nomask"] = row[f"{mode}_median_ms"] / base[f"{mode}_median_ms"]
            row[f"{mode}_speedup_vs_paper"] = paper[f"{mode}_median_ms"] / row[f"{mode}_median_ms"]
            if memory is not None:
                row[f"{mode}_extra_bytes_per_logit_vs_sdpa_nomask"] = (
                    row[f"{mode}_peak_extra_bytes"] - base[f"{mode}_peak_extra_bytes"]
                ) / logits
    return {"shape": list(shape), "logits": logits, "methods": rows}


def render(cases: list[dict], meta: dict, memory: bool) -> str:
    lines = [
        "# DropKey attention on CPU",
        "",
        f"float32, drop ratio {meta['ratio']}, {meta['threads']} threads, median of {meta['repeats']} repeats "
        f"(round-robin over methods) after {meta['warmup']} warm-up; forward = with autograd graph, "
        "step = forward + backward. Ratios use medians. Memory: rise of peak RSS (VmHWM) during one call, "
        "per logit (B*H*N*N); 'vs SDPA' = minus the same for SDPA without a mask.",
        "",
        f"Machine: {meta['provenance']['machine']}; torch {meta['provenance']['versions'].get('torch')}; "
        f"commit {meta['provenance']['git_commit']}",
        "",
    ]
    header = "| shape BxHxNxd | method | fwd ms | step ms (min) | step / SDPA | step speed-up vs paper | fwd / SDPA |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if memory:
        header += " step peak B/logit | step extra B/logit vs SDPA | fwd extra B/logit vs SDPA |"
        sep += "---:|---:|---:|"
    lines += [header, sep]
    for case in cases:
        label = "x".join(str(s) for s in case["shape"])
        for name, row in case["methods"].items():
            cells = [
                label,
                name,
                f"{row['forward_median_ms']:.1f}",
                f"{row['step_median_ms']:.1f} ({row['step_min_ms']:.1f})",
                f"{row['step_vs_sdpa_nomask']:.2f}x",
                f"{row['step_speedup_vs_paper']:.2f}x",
                f"{row['forward_vs_sdpa_nomask']:.2f}x",
            ]
            if memory:
                cells += [
                    f"{row['step_peak_extra_bytes_per_logit']:.2f}",
                    f"{row['step_extra_bytes_per_logit_vs_sdpa_nomask']:.2f}",
                    f"{row['forward_extra_bytes_per_logit_vs_sdpa_nomask']:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Notes: the 2 cores are shared with other processes (load average before/after the run: "
        f"{meta.get('load_average_before')} / {meta.get('load_average_after')}), so medians carry noise; "
        "the minima (in parentheses) approximate an idle machine. Negative 'extra' memory means a lower peak "
        "than SDPA without a mask (its CPU backward allocates more than ours). The dropkey rows of the "
        f"targets are the `{DROPKEY_METHOD}` backend, which `backend=\"auto\"` picks on CPU for float32.",
    ]
    lines += ["", "## Targets", ""]
    for key, value in meta["targets"].items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def targets(cases: list[dict], memory: bool) -> dict[str, str]:
    out = {}
    for case in cases:
        label = "x".join(str(s) for s in case["shape"])
        row, base = case["methods"][DROPKEY_METHOD], case["methods"]["sdpa_nomask"]
        ratio = row["step_vs_sdpa_nomask"]
        ratio_min = row["step_min_ms"] / base["step_min_ms"]
        out[f"{label}: step within {TARGET_STEP_VS_SDPA}x of SDPA without mask"] = (
            f"{'MET' if ratio <= TARGET_STEP_VS_SDPA else 'NOT MET'} ({DROPKEY_METHOD}: {ratio:.2f}x of medians, "
            f"{ratio_min:.2f}x of minima)"
        )
        if case["shape"][2] == 197:
            need = TARGET_SPEEDUP_VS_PAPER_N197
            speedup = row["step_speedup_vs_paper"]
            out[f"{label}: step >= {need}x faster than the two-line code"] = (
                f"{'MET' if speedup >= need else 'NOT MET'} ({speedup:.2f}x)"
            )
        if memory:
            for mode, what in (("step", "training step"), ("forward", "forward")):
                extra = row[f"{mode}_extra_bytes_per_logit_vs_sdpa_nomask"]
                out[
                    f"{label}: extra memory <= {TARGET_EXTRA_BYTES_PER_LOGIT} B/logit "
                    f"({what}, peak vs SDPA without mask)"
                ] = (
                    f"{'MET' if extra <= TARGET_EXTRA_BYTES_PER_LOGIT else 'NOT MET'} ({extra:.2f} B/logit)"
                )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, 3 repeats: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, all cores)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for attention_cpu.{md,json}")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        import json

        shapes = tuple(tuple(shape) for shape in json.loads(args.shapes))
        print(json.dumps([memory_case(shape, args.ratio) for shape in shapes]))
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    torch.manual_seed(0)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    memories = None if args.no_memory else memory_in_worker(shapes, args.ratio)
    print(f"  memory probe: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    memory = memories is not None
    cases = []
    for index, shape in enumerate(shapes):
        started = time.perf_counter()
        cases.append(run_case(shape, args.ratio, repeats, args.warmup, memories[index] if memories else None))
        print(f"  {shape}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    meta = {
        "ratio": args.ratio,
        "repeats": repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "memory_probe": f"VmHWM rise in a worker process with {_MMAP_ENV}=65536" if memory else "unavailable",
        "provenance": provenance(seed=0),
        "load_average_before": [round(x, 2) for x in load_before] if load_before else None,
        "load_average_after": [round(x, 2) for x in os.getloadavg()] if load_before else None,
    }
    meta["targets"] = targets(cases, memory)
    text = render(cases, meta, memory)
    print(text)
    suffix = "_quick" if args.quick else ""
    write_text_atomic(args.output / f"attention_cpu{suffix}.md", text)
    write_json_atomic(args.output / f"attention_cpu{suffix}.json", {"meta": meta, "cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
