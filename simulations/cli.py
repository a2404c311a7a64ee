"""The command line of the studies: ``dropkey-lab simulate NAME [--full] [--seed S] [--out DIR]``.

One entry for every study of :mod:`simulations.registry` (also ``python -m simulations NAME``).
This is the only module of :mod:`simulations` that configures logging or writes to the
terminal; a study's ``run`` and ``summarise`` and :mod:`simulations.common` log through
:mod:`logging` and return data.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations import registry

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Where a study's outputs go by default: ``runs/simulations/NAME`` (ignored by git).
DEFAULT_OUT = Path("runs") / "simulations"


def study_name(value: str) -> str:
    """An argparse type: the name of a registered study."""
    try:
        return registry.study(value).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``simulate``: the study's name, --full, --seed, --out."""
    parser.add_argument("name", type=study_name, help="the study (see simulations.registry)")
    parser.add_argument("--full", action="store_true", help="run the full-size config (default: quick)")
    parser.add_argument("--seed", type=int, default=None, help="root seed (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}/NAME)")
    return parser


def simulate(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Run the study ``args.name`` at its quick or full size, write its outputs and print its headline.

    Writes the study's result folder (:func:`simulations.common.write_study_outputs`) into
    ``args.out`` (default ``runs/simulations/NAME``); ``command`` is recorded in the provenance.
    """
    from dropkey.storage import to_jsonable
    from simulations.common import write_study_outputs  # numpy and pandas: not for --help

    study = registry.study(args.name)
    size = "full" if args.full else "quick"
    config = study.config(size)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    out = args.out if args.out is not None else DEFAULT_OUT / study.name
    frame, summary = study.compute(config, progress=True)
    summary = to_jsonable(summary)
    write_study_outputs(out, name=study.name, size=size, config=config, frame=frame, summary=summary,
                        command=list(command))
    print(f"{study.name}: {len(frame)} rows -> {out}")
    for line in study.headline(summary):
        print(f"  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``python -m simulations NAME ...``: the arguments of ``dropkey-lab simulate`` and --log-level."""
    parser = argparse.ArgumentParser(prog="python -m simulations", description="Run one study and write its outputs.")
    add_arguments(parser)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations NAME [--full] [--seed S] [--out DIR] [--log-level L]``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    return simulate(args, ["python -m simulations"] + list(sys.argv[1:] if argv is None else argv))
