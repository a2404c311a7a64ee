"""Benchmark: the CPU paths for DropKey side by side, the one `auto` picks included.

Issue 6 asks for "the best CPU path you can measure (for example torch.compile of the reference
with the hash mask, SDPA with a cheaply generated mask, or a C++ extension)". This script
measures, in ONE run, interleaved round-robin, float32, drop ratio 0.1, against SDPA without
any mask (the speed of light):

- ``cpp``: the C++ kernel (:mod:`dropkey.kernels.cpu_kernel`), what ``backend="auto"`` runs on
  CPU float32 where it builds (left out where it does not);
- ``fused``: torch's CPU flash kernels with a chunked bias from the 1-bit packed Bernoulli mask
  (``auto``'s fallback);

- ``compiled_hash``: the fused backend's maths under ``torch.compile`` (its compiled branch:
  materialised logits, masked softmax with the ``uniform`` all-dropped convention, ``@ v``),
  with the DropKey mask computed inline from the counter-based hash of
  :mod:`dropkey.kernels.hash_mask` (per slice and row a key computed eagerly; per logit one add
  and one fmix32 inside the compiled graph, so no mask is drawn or stored). Checked first to drop exactly the logits
  ``hash_drop_mask`` drops.
- ``compiled_rand``: the same with ``torch.rand(B, H, N, N) < r`` inside the compiled graph
  (inductor's own CPU random numbers).

Compilation happens in the warm-up and is not timed (its wall time is reported). Step = forward +
backward with fresh gradients. Results (machine, versions, commit) go to
benchmarks/results/cpu_alternatives.{md,json}.
Usage: python benchmarks/bench_cpu_alternatives.py [--repeats 9] [--shapes 128x4x65x16,128x3x65x64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dropkey.functional import _fused_masked, dropkey_attention
from dropkey.kernels import cpp_available
from dropkey.kernels.hash_mask import _MASK32, hash_column_terms, hash_drop_mask, hash_row_keys, hash_threshold
from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((128, 4, 65, 16), (128, 3, 65, 64), (64, 6, 197, 64))
METHODS = ("sdpa_nomask",) + (("cpp",) if cpp_available() else ()) + ("fused", "compiled_hash", "compiled_rand")
DROPKEY_METHODS = METHODS[1:]
RATIO = 0.1
SEED = 12345


def _fmix32_wrapping(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on int64 words in [0, 2**32): the low 32 bits of an int64 product are the uint32
    product whatever the overflow, so one multiply and a mask replace hash_mask's 16-bit halves."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _hash_attention(q, k, v, row_keys, col_terms, threshold: int):
    bits = _fmix32_wrapping((row_keys.unsqueeze(-1) + col_terms) & _MASK32)
    # under torch.compile, _fused_masked runs the project's compiled maths on this drop mask
    return _fused_masked(q, k, v, (bits >> 8) < threshold, "uniform", q.shape[-1] ** -0.5)


def _rand_attention(q, k, v, ratio: float):
    drop = torch.rand(*q.shape[:-1], k.shape[-2], device=q.device) < ratio
    return _fused_masked(q, k, v, drop, "uniform", q.shape[-1] ** -0.5)


def hash_keys(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (slice, row) keys (B, H, N) and per key column terms (N,) of the hash mask (hash_mask's spec)."""
    batch, heads, n = shape[0], shape[1], shape[2]
    return hash_row_keys(seed, batch * heads, n).view(batch, heads, n), hash_column_terms(n)


def check_hash_mask(shape: tuple[int, ...]) -> None:
    """The inline hash drops exactly the logits hash_drop_mask drops (else the comparison is void)."""
    row_keys, col_terms = hash_keys(SEED, shape)
    bits = _fmix32_wrapping((row_keys.unsqueeze(-1) + col_terms) & _MASK32)
    inline = (bits >> 8) < hash_threshold(RATIO)
    if not torch.equal(inline, hash_drop_mask(SEED, (*shape[:2], shape[2], shape[2]), RATIO)):
        raise AssertionError("the inline hash differs from dropkey.kernels.hash_drop_mask")


def make_steps(shape: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_(True) for _ in range(3))
    grad = torch.randn(*shape, generator=g)
    row_keys, col_terms = hash_keys(SEED, shape)
    threshold = hash_threshold(RATIO)
    compiled_hash = torch.compile(_hash_attention, dynamic=False)
    compiled_rand = torch.compile(_rand_attention, dynamic=False)
    forwards = {
        "sdpa_nomask": lambda: F.scaled_dot_product_attention(q, k, v),
        "cpp": lambda: dropkey_attention(q, k, v, RATIO, backend="cpp"),
        "fused": lambda: dropkey_attention(q, k, v, RATIO, backend="fused"),
        "compiled_hash": lambda: compiled_hash(q, k, v, row_keys, col_terms, threshold),
        "compiled_rand": lambda: compiled_rand(q, k, v, RATIO),
    }

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in (q, k, v):
                t.grad = None
            forward().backward(grad)

        return run

    return {name: step(forwards[name]) for name in METHODS}


def run_case(shape: tuple[int, ...], repeats: int) -> dict:
    check_hash_mask(shape)
    steps = make_steps(shape)
    started = time.perf_counter()
    for _ in range(2):  # warm-up, compilation included
        for run in steps.values():
            run()
    warmup_s = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name in METHODS:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    return {
        "shape": list(shape),
        "warmup_and_compile_s": warmup_s,
        "step_median_ms": medians,
        "step_min_ms": {name: 1e3 * min(values) for name, values in times.items()},
        "step_vs_sdpa_nomask": {name: medians[name] / medians["sdpa_nomask"] for name in METHODS},
    }


def render(cases: list[dict], meta: dict) -> str:
    lines = [
        "# CPU paths for DropKey attention",
        "",
        f"float32, drop ratio {RATIO}, {meta['threads']} threads, training step (forward + backward), median of "
        f"{meta['repeats']} interleaved repeats after a warm-up that compiles. Machine: "
        f"{meta['provenance']['machine']}; torch {meta['provenance']['versions'].get('torch')}; "
        f"commit {meta['provenance']['git_commit']}; load average before/after "
        f"{meta['load_average_before']} / {meta['load_average_after']}.",
        "",
        "| shape BxHxNxd | method | step ms (min) | step / SDPA without mask |",
        "|---|---|---:|---:|",
    ]
    for case in cases:
        label = "x".join(str(s) for s in case["shape"])
        for name in METHODS:
            lines.append(
                f"| {label} | {name} | {case['step_median_ms'][name]:.1f} ({case['step_min_ms'][name]:.1f}) | "
                f"{case['step_vs_sdpa_nomask'][name]:.2f}x |"
            )
    lines += ["", "## Verdict", ""]
    for case in cases:
        label = "x".join(str(s) for s in case["shape"])
        ratios = case["step_vs_sdpa_nomask"]
        best = min(DROPKEY_METHODS, key=lambda name: ratios[name])
        others = ", ".join(f"{name} {ratios[name]:.2f}x" for name in DROPKEY_METHODS)
        lines.append(
            f"- {label}: fastest DropKey path is `{best}` ({ratios[best]:.2f}x of SDPA without mask; "
            f"{others}; warm-up with compilation {case['warmup_and_compile_s']:.0f} s)"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--shapes", default=None, help="comma-separated BxHxNxd (default: 128x4x65x16,128x3x65x64,64x6x197x64)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for cpu_alternatives.{md,json}")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = tuple(tuple(int(x) for x in item.split("x")) for item in args.shapes.split(","))
        except ValueError:
            parser.error(f"--shapes must look like 128x4x65x16,64x6x197x64, got {args.shapes!r}")
        if any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
            parser.error("--shapes: each shape is four positive ints BxHxNxd")
    torch.manual_seed(0)
    load_before = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for shape in shapes:
        cases.append(run_case(shape, args.repeats))
        print(f"  {shape}: done", file=sys.stderr, flush=True)
    meta = {
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "provenance": provenance(seed=0),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    text = render(cases, meta)
    print(text)
    write_text_atomic(args.output / "cpu_alternatives.md", text)
    write_json_atomic(args.output / "cpu_alternatives.json", {"meta": meta, "cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
