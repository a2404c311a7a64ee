"""The ``dropkey-lab`` command line. The only place that configures logging and output."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("dropkey")


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

    report = build_report(
        args.out,
        size=args.size,
        seed=args.seed,
        only=[args.only] if args.only else None,
        cache_dir=args.cache,
        progress=True,
        command=["dropkey-lab"] + list(sys.argv[1:]),
    )
    for claim_id, verdict in report.verdicts.items():
        print(f"[{verdict.status:>16}] {claim_id}: {verdict.key_number}")
    computed = ", ".join(report.computed) or "none (all from the cache)"
    print(f"studies computed: {computed}")
    print(f"report: {Path(args.out) / 'index.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropkey-lab",
        description="Check the claims of 'DropKey for Vision Transformer' and run DropKey studies.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    theory = commands.add_parser("theory", help="verify the derivations and print a summary")
    theory.add_argument("--seed", type=int, default=0, help="seed for numeric cross-checks")
    theory.add_argument("-v", "--verbose", action="store_true", help="print every expression")
    theory.set_defaults(handler=_command_theory)

    from reports.studies import STUDY_NAMES

    report = commands.add_parser("report", help="build the self-contained HTML report of every claim")
    report.add_argument("--out", type=Path, default=Path("report"), help="output folder (default report/)")
    sizes = report.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="size", action="store_const", const="quick", help="quick studies (default)")
    sizes.add_argument("--full", dest="size", action="store_const", const="full", help="full-size studies")
    report.set_defaults(size="quick")
    report.add_argument("--seed", type=int, default=0, help="root seed of every study (default 0)")
    report.add_argument("--only", choices=STUDY_NAMES, default=None, help="build only this study's page")
    report.add_argument(
        "--cache", type=Path, default=Path("runs") / "report-cache", help="study cache (default runs/report-cache/)"
    )
    report.set_defaults(handler=_command_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    started = time.perf_counter()
    code = args.handler(args)
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
