"""The attention regularisers, registered by name: one file per regulariser, one object per configuration.

>>> from dropkey import regularisers
>>> regularisers.names()
('none', 'dropout', 'dropattention', 'dropkey', 'dropkey_block', 'dropkey_cross')
>>> block = regularisers.create("dropkey_block", grid=(8, 8), block_side=3)

:class:`~dropkey.modules.DropKeyAttention` (``variant=``), :class:`~dropkey.models.ViTConfig`
(``attn_variant``), the toy optimisation and the CLI take regularisers from here. Adding one is
one file that subclasses :class:`Regulariser` and decorates it with :func:`register`
(docs/extending.md, "Adding a regulariser"); a file in this package is imported, so registered,
with the package.
"""

from __future__ import annotations

import importlib
import pkgutil

from dropkey.regularisers.base import (
    AFTER_SOFTMAX,
    BEFORE_SOFTMAX,
    Context,
    GridRegulariser,
    Regulariser,
    Tensor,
    create,
    from_settings,
    get,
    grid_names,
    masked_softmax_within,
    names,
    register,
    unregister,
)

# the built-in regularisers, in the order names() lists them
from dropkey.regularisers.none import NoRegulariser  # isort: skip
from dropkey.regularisers.dropout import Dropout  # isort: skip
from dropkey.regularisers.dropattention import DropAttention  # isort: skip
from dropkey.regularisers.dropkey import DropKey  # isort: skip
from dropkey.regularisers.dropkey_block import DropKeyBlock  # isort: skip
from dropkey.regularisers.dropkey_cross import DropKeyCross  # isort: skip

_BUILT_IN = ("base", "none", "dropout", "dropattention", "dropkey", "dropkey_block", "dropkey_cross")
# any other module of this package registers itself on import: adding a regulariser is adding a file
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in _BUILT_IN):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "AFTER_SOFTMAX",
    "BEFORE_SOFTMAX",
    "Context",
    "DropAttention",
    "DropKey",
    "DropKeyBlock",
    "DropKeyCross",
    "Dropout",
    "GridRegulariser",
    "NoRegulariser",
    "Regulariser",
    "Tensor",
    "create",
    "from_settings",
    "get",
    "grid_names",
    "masked_softmax_within",
    "names",
    "register",
    "unregister",
]
