"""The ``dropkey-lab`` command line. The only place that configures logging and output.

Every user error (a bad argument, a bad config, a missing, unwritable or corrupt file) is one
line on stderr, ``dropkey-lab: error: ...`` (or the subcommand's), and a non-zero exit status:
2 for a usage error, 1 for one found while running. A traceback is printed only with
``--log-level DEBUG``; an error that is not a user error (a bug) always has one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from theory.checks import check_seed

log = logging.getLogger("dropkey")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DATA_DIR_HELP = "data folder (default $DROPKEY_DATA, else $XDG_DATA_HOME/dropkey-lab, else ~/.local/share/dropkey-lab)"


def _one_line(message: object) -> str:
    """A message as one line (a multi-line message's lines joined), never empty."""
    return " / ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "(no message)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), naming ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _log_level(value: str) -> str:
    """An argparse type: a logging level name, any case."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"the logging level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


def _seed(value: str) -> int:
    """An argparse type: a seed, an integer in [0, 2^63 - 1]."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the seed must be an integer, got {value!r}") from None
    try:
        return check_seed(number, "the seed")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (a bad argument, config or file), not a bug of the program."""
    from dropkey.lab.datafiles import DataError

    return isinstance(error, (ValueError, TypeError, OSError, DataError))


def _command_theory(args: argparse.Namespace) -> int:
    """Run every symbolic derivation and its check, then a numeric summary."""
    from theory.derivations import verify_all
    from theory.summary import numeric_summary

    failures = 0
    for result in verify_all(seed=args.seed):
        mark = "OK  " if result.holds else "FAIL"
        print(f"[{mark}] {result.key}: {result.title}  ({result.status})")
        print(f"       {result.statement}")
        if args.verbose:
            for name, expression in result.expressions.items():
                print(f"         {name} = {expression}")
        if result.details:
            print(f"       {result.details}")
        failures += not result.holds
    print()
    for line in numeric_summary(seed=args.seed):
        print(line)
    print()
    print("all theory checks hold" if failures == 0 else f"{failures} theory check(s) FAILED")
    return 1 if failures else 0


def _command_report(args: argparse.Namespace) -> int:
    """Build the HTML report (studies cached under --cache) and print each claim's verdict."""
    from reports.build import build_report

    for folder in (args.out, args.cache):  # an unwritable one is an error now, not after the studies ran
        Path(folder).mkdir(parents=True, exist_ok=True)
    train_quick = args.size == "quick" and not args.skip_experiments and not args.only
    report = build_report(
        args.out,
        size=args.size,
        seed=args.seed,
        only=[args.only] if args.only else None,
        cache_dir=args.cache,
        results_dir=args.results_dir,
        experiment_scale="quick" if train_quick else None,
        runs_dir=args.runs_dir,
        jobs=args.jobs,
        progress=True,
        command=["dropkey-lab"] + list(sys.argv[1:]),
    )
    for claim_id, verdict in report.verdicts.items():
        print(f"[{verdict.status:>16}] {claim_id}: {verdict.key_number}")
    computed = ", ".join(report.computed) or "none (all from the cache)"
    print(f"studies computed: {computed}")
    print(f"report: {Path(args.out) / 'index.html'}")
    return 0


def _command_results_table(args: argparse.Namespace) -> int:
    """Write docs/results.md (the real-ViT claims' verdicts and numbers) from the result folders in --results-dir."""
    from dropkey.storage import write_text_atomic
    from reports.results_doc import results_markdown

    write_text_atomic(args.out, results_markdown(args.results_dir))
    print(f"results table: {args.out}")
    return 0


def _report_study(value: str) -> str:
    """An argparse type: a study of the report (the registry is read only when --only is given)."""
    from reports.studies import study

    try:
        return study(value).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _command_simulate(args: argparse.Namespace) -> int:
    """Run one study of simulations.registry; outputs to --out (default runs/simulations/NAME)."""
    from simulations.cli import simulate

    return simulate(args, ["dropkey-lab"] + list(sys.argv[1:]))


def _command_train(args: argparse.Namespace) -> int:
    """Train one ViT per the flags; files go to --out (see dropkey.lab.train)."""
    from dropkey.lab.data import DataError
    from dropkey.lab.train import TrainConfig, TrainingDiverged, train

    try:
        ratios = [float(r) for r in str(args.drop_ratio).split(",")]
    except ValueError:
        print(
            "dropkey-lab train: error: --drop-ratio must be a number or comma-separated numbers, "
            f"got {args.drop_ratio!r}",
            file=sys.stderr,
        )
        return 2
    try:
        config = _train_config(TrainConfig, args, ratios)
    except ValueError as error:
        print(f"dropkey-lab train: error: {_one_line(error)}", file=sys.stderr)
        return 2
    try:
        result = train(config, resume=args.resume, command=["dropkey-lab"] + list(sys.argv[1:]))
    except (OSError, DataError, TrainingDiverged, ValueError) as error:  # OSError: e.g. an unwritable --out
        if args.log_level == "DEBUG":
            raise
        print(f"dropkey-lab train: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return _train_summary(config, result)


def _train_config(TrainConfig, args: argparse.Namespace, ratios: list[float]):  # noqa: N803
    return TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, train_subset=args.train_subset, model=args.model,
        attn_variant=args.variant, drop_ratio=ratios[0] if len(ratios) == 1 else tuple(ratios),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, precision=args.precision,
        compile=args.compile, seed=args.seed, out_dir=str(args.out), diagnostics_every=args.diagnostics_every,
        device=args.device, progress=not args.no_progress, verify_data=not args.no_verify,
    )


def _train_summary(config, result) -> int:
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    if result.metrics.empty:
        print("no epochs run")
        return 0
    last = result.metrics.iloc[-1]
    print(
        f"epoch {int(last['epoch'])}/{config.epochs}: train loss {last['train_loss']:.4f}, "
        f"test loss {last['test_loss']:.4f}, test accuracy {last['test_acc']:.4f}, "
        f"{last['images_per_s']:.0f} images/s"
    )
    print(f"run folder: {result.out_dir}")
    return 0


def _print_decisions(result) -> None:
    """The registered decision of every claim this experiment result measures (this scale only)."""
    from reports import claims as registry
    from reports.evidence import Evidence, experiment_evidence

    evidence = Evidence(experiments={result.name: experiment_evidence(result.folder, result.name, result.scale)})
    for claim_id in result.summary["claims"]:
        verdict = registry.assess(registry.claim(claim_id), evidence)
        print(f"  {claim_id}: {verdict.status}")
        for finding in verdict.findings:
            print(f"    {finding.text()}")


def _command_experiment(args: argparse.Namespace) -> int:
    """Run (or re-analyse) one experiment or all at a scale; print each claim's registered decision."""
    from dropkey.lab.data import DataError
    from dropkey.lab.experiments import EXPERIMENT_NAMES, run_experiment
    from dropkey.lab.experiments.analysis import IncompleteRun
    from dropkey.lab.experiments.results import reanalyse
    from dropkey.lab.train import TrainingDiverged

    names = EXPERIMENT_NAMES if args.name == "all" else (args.name,)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",")]
        except ValueError:
            print(
                f"dropkey-lab experiment: error: --seeds must be comma-separated integers, got {args.seeds!r}",
                file=sys.stderr,
            )
            return 2
    command = ["dropkey-lab"] + list(sys.argv[1:])
    for name in names:
        try:
            if args.reanalyse:
                result = reanalyse(args.results_dir, args.scale, name, command=command)
            else:
                result = run_experiment(
                    name, args.scale, runs_dir=args.runs_dir, results_dir=args.results_dir, data_dir=args.data_dir,
                    device=args.device, seeds=seeds, jobs=args.jobs, progress=not args.no_progress, command=command,
                )
        except (DataError, TrainingDiverged, IncompleteRun, ValueError, OSError, KeyError) as error:
            if args.log_level == "DEBUG":
                raise
            print(f"dropkey-lab experiment: error in {name}: {_one_line(error)}", file=sys.stderr)
            return 1
        print(f"{name} ({args.scale} scale, {result.summary['runs']} runs) -> {result.folder}")
        _print_decisions(result)
    return 0


def _command_calibrate(args: argparse.Namespace) -> int:
    """Train the scale's calibration candidates (cached) and write which regime meets the overfitting criteria."""
    from dropkey.lab.experiments.calibration import run_calibration

    folder = run_calibration(args.scale, runs_dir=args.runs_dir, results_dir=args.results_dir, data_dir=args.data_dir,
                             device=args.device, command=["dropkey-lab"] + list(sys.argv[1:]))
    print(f"calibration ({args.scale} scale) -> {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dropkey-lab",
        description="Check the claims of 'DropKey for Vision Transformer' and run DropKey studies.",
    )
    parser.add_argument("--log-level", type=_log_level, default="WARNING",
                        help=f"logging level: {', '.join(LOG_LEVELS)} (default WARNING; DEBUG shows tracebacks)")
    commands = parser.add_subparsers(dest="command", required=True)

    theory = commands.add_parser("theory", help="verify the derivations and print a summary")
    theory.add_argument("--seed", type=_seed, default=0, help="seed for numeric cross-checks")
    theory.add_argument("-v", "--verbose", action="store_true", help="print every expression")
    theory.set_defaults(handler=_command_theory)

    report = commands.add_parser("report", help="build the self-contained HTML report of every claim")
    report.add_argument("--out", type=Path, default=Path("report"), help="output folder (default report/)")
    sizes = report.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="size", action="store_const", const="quick",
                       help="quick studies and the quick real-ViT experiments (default)")
    sizes.add_argument("--full", dest="size", action="store_const", const="full",
                       help="full-size studies (real-ViT results are read from --results-dir, never trained here)")
    report.set_defaults(size="quick")
    report.add_argument("--seed", type=_seed, default=0, help="root seed of every study (default 0)")
    report.add_argument("--only", type=_report_study, default=None, help="build only this study's page")
    report.add_argument(
        "--cache", type=Path, default=Path("runs") / "report-cache", help="study cache (default runs/report-cache/)"
    )
    report.add_argument("--results-dir", type=Path, default=Path("results"),
                        help="real-ViT experiment results shown in the report (default results/)")
    report.add_argument("--skip-experiments", action="store_true",
                        help="with --quick: do not run the quick real-ViT experiments, only show results-dir")
    report.add_argument("--runs-dir", type=Path, default=Path("runs") / "experiments",
                        help="training runs of the quick experiments (default runs/experiments)")
    report.add_argument("--jobs", type=int, default=2, help="quick experiment runs trained in parallel (default 2)")
    report.set_defaults(handler=_command_report)

    table = commands.add_parser("results-table", help="write docs/results.md: verdicts and numbers from results/")
    table.add_argument("--results-dir", type=Path, default=Path("results"), help="result folders (default results/)")
    table.add_argument("--out", type=Path, default=Path("docs") / "results.md", help="default docs/results.md")
    table.set_defaults(handler=_command_results_table)

    from simulations.cli import add_arguments as simulate_arguments

    simulate = commands.add_parser("simulate", help="run one study (a simulation) and write its outputs")
    simulate_arguments(simulate)
    simulate.set_defaults(handler=_command_simulate)

    # choices are checked by TrainConfig (importing torch here would slow every subcommand)
    tr = commands.add_parser("train", help="train a small ViT (DropKey or a rival) and write metrics")
    tr.add_argument("--dataset", default="digits", help="digits, fashion_mnist or cifar10 (default digits)")
    tr.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    tr.add_argument("--train-subset", type=int, default=None, help="class-balanced subset of N training images")
    tr.add_argument("--model", default="vit_tiny_8", help="a named model of dropkey.models (default vit_tiny_8)")
    tr.add_argument("--variant", default="dropkey",
                    help="attention regulariser: none, dropout, dropattention, dropkey, dropkey_block, dropkey_cross "
                         "(default dropkey)")
    tr.add_argument("--drop-ratio", default="0.1", help="drop ratio, or one per block comma-separated (default 0.1)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--min-lr", type=float, default=0.0)
    tr.add_argument("--weight-decay", type=float, default=0.05)
    tr.add_argument("--warmup-epochs", type=float, default=1.0)
    tr.add_argument("--label-smoothing", type=float, default=0.1)
    tr.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    tr.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--seed", type=_seed, default=0)
    tr.add_argument("--out", type=Path, default=Path("runs") / "train", help="run folder (default runs/train)")
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint in --out bit-exactly")
    tr.add_argument("--diagnostics-every", type=int, default=1, help="epochs between diagnostics (0 = never)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--no-verify", action="store_true", help="skip the data checksums")
    tr.set_defaults(handler=_command_train)

    from dropkey.lab.experiments.definitions import EXPERIMENT_NAMES, SCALE_NAMES

    ex = commands.add_parser("experiment", help="run a real-ViT experiment (all its arms and seeds) at a scale")
    ex.add_argument("name", choices=EXPERIMENT_NAMES + ("all",), help="the experiment, or all of them")
    ex.add_argument("--scale", choices=SCALE_NAMES, default="quick",
                    help="quick (CPU minutes), medium (CPU ~1 h), full (GPU)")
    ex.add_argument("--runs-dir", type=Path, default=Path("runs") / "experiments",
                    help="training runs, shared between experiments (default runs/experiments)")
    ex.add_argument("--results-dir", type=Path, default=Path("results"), help="result folders (default results/)")
    ex.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    ex.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ex.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    ex.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (default 1)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex.add_argument("--reanalyse", action="store_true",
                    help="train nothing: recompute the per-seed and comparison tables of an existing result folder")
    ex.set_defaults(handler=_command_experiment)

    cal = commands.add_parser("calibrate", help="choose a scale's overfitting regime: train its candidate recipes "
                              "without a regulariser and judge them (docs/experiments.md)")
    cal.add_argument("--scale", choices=SCALE_NAMES, default="small_data",
                     help="a scale with calibration candidates (small_data)")
    cal.add_argument("--runs-dir", type=Path, default=Path("runs") / "experiments", help="training runs")
    cal.add_argument("--results-dir", type=Path, default=Path("results"), help="result folders (default results/)")
    cal.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    cal.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    cal.set_defaults(handler=_command_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a user error is one line on stderr and exit status 1 (a traceback with DEBUG)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        code = args.handler(args)
    except Exception as error:
        if args.log_level == "DEBUG" or not _user_error(error):
            raise
        print(f"dropkey-lab: error: {_one_line(error)}", file=sys.stderr)
        return 1
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
