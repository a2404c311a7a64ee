"""Resources of the Triton DropKey kernels compiled for A100 (sm_80) and H100/H200 (sm_90), on a machine without a GPU.

Every autotune candidate of the forward, dK/dV and dQ kernels, in float16, bfloat16 and
float32, at head dims 32, 64, 128 and 256, goes through Triton's compiler and ptxas
(:mod:`dropkey.kernels.triton_aot`). The table gives, per compilation: registers per
thread, bytes spilled to local memory, shared memory per block, tensor-core instructions,
and whether the block fits the architecture. The summary counts, per (arch, kernel,
dtype, head dim), the candidates the autotuner can launch and those that spill nothing.

This measures what the compiler produces, not speed: a spill-free candidate is not
proven faster, only free of the local-memory traffic spills cost. GPU speed comes from
``benchmarks/bench_gpu.py`` on a GPU.

Results (versions, commit) go to benchmarks/results/triton_resources.{md,json}, written
atomically. Exit status 1 if a kernel failed to compile or a group has no launchable
candidate. Must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
Usage: python benchmarks/triton_resources.py [--arch sm_90 ...] [--head-dims 32,64,128,256] [--jobs N] [--output DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from dropkey.kernels import triton_aot as aot
from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", action="append", choices=tuple(aot.ARCHITECTURES), help="targets (default sm_80 and sm_90)"
    )
    parser.add_argument("--head-dims", type=aot._head_dims, default=(32, 64, 128, 256))
    parser.add_argument("--jobs", type=aot._positive, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def group_summary(results: Sequence[aot.KernelResources]) -> list[dict]:
    """Per (arch, kernel, dtype, head dim): candidates compiled, launchable and spill-free; the least spill of a
    launchable one."""
    groups: dict[tuple, list[aot.KernelResources]] = {}
    for row in results:
        b = row.build
        groups.setdefault((row.arch, b.kernel, b.dtype, b.head_dim), []).append(row)
    out = []
    for (arch, kernel, dtype, head_dim), rows in groups.items():
        clean = [r for r in rows if r.fits and not r.spills]
        out.append(
            {
                "arch": arch, "kernel": kernel, "dtype": dtype, "head_dim": head_dim,
                "candidates": len(rows), "compiled": sum(r.compiled for r in rows),
                "launchable": sum(r.fits for r in rows), "spill_free": len(clean),
                "least_spill_bytes": min((r.spill_store_bytes for r in rows if r.fits), default=None),
            }
        )
    return out


# The mask's cost in machine instructions: the first candidate of each tiled kernel at the
# benchmark's dtype and head dim (bfloat16, d = 64), compiled again with r = 0 (DROP off).
UNMASKED = [
    dataclasses.replace(b, drop=False)
    for b in aot.builds("smoke", head_dims=(64,))
    if b.dtype == "bfloat16" and b.kernel in aot.TILED_KERNELS
]


def mask_cost(results: Sequence[aot.KernelResources], unmasked: Sequence[aot.KernelResources]) -> list[dict]:
    """Per (arch, kernel): SASS instructions with r = 0 and with r > 0 in the same configuration, and their ratio."""
    masked = {(r.arch, dataclasses.replace(r.build, drop=False)): r for r in results}
    out = []
    for base in unmasked:
        with_mask = masked.get((base.arch, base.build))
        if with_mask is None or not (base.sass_instructions and with_mask.sass_instructions):
            continue
        out.append(
            {
                "arch": base.arch, "kernel": base.build.kernel, "config": base.build.label,
                "unmasked": base.sass_instructions, "masked": with_mask.sass_instructions,
                "ratio": with_mask.sass_instructions / base.sass_instructions,
            }
        )
    return out


def render(meta: dict, summary: list[dict], results: Sequence[aot.KernelResources], costs: Sequence[dict] = ()) -> str:
    lines = [
        "# Triton DropKey kernels compiled for GPU architectures (no GPU used)",
        "",
        f"- commit `{meta['git_commit']}`, triton {meta['triton']}, torch {meta['torch']}; "
        f"compiled on {meta['machine']}",
        f"- {meta['compilations']} compilations, {meta['failed']} failed; "
        f"groups without a launchable candidate: {meta['unlaunchable'] or 'none'}",
        "- what this is: Triton's compiler and ptxas output per autotune candidate (registers, spills, shared "
        "memory, tensor-core instructions). Not speed: GPU speed is **not measured** here (benchmarks/bench_gpu.py).",
        f"- command: `{meta['command']}`",
        "",
        "## Per kernel group",
        "",
        "| arch | kernel | dtype | d | candidates | compiled | launchable | spill-free | least spill stores (B) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in summary:
        lines.append(
            f"| {g['arch']} | {g['kernel']} | {g['dtype']} | {g['head_dim']} | {g['candidates']} | {g['compiled']} | "
            f"{g['launchable']} | {g['spill_free']} | {g['least_spill_bytes']} |"
        )
    if costs:
        lines += [
            "",
            "## What the mask costs in machine instructions (bfloat16, d = 64, each kernel's first candidate)",
            "",
            "A static count of the compiled kernel's SASS, each loop body counted once (the key-block and "
            "query-block loops are where the time goes). The hash is about ten integer instructions per logit "
            "(two multiplies, three shift-xor pairs, an add and an unsigned compare), and the backward recomputes "
            "it in both kernels. The FlashAttention-3 paper (Shah et al., 2024) notes that on H100 the softmax's "
            "non-matmul instructions, not the tensor cores, limit FlashAttention at small head dims; the hash adds "
            "to exactly those. So the ratio indicates how much slower the masked loop may be, at most. "
            "It is not a timing.",
            "",
            "| arch | kernel | r = 0 | r > 0 | ratio |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['arch']} | {c['kernel']} | {c['unmasked']} | {c['masked']} | {c['ratio']:.2f}x |" for c in costs
        ]
    lines += ["", "## Every compilation", "", aot.render_table(results)]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    archs = args.arch or ["sm_80", "sm_90"]
    record = provenance()  # the commit the kernels were compiled from
    tuning = aot.builds("tuning", head_dims=args.head_dims)
    results = aot.compile_builds(tuning, archs, jobs=args.jobs, progress=sys.stderr.isatty())
    unmasked = aot.compile_builds(UNMASKED, archs, jobs=args.jobs)
    failed = [row for row in [*results, *unmasked] if not row.compiled]
    stranded = aot.unlaunchable(results)
    meta = {
        "git_commit": record["git_commit"],
        "triton": importlib.metadata.version("triton"),
        "torch": record["versions"].get("torch", "?"),
        "machine": f"{record['machine'].get('processor') or record['machine'].get('machine', '?')} "
        f"({record['machine'].get('cpu_count', '?')} CPUs)",
        "command": record["command"],
        "provenance": record,
        "archs": archs,
        "head_dims": list(args.head_dims),
        "compilations": len(results),
        "failed": len(failed),
        "unlaunchable": [list(g) for g in stranded],
    }
    summary = group_summary(results)
    costs = mask_cost(results, unmasked)
    text = render(meta, summary, results, costs)
    print(text)
    write_text_atomic(args.output / "triton_resources.md", text)
    write_json_atomic(
        args.output / "triton_resources.json",
        {
            "meta": meta, "groups": summary, "mask_cost": costs,
            "compilations": [row.as_dict() for row in results], "unmasked": [row.as_dict() for row in unmasked],
        },
    )
    return 1 if failed or stranded else 0


if __name__ == "__main__":
    sys.exit(main())
