"""DropKey for PyTorch Vision Transformers.

The torch-dependent API is loaded lazily (PEP 562), so light modules such as
:mod:`dropkey.provenance` and :mod:`dropkey.cli` import without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dropkey' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dropkey.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
