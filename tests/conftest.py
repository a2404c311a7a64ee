"""Shared pytest configuration: hypothesis profiles, the gpu marker's skip rule, the Triton interpreter,
the project's data directory.

Profiles (select with HYPOTHESIS_PROFILE):
- ``ci`` (the README's test command): derandomised, so every run tests the same
  examples, no deadline (shared 2-core machines have noisy timings).
- ``dev`` (default): random exploration with the usual example count.
- ``thorough``: 10x the examples, for a manual deep run.
- ``slow``: derandomised like ``ci`` with many more examples; the ``@pytest.mark.slow`` fuzz tests
  take their settings from it (``settings(settings.get_profile("slow"))``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


def _triton_interpreter_without_cuda() -> None:
    """Run Triton kernels through its interpreter (CPU) when there is no CUDA device.

    tests/test_triton_kernel.py runs the fused kernel on CPU tensors this way. Triton
    reads TRITON_INTERPRET when it is first imported (it decorates its own library
    functions then) and ``import torch._dynamo`` imports triton, so the variable must
    be set before any test module is collected. Without CUDA nothing can be compiled
    for a GPU anyway. An explicit TRITON_INTERPRET in the environment wins.
    """
    if "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_triton_interpreter_without_cuda()

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=600)
settings.register_profile("slow", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where torch sees no CUDA device (they run on a lent GPU machine)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


def _project_data() -> None:
    """Point ``$DROPKEY_DATA`` at the project machines' shared data copy, when there is one.

    On the project's own machines the datasets live in ``shared/data`` next to the checkout
    (the Makefile exports the same for its targets). An explicit ``$DROPKEY_DATA`` wins;
    elsewhere nothing is set and the tests that need the real files skip.
    """
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not os.environ.get("DROPKEY_DATA") and shared.is_dir():
        os.environ["DROPKEY_DATA"] = str(shared)


_project_data()
