"""Monte-Carlo inference: average stochastic forward passes (train/test alignment, docs/theory.md section 4).

How the model is put in "stochastic mode": the whole model is switched to
``eval()`` (BatchNorm uses running statistics, nothing is updated), then only the
*stochastic* modules are switched back to ``train()`` — by default every
``torch.nn`` dropout layer (``_DropoutNd``: Dropout, Dropout1d/2d/3d, AlphaDropout,
FeatureAlphaDropout), every module with a ``drop_ratio`` attribute (DropKey
attention layers) and every module whose class name contains ``DropKey``,
``DropPath`` or ``DropBlock``. ``module.train(True)`` is applied to those modules
only, *not recursively*, so a non-stochastic child (e.g. a norm layer inside an
attention block) stays in eval. Every module's ``training`` flag is restored
afterwards, whatever happens. The passes run under :func:`torch.no_grad`.

Reproducibility (``generator=``): the passes run inside :func:`torch.random.fork_rng`
seeded from ``generator`` (for modules drawing from the global RNG), and every module
that owns its mask generator (``owns_generator``, e.g. a DropKeyAttention built with
``generator=`` or a model's ``mask_seed``) draws from a child seed instead
(:class:`numpy.random.SeedSequence` of the seed, one child per such module, in
``model.modules()`` order) through its ``generator_override``. Its own generator is set
aside, untouched, and comes back on return, so the model's training stream goes on
exactly where it was. Without ``generator`` the passes draw from the module generators
and the global RNG as a training forward would (and advance them).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dropkey.masks import GeneratorLike, check_generator
from theory.checks import check_choice, check_int
from theory.seeding import child_sequences, integer_seed

logger = logging.getLogger(__name__)

__all__ = ["AVERAGES", "is_stochastic_module", "monte_carlo_predict"]

AVERAGES = ("probabilities", "logits")
_STOCHASTIC_NAMES = ("DropKey", "DropPath", "DropBlock")


def is_stochastic_module(module: nn.Module) -> bool:
    """True for dropout-like modules that Monte-Carlo inference keeps in training mode."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    if getattr(module, "drop_ratio", None) is not None:
        return True
    name = type(module).__name__
    return any(marker in name for marker in _STOCHASTIC_NAMES)


def _seed_from(generator: GeneratorLike) -> Optional[int]:
    checked = check_generator(generator)
    if isinstance(checked, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=checked, device=checked.device).item())
    return checked


def _owns_generator(module: nn.Module) -> bool:
    return bool(getattr(module, "owns_generator", False)) and callable(getattr(module, "generator_override", None))


def _child_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed`` (SeedSequence children, the upper 63 bits of
    each child's first word: the streams every recorded result was drawn with)."""
    children = child_sequences(np.random.SeedSequence(seed % 2**64), count)
    return [integer_seed(child, 64) >> 1 for child in children]


def monte_carlo_predict(
    model: nn.Module,
    x: torch.Tensor,
    num_samples: int,
    *,
    average: str = "probabilities",
    generator: GeneratorLike = None,
    stochastic: Callable[[nn.Module], bool] = is_stochastic_module,
) -> torch.Tensor:
    """Average ``num_samples`` stochastic forward passes of ``model`` on ``x``.

    ``model(x)`` must return logits of shape (B, C). ``average="probabilities"``:
    the mean of ``softmax(logits, -1)`` (returns probabilities, rows sum to 1);
    ``"logits"``: the mean of the logits. Only the modules selected by
    ``stochastic`` (see the module doc) run in training mode; all others are in
    eval; every module's mode is restored on return. ``generator`` (a
    :class:`torch.Generator` or int seed) makes the result reproducible: the passes
    run inside :func:`torch.random.fork_rng` seeded from it, and modules with their
    own mask generator draw from child seeds of it (see the module doc), so the same
    seed gives the same result, and neither the caller's global RNG state nor the
    modules' own generators are changed. Returns a float tensor (B, C).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    num_samples = check_int(num_samples, "num_samples", 1)
    check_choice(average, "average", AVERAGES)
    seed = _seed_from(generator)

    modes = {module: module.training for module in model.modules()}
    selected = [module for module in model.modules() if stochastic(module)]
    if not selected:
        logger.warning("monte_carlo_predict: no stochastic module found; all %d passes are identical", num_samples)
    devices = [x.device] if x.device.type == "cuda" else []
    owners = [module for module in model.modules() if _owns_generator(module)] if seed is not None else []
    try:
        model.eval()
        for module in selected:
            module.training = True  # this module only, not its children
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=seed is not None))
            if seed is not None:
                torch.manual_seed(seed)
                for module, child in zip(owners, _child_seeds(seed, len(owners)), strict=True):
                    stack.enter_context(module.generator_override(child))
            total: Optional[torch.Tensor] = None
            for _ in range(int(num_samples)):
                logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
                    raise ValueError("model(x) must return a logits tensor of shape (B, C)")
                sample = torch.softmax(logits.float(), dim=-1) if average == "probabilities" else logits.float()
                total = sample if total is None else total.add_(sample)
    finally:
        for module, mode in modes.items():
            module.training = mode
    assert total is not None
    return total.div_(int(num_samples))
