"""What a regulariser is: a keep mask, where it acts (before or after the softmax), and how it rescales.

A regulariser is a frozen dataclass (its fields are its settings, e.g. a block's side) with a
registered ``name``. It answers three questions, all for training mode at a drop ratio r > 0:

- :meth:`Regulariser.keep_mask`: the bool keep mask (True = kept) for logits of a shape, drawn
  as the :class:`Context` says (generator, device, and the fast path it must match);
- :meth:`Regulariser.weights`: the training-time attention weights for given logits and keep
  mask (the specification, differentiable in the logits: the reference path of
  :class:`~dropkey.modules.DropKeyAttention` and the toy optimisation use it);
- :meth:`Regulariser.attention`: the output ``weights @ v`` by the fast path (the fused
  backends; weights never materialised).

The registry (:func:`register`, :func:`get`, :func:`create`, :func:`names`) maps names to
classes; ``dropkey.regularisers`` registers the built-in ones. docs/extending.md shows how to
add one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from dropkey import functional
from dropkey.masks import GeneratorLike, check_grid
from dropkey.reference import masked_softmax
from theory.checks import check_int
from theory.conventions import DEFAULT, check_all_dropped

__all__ = [
    "BEFORE_SOFTMAX",
    "AFTER_SOFTMAX",
    "Context",
    "GridRegulariser",
    "Regulariser",
    "create",
    "from_settings",
    "get",
    "grid_names",
    "names",
    "register",
    "unregister",
]

#: Where a keep mask acts: on the logits (dropped logits -> -inf, the softmax renormalises) or on the weights.
BEFORE_SOFTMAX = "before_softmax"
AFTER_SOFTMAX = "after_softmax"

_REGISTRY: dict[str, type[Regulariser]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
Tensor = torch.Tensor


@dataclass(frozen=True)
class Context:
    """How a regulariser draws and computes: the mask ``generator`` (None: torch's global RNG), the inputs'
    ``device`` and ``dtype``, the attention ``backend`` and the logit ``scale`` (None: 1 / sqrt(d))."""

    generator: GeneratorLike = None
    device: torch.device | str | None = None
    dtype: Optional[torch.dtype] = None
    backend: str = "auto"
    scale: Optional[float] = None


@dataclass(frozen=True)
class Regulariser:
    """Base class of the attention regularisers (see the module doc). Subclasses set the class attributes.

    ``all_dropped``: what a row whose kept keys are all dropped attends to (docs/theory.md
    section 1); regularisers that never renormalise a row (``none``, ``dropout``) ignore it.
    """

    #: The registry key (lower case, digits and underscores).
    name: ClassVar[str] = ""
    #: :data:`BEFORE_SOFTMAX` or :data:`AFTER_SOFTMAX`.
    acts: ClassVar[str] = BEFORE_SOFTMAX
    #: Whether kept weights are divided by 1 - r (inverted dropout) instead of renormalised.
    rescales: ClassVar[bool] = False
    #: False for a regulariser without a rate (``none``): its drop ratio must be 0.
    has_rate: ClassVar[bool] = True
    #: True when the mask needs the patch grid (``grid``, ``num_prefix_tokens`` settings).
    needs_grid: ClassVar[bool] = False

    all_dropped: str = DEFAULT

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_dropped", check_all_dropped(self.all_dropped))

    # --- what a regulariser defines --------------------------------------------------

    def keep_mask(self, shape: tuple[int, ...], drop_ratio: float, context: Context) -> Tensor:
        """The bool keep mask (True = kept) for logits of ``shape`` (..., Nq, Nk), broadcastable to it.

        ``context.dtype`` and ``context.backend`` say which fast path the mask must match (DropKey's
        kernels hash it).
        """
        raise ValueError(f"variant {self.name!r} has no keep mask")

    def weights(self, logits: Tensor, keep: Tensor | None, drop_ratio: float, allowed: Tensor | None = None) -> Tensor:
        """Training-time weights (..., Nq, Nk) from ``logits`` and the keep mask ``keep``.

        ``allowed`` (bool, broadcastable): the keys a caller's attention mask lets take part
        (``logits`` already carry its -inf bias); None: all. The default acts before the softmax:
        a softmax over the keys kept (and allowed), ``all_dropped`` where none is.
        """
        if allowed is None:
            return masked_softmax(logits, keep, all_dropped=self.all_dropped)
        return masked_softmax_within(logits, keep, allowed, self.all_dropped)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, drop_ratio: float, context: Context) -> Tensor:
        """``weights @ v`` by the fast path: the keep mask, then :func:`~dropkey.functional.attention_from_keep_mask`.

        The triton and cpp kernels only hash their own mask, so a given mask takes ``auto``'s path there.
        """
        where = dataclasses.replace(context, device=q.device, dtype=None)
        keep = self.keep_mask((*q.shape[:-1], k.shape[-2]), drop_ratio, where)
        given = "auto" if context.backend in functional.HASH_BACKENDS else context.backend
        return functional.attention_from_keep_mask(
            q, k, v, keep, all_dropped=self.all_dropped, scale=context.scale, backend=given
        )

    def describe(self) -> str:
        """The name and settings, for ``repr`` of a module."""
        settings = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"variant={self.name!r}, {settings}"

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The names of this regulariser's settings (its dataclass fields)."""
        return tuple(f.name for f in dataclasses.fields(cls))


def masked_softmax_within(
    logits: torch.Tensor, keep: torch.Tensor, allowed: torch.Tensor, all_dropped: str
) -> torch.Tensor:
    """Softmax over the keys both masks keep; ``all_dropped`` among the caller-``allowed`` keys.

    Rows the caller's mask leaves empty get weights 0 (finite logits there: no NaN, in backward too).
    """
    kept = keep & allowed
    logits = logits.masked_fill(~allowed, 0.0)
    weights = masked_softmax(logits, kept, all_dropped="zero")
    if all_dropped == "zero":
        return weights
    source = logits if all_dropped == "undropped" else torch.zeros_like(logits)  # uniform: equal logits
    fallback = masked_softmax(source, allowed, all_dropped="zero")
    return torch.where(kept.any(dim=-1, keepdim=True), weights, fallback)


@dataclass(frozen=True)
class GridRegulariser(Regulariser):
    """A regulariser whose mask lives on the patch grid: keys are ``num_prefix_tokens`` prefix tokens then
    ``grid = (rows, cols)`` patches in row-major order (timm's layout)."""

    needs_grid: ClassVar[bool] = True

    grid: Optional[tuple[int, int]] = None
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid is None:
            raise ValueError(f"variant={self.name!r} needs grid=(rows, cols) of the patch tokens")
        object.__setattr__(self, "grid", check_grid(self.grid))
        object.__setattr__(self, "num_prefix_tokens", check_int(self.num_prefix_tokens, "num_prefix_tokens", 0))

    def check_tokens(self, n_keys: int) -> None:
        """ValueError unless ``n_keys`` is the prefix plus the grid's patches."""
        assert self.grid is not None
        expected = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        if n_keys != expected:
            raise ValueError(
                f"{self.name} expects {expected} tokens ({self.num_prefix_tokens} prefix + grid {self.grid}), "
                f"got {n_keys}"
            )


# --------------------------------------------------------------------------- the registry


def register(cls: type[Regulariser]) -> type[Regulariser]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (ValueError if taken or malformed)."""
    if not (isinstance(cls, type) and issubclass(cls, Regulariser)):
        raise TypeError(f"register takes a Regulariser subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be decorated with @dataclass(frozen=True) below @register")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a regulariser's name must be lower case letters, digits and '_', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a regulariser named {name!r} is already registered ({_REGISTRY[name].__name__})")
    if cls.acts not in (BEFORE_SOFTMAX, AFTER_SOFTMAX):
        raise ValueError(f"{cls.__name__}.acts must be {BEFORE_SOFTMAX!r} or {AFTER_SOFTMAX!r}, got {cls.acts!r}")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests that register an example)."""
    get(name)
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def grid_names() -> tuple[str, ...]:
    """The registered names whose masks need the patch grid."""
    return tuple(name for name, cls in _REGISTRY.items() if cls.needs_grid)


def get(name: object) -> type[Regulariser]:
    """The class registered as ``name`` (ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"variant must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def create(variant: str | Regulariser, **settings: Any) -> Regulariser:
    """The regulariser ``variant`` with ``settings`` (a registered name), or ``variant`` itself (an instance).

    Unknown settings are a ValueError naming them and the regulariser's own.
    """
    if isinstance(variant, Regulariser):
        if settings:
            raise ValueError(f"settings {sorted(settings)} given with a Regulariser instance; set them on it")
        return variant
    cls = get(variant)
    unknown = sorted(set(settings) - set(cls.settings()))
    if unknown:
        raise ValueError(f"{cls.name} has no setting {unknown}; its settings are {cls.settings()}")
    return cls(**settings)


def from_settings(variant: str, available: Mapping[str, Any]) -> Regulariser:
    """The regulariser ``variant`` with those of ``available`` that are its settings (the rest are ignored):
    how a model config with settings for every regulariser builds one of them."""
    cls = get(variant)
    return cls(**{key: available[key] for key in cls.settings() if key in available})
