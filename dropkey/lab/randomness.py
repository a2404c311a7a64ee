"""A training run's randomness: its named seed streams and the process's global RNG states.

Every stream of a run is a named child of its seed (:mod:`theory.seeding`): :data:`SEED_STREAMS`
(model init, subset, data order, augmentation, DropKey masks, and the global torch RNG that
dropout / drop path draw from); ranks > 0 take their own :data:`RANK_STREAMS`. The global RNG
states (torch CPU and CUDA, numpy, python ``random``) are captured and restored here, for the
checkpoint and so that a run never leaves the caller's states changed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from theory.seeding import address_sequence, integer_seed, named_streams

__all__ = ["RANK_STREAMS", "SEED_STREAMS", "RunRngs", "caller_rngs_kept", "global_rng_state", "run_rng_state",
           "set_global_rng_state", "set_run_rng_state", "stream_seeds"]

#: the run's random streams, named children of its seed (theory.seeding)
SEED_STREAMS = ("init", "subset", "order", "augment", "masks", "torch")
#: the streams that differ between ranks: children of the rank's address (seed, rank)
RANK_STREAMS = ("augment", "masks", "torch")


def stream_seeds(seed: int, rank: int = 0) -> dict[str, int]:
    """The 32-bit seed of each of the run's streams (:data:`SEED_STREAMS`) on ``rank``."""
    streams = named_streams(seed, SEED_STREAMS)
    if rank:
        streams.update(named_streams(address_sequence(seed, rank), RANK_STREAMS))
    return {name: integer_seed(sequence, 32) for name, sequence in streams.items()}


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def global_rng_state() -> dict[str, Any]:
    """The process's global RNG states: torch (CPU and every CUDA device), numpy, python ``random``."""
    np_state = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def caller_rngs_kept() -> Iterator[None]:
    """Whatever the block does to the global RNGs (torch, numpy, ``random``), the caller's states come back."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def run_rng_state(order_gen: torch.Generator, augment_gen: torch.Generator,
                  mask_modules: Sequence[Any]) -> dict[str, Any]:
    """Everything a checkpoint needs to continue a run's randomness bit-exactly: the global states, the
    data-order and augmentation generators, and every attention module's mask generator."""
    return {
        **global_rng_state(),
        "order": order_gen.get_state(),
        "augment": augment_gen.get_state(),
        "masks": [None if m.generator is None else m.generator.get_state() for m in mask_modules],
    }


def set_run_rng_state(state: Mapping[str, Any], order_gen: torch.Generator, augment_gen: torch.Generator,
                      mask_modules: Sequence[Any], device: torch.device) -> None:
    """Restore :func:`run_rng_state`'s record (ValueError if the model's mask modules do not match it)."""
    set_global_rng_state(state)
    order_gen.set_state(state["order"])
    augment_gen.set_state(state["augment"])
    if len(mask_modules) != len(state["masks"]):
        raise ValueError(f"checkpoint has {len(state['masks'])} mask generators, the model {len(mask_modules)}")
    for module, gen_state in zip(mask_modules, state["masks"], strict=True):
        if gen_state is not None:
            module._generator_for(device).set_state(gen_state)


class RunRngs:
    """A run's own global RNG states (torch, numpy, ``random``), kept apart from the caller's.

    Inside :meth:`active` they are the process's: seeded from ``seed`` the first time, then
    continued from where the last block left them; on leaving, the caller's states come back.
    Re-entrant: a nested block is part of the outer one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.state: dict[str, Any] | None = None  # None: not yet seeded
        self._inside = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self._inside:
            yield
            return
        with caller_rngs_kept():
            self._inside = True
            try:
                if self.state is None:
                    torch.manual_seed(self.seed)
                    np.random.seed(self.seed)
                    random.seed(self.seed)
                else:
                    set_global_rng_state(self.state)
                yield
            finally:
                self.state = global_rng_state()
                self._inside = False
