"""DropKey for PyTorch Vision Transformers.

The torch-dependent API is loaded lazily (PEP 562), so light modules such as
:mod:`dropkey.provenance` import without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "DropKeyAttention": "modules",
    "ViTConfig": "models",
    "VisionTransformer": "models",
    "MODEL_CONFIGS": "models",
    "create_model": "models",
    "AttentionRecorder": "diagnostics",
    "ALL_DROPPED_CONVENTIONS": "functional",
    "BACKENDS": "functional",
    "dropkey_attention": "functional",
    "masked_softmax": "functional",
    "attention_from_keep_mask": "functional",
    "plain_attention": "functional",
    "post_softmax_dropout_attention": "functional",
    "paper_dropkey_attention": "functional",
    "dropkey_keep_mask": "masks",
    "dropattention_keep_mask": "masks",
    "block_keep_mask": "masks",
    "cross_keep_mask": "masks",
    "calibrated_seed_rate": "masks",
    "block_seed_rate": "masks",
    "cross_seed_rate": "masks",
    "monte_carlo_predict": "inference",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dropkey' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dropkey.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
