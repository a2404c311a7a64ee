"""``python -m simulations NAME [--full] [--seed S] [--out DIR]``: the same as ``dropkey-lab simulate``."""

from simulations.cli import main

raise SystemExit(main())
