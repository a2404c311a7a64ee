"""The study registry: every simulation describes itself in one :class:`Study`, found here by name.

A simulation module of this package exports ``STUDY = Study(...)``: its name and title, its
config class (with ``quick()`` and ``full()``), ``run`` and ``summarise``, the question and
method of its report page, the module that draws its figures and states its equations, and the
lines its command line prints. The registry finds every module of :mod:`simulations` that
exports one, so adding a study is one file (see docs/extending.md, "Adding a study"); the
command line (``dropkey-lab simulate NAME``), the report (:mod:`reports.studies`) and the tests
iterate over :func:`studies`. A study defined elsewhere (a test's example) joins with
:func:`register`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SIZES = ("quick", "full")


def _no_headline(summary: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Study:
    """One study: how to configure, run and summarise it, and how its report page presents it.

    ``run(config, progress=False)`` returns the tidy frame, ``summarise(frame)`` the summary
    (JSON-ready once passed through :func:`dropkey.storage.to_jsonable`). ``page`` names the
    module whose ``figures(frame, summary)`` and ``equations()`` draw the page's figures and
    list its (name, sympy expression) equations; it is imported only when a page is built, so
    running a study needs no plotting library and the figures' code is not part of the
    study's cache key. ``headline(summary)`` gives the lines the command line prints under the
    one-line result. ``rank`` orders the report's navigation (then the name).
    """

    name: str
    title: str
    config_class: type
    run: Callable[..., Any]
    summarise: Callable[[Any], dict]
    question: str
    method: str
    explanation: str = ""
    page: str = ""
    headline: Callable[[dict], list[str]] = _no_headline
    rank: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name must be an identifier (it names files and pages), got {self.name!r}")
        if not isinstance(self.page, str):
            raise TypeError(f"page must be a module name (str), got {type(self.page).__name__}")

    @property
    def module(self) -> str:
        """The module whose code computes the study (that of ``run``): the root of its cache key."""
        return self.run.__module__

    def config(self, size: str = "quick", seed: int | None = None) -> Any:
        """The config class's ``quick()`` or ``full()`` config, with ``seed`` if given."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        config = self.config_class.quick() if size == "quick" else self.config_class.full()
        return config if seed is None else dataclasses.replace(config, seed=seed)

    def compute(self, config: Any, *, progress: bool = False) -> tuple[Any, dict]:
        """The frame and summary of ``config``."""
        frame = self.run(config, progress=progress)
        return frame, self.summarise(frame)

    def figures(self, frame: Any, summary: dict) -> list:
        """The page's figures ([] without a page module)."""
        return importlib.import_module(self.page).figures(frame, summary) if self.page else []

    def equations(self) -> list[tuple[str, Any]]:
        """The page's (name, sympy expression) equations ([] without a page module)."""
        return list(importlib.import_module(self.page).equations()) if self.page else []


_REGISTERED: dict[str, Study] = {}


@functools.cache
def _module_names() -> tuple[str, ...]:
    """The modules of this package (not its subpackages, nor ``__main__``), by name."""
    import simulations

    return tuple(sorted(f"simulations.{info.name}" for info in pkgutil.iter_modules(simulations.__path__)
                        if not info.ispkg and not info.name.startswith("_")))


def studies() -> tuple[Study, ...]:
    """Every study: each module's ``STUDY`` and every registered one, by (rank, name).

    A module's ``STUDY`` is read at every call (the modules are imported once), so a test may
    replace it with :func:`dataclasses.replace` and ``monkeypatch``.
    """
    found = [module.STUDY for module in map(importlib.import_module, _module_names())
             if isinstance(getattr(module, "STUDY", None), Study)]
    found += _REGISTERED.values()
    names = [entry.name for entry in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"study names must be unique, repeated: {repeated}")
    return tuple(sorted(found, key=lambda entry: (entry.rank, entry.name)))


def study_names() -> tuple[str, ...]:
    """The names of :func:`studies`, in their order."""
    return tuple(entry.name for entry in studies())


def study(name: str) -> Study:
    """The study called ``name`` (ValueError naming the known studies otherwise)."""
    for entry in studies():
        if entry.name == name:
            return entry
    raise ValueError(f"study must be one of {study_names()}, got {name!r}")


def register(entry: Study) -> Study:
    """Add a study defined outside this package's modules (e.g. a test's example); returns it."""
    if not isinstance(entry, Study):
        raise TypeError(f"entry must be a Study, got {type(entry).__name__}")
    if entry.name in study_names():
        raise ValueError(f"a study named {entry.name!r} is already registered")
    _REGISTERED[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a study added by :func:`register` (ValueError for any other name)."""
    if name not in _REGISTERED:
        raise ValueError(f"name must be a study added by register(), one of {tuple(_REGISTERED)}, got {name!r}")
    del _REGISTERED[name]
