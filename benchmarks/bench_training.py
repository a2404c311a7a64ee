"""Benchmark: end-to-end ViT training throughput with each attention regulariser, in one run.

A full training step (forward, cross-entropy loss, backward, gradient clipping, AdamW step)
of a named ViT on a fixed batch of real images, for the regularisers ``none`` (the baseline),
``dropout`` (post-softmax), ``dropkey`` and the structured ``dropkey_block`` /
``dropkey_cross``, at the same drop ratio, with the backend ``auto`` picks (on CPU float32 the
C++ kernel ``cpp`` for DropKey, ``fused`` for the rest), plus ``dropkey_fused``: DropKey on the
``fused`` backend (Bernoulli mask drawn from torch's generator), the path ``auto`` takes where the
C++ kernel cannot be built. Variants are timed *interleaved*: every round runs ``--steps`` steps of each variant in
turn (in a rotating order), so load from other processes hits every variant alike; the
throughput of a variant is the median over rounds, and its ratio is taken against ``none``
measured in the same rounds. Target (issue 5): DropKey within 5 % of no regulariser.

Data loading and augmentation are the same for every variant and are left out, so the
comparison isolates the regulariser; that makes the ratio conservative (end-to-end training
also spends time the regulariser does not touch). Timed in the same rounds: one step's DropKey
masks drawn alone (every block's B x H x N x N flags from the generator, as the fused backend
draws them): a lower bound on what DropKey adds in any implementation that draws this mask (the
``cpp`` kernel draws no mask: it hashes each logit's counters inline).

Several models can be measured in one run (``--model a,b`` or ``--model a --model b``; default
vit_tiny_32, vit_tiny_28 and vit_small_32, one after the other); every model gets its own
interleaved rounds and its own ratios, and all rows go to ONE results file,
benchmarks/results/training_<device>.{md,json} (machine, versions, commit, load average).
Usage: python benchmarks/bench_training.py [--model vit_tiny_32,vit_tiny_28] [--batch 128] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dropkey.lab import data as datasets
from dropkey.lab.augment import Normalize
from dropkey.masks import BernoulliStream, bernoulli_drop_mask
from dropkey.models import MODEL_CONFIGS, create_model
from dropkey.provenance import provenance
from dropkey.storage import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("none", "dropout", "dropkey", "dropkey_fused", "dropkey_block", "dropkey_cross")
# variant -> (attention variant, backend); "auto" is what users get by default
_SETUPS = {variant: (variant, "auto") for variant in VARIANTS} | {"dropkey_fused": ("dropkey", "fused")}
DEFAULT_MODELS = ("vit_tiny_32", "vit_tiny_28", "vit_small_32")
MASK_DRAW = "mask draw only"  # timed in the same rounds: one step's DropKey masks, drawn alone
TARGET = 1.05  # DropKey's step time at most 5 % above no regulariser's


def real_batch(model_name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` training images of the model's dataset, normalised (digits, Fashion-MNIST or CIFAR-10)."""
    config = MODEL_CONFIGS[model_name]
    dataset = {32: "cifar10", 28: "fashion_mnist", 8: "digits"}[config.image_size]
    images = datasets.load_dataset(dataset, "train")
    mean, std = datasets.channel_stats(images.images[:5000])
    x = Normalize(mean, std)(images.images[:batch]).to(device)
    return x, images.labels[:batch].to(device)


def make_step(model_name: str, variant: str, ratio: float, x: torch.Tensor, y: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    attn_variant, backend = _SETUPS[variant]
    model = create_model(model_name, attn_variant=attn_variant, drop_ratio=0.0 if variant == "none" else ratio,
                         mask_seed=seed, backend=backend).to(x.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_mask_draw(model_name: str, batch: int, ratio: float, device: torch.device, seed: int):
    """One training step's DropKey masks drawn alone (every block's B x H x N x N flags), nothing else.

    On CPU the very draws the fused backend makes (:class:`~dropkey.masks.BernoulliStream`
    into a reused bool buffer, before packing): a lower bound on the step time DropKey
    adds in any implementation that draws this mask from torch's CPU generator.
    """
    config = MODEL_CONFIGS[model_name]
    tokens = config.num_prefix_tokens + config.num_patches
    logits = batch * config.num_heads * tokens * tokens
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type != "cpu":
        def draw() -> float:
            for _ in range(config.depth):
                bernoulli_drop_mask((logits,), ratio, generator=generator, device=device)
            return 0.0
        return draw
    flags = torch.empty(logits, dtype=torch.bool)

    def draw() -> float:
        for _ in range(config.depth):
            BernoulliStream(logits, ratio, generator).fill(flags)
        return 0.0

    return draw


def run(model_name: str, batch: int, ratio: float, rounds: int, steps: int, warmup: int, device: torch.device,
        seed: int) -> tuple[list[dict], float]:
    """Rows per variant, and the median time (s) of one step's mask draws alone, measured in the same rounds."""
    x, y = real_batch(model_name, batch, device)
    functions = {variant: make_step(model_name, variant, ratio, x, y, seed) for variant in VARIANTS}
    functions[MASK_DRAW] = make_mask_draw(model_name, batch, ratio, device, seed)
    for variant, step in functions.items():  # warm-up (and a finiteness check) before any timing
        for _ in range(warmup):
            loss = step()
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"{variant}: non-finite loss {loss} during warm-up")
    names = (*VARIANTS, MASK_DRAW)
    seconds = {variant: [] for variant in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for variant in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                functions[variant]()
            synchronize(device)
            seconds[variant].append((time.perf_counter() - start) / steps)
    base = statistics.median(seconds["none"])
    rows = []
    for variant in VARIANTS:
        median = statistics.median(seconds[variant])
        per_round = [s / b for s, b in zip(seconds[variant], seconds["none"], strict=True)]
        rows.append({
            "model": model_name, "variant": variant, "step_ms": 1e3 * median,
            "step_ms_min": 1e3 * min(seconds[variant]),
            "images_per_s": batch / median, "vs_none": median / base,
            "vs_none_paired_median": statistics.median(per_round),
        })
    return rows, statistics.median(seconds[MASK_DRAW])


def format_table(rows: list[dict]) -> str:
    lines = ["| model | variant | step ms (median) | step ms (min) | images/s | step / none (medians) "
             "| step / none (median of paired rounds) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['variant']} | {row['step_ms']:.1f} | {row['step_ms_min']:.1f} "
                     f"| {row['images_per_s']:.0f} | {row['vs_none']:.3f}x | {row['vs_none_paired_median']:.3f}x |")
    return "\n".join(lines)


def verdict(rows: list[dict], draw_seconds: float) -> tuple[bool, str]:
    """Whether DropKey's step is within the target of no regulariser's (ratio of medians), and a sentence."""
    dropkey = next(row for row in rows if row["variant"] == "dropkey")
    none = next(row for row in rows if row["variant"] == "none")
    fused = next(row for row in rows if row["variant"] == "dropkey_fused")
    met = dropkey["vs_none"] <= TARGET
    draw = 1e3 * draw_seconds
    return met, (f"{dropkey['model']}: DropKey training step within {100 * (TARGET - 1):.0f}% of no regulariser: "
                 f"{'MET' if met else 'NOT met'} ({dropkey['vs_none']:.3f}x of medians, "
                 f"{dropkey['vs_none_paired_median']:.3f}x median of paired rounds; on the fused backend "
                 f"{fused['vs_none']:.3f}x). Drawing the step's Bernoulli DropKey "
                 f"masks alone takes {draw:.1f} ms = {100 * draw / none['step_ms']:.1f}% of the no-regulariser step "
                 f"(DropKey adds {dropkey['step_ms'] - none['step_ms']:.1f} ms).")


def _models(values: list[str] | None) -> list[str]:
    names = [name for value in (values or [",".join(DEFAULT_MODELS)]) for name in value.split(",") if name]
    unknown = sorted(set(names) - set(MODEL_CONFIGS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {sorted(MODEL_CONFIGS)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help=f"model name(s), comma-separated or repeated (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, all cores)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.rounds < 1 or args.steps < 1 or not 0.0 < args.ratio < 1.0:
        parser.error("--batch, --rounds and --steps must be >= 1 and --ratio in (0, 1)")
    try:
        models = _models(args.model)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    args.model = models
    device = torch.device(args.device)

    def loadavg() -> list[str]:
        return Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []

    runs = []
    for model in models:
        load = loadavg()
        rows, draw = run(model, args.batch, args.ratio, args.rounds, args.steps, args.warmup, device, args.seed)
        met, sentence = verdict(rows, draw)
        runs.append({"model": model, "rows": rows, "mask_draw_ms": 1e3 * draw, "met": met, "verdict": sentence,
                     "load_before": load, "load_after": loadavg()})
        print(format_table(rows), end="\n\n", flush=True)
        print(sentence, end="\n\n", flush=True)
    rows = [row for entry in runs for row in entry["rows"]]
    verdicts = [entry["verdict"] for entry in runs]
    if not args.no_save:
        record = {"config": vars(args), "runs": runs, "rows": rows, "verdicts": verdicts,
                  "threads": torch.get_num_threads(), "provenance": provenance(seed=args.seed)}
        name = f"training_{device.type}"
        write_json_atomic(RESULTS / f"{name}.json", record)
        meta = record["provenance"]
        loads = "; ".join(f"{entry['model']}: {entry['load_before']} / {entry['load_after']}" for entry in runs)
        write_text_atomic(
            RESULTS / f"{name}.md",
            f"# ViT training throughput per attention regulariser ({device.type})\n\n"
            f"Models {', '.join(models)}; batch {args.batch} real images, drop ratio {args.ratio}, "
            f"{torch.get_num_threads()} threads; full training step (forward, loss, backward, clipping, AdamW); "
            f"median over {args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps "
            f"per variant; each model's ratios against its own `none` rows, measured in the same rounds.\n\n"
            f"{format_table(rows)}\n\n" + "\n".join(f"- {line}" for line in verdicts) + "\n\n"
            f"Load average (1, 5, 15 min) before / after each model: {loads}. Machine: {meta['machine']}; "
            f"versions: {meta['versions']}; commit {meta['git_commit']}; command `{meta['command']}`; "
            f"{meta['utc_time']}.\n",
        )
    return 0 if all(entry["met"] for entry in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
