"""The command line of the simulations: ``python -m simulations.NAME [--full] [--seed S] [--out DIR]``.

This is the only module of :mod:`simulations` that configures logging or writes
to the terminal. Library code (each study's ``run`` and ``summarise``, and
:mod:`simulations.common`) logs through :mod:`logging` and returns data; each
study's ``main(argv)``, which its ``if __name__ == "__main__":`` block calls,
hands its parts to :func:`run_cli` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from simulations.common import to_jsonable, write_study_outputs

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every study's command line takes."""
    parser = argparse.ArgumentParser(prog=f"python -m simulations.{name}", description=description)
    parser.add_argument("--full", action="store_true", help="run the full-size config (default: quick)")
    parser.add_argument("--seed", type=int, default=None, help="root seed (default: the config's)")
    parser.add_argument(
        "--out", type=Path, default=Path("results") / "simulations" / name, help="output folder"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def run_cli(
    *,
    name: str,
    description: str,
    config_class: type,
    run: Callable[..., pd.DataFrame],
    summarise: Callable[[pd.DataFrame], dict],
    headline: Callable[[dict], list[str]],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, configure logging, run the study, write its outputs and print its headline.

    ``config_class`` provides ``quick()`` and ``full()``; ``run(config, progress=True)``
    returns the tidy frame, ``summarise(frame)`` the summary dict and
    ``headline(summary)`` the lines printed under the one-line result. Returns 0.
    """
    args = build_parser(name, description).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    config = config_class.full() if args.full else config_class.quick()
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    frame = run(config, progress=True)
    summary = to_jsonable(summarise(frame))
    command = [f"python -m simulations.{name}"] + list(sys.argv[1:] if argv is None else argv)
    write_study_outputs(
        args.out,
        name=name,
        size="full" if args.full else "quick",
        config=config,
        frame=frame,
        summary=summary,
        command=command,
    )
    print(f"{name}: {len(frame)} rows -> {args.out}")
    for line in headline(summary):
        print(f"  {line}")
    return 0

