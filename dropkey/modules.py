"""DropKeyAttention: a drop-in for timm's ``Attention`` with DropKey and its rivals.

Shape contract and parameter names are those of ``timm.models.vision_transformer.Attention``:
x (B, N, C) -> (B, N, C); ``qkv`` (Linear C -> 3C), ``proj`` (Linear C -> C),
``proj_drop``; attributes ``num_heads``, ``head_dim``, ``scale``. A timm
Attention state_dict (``qkv.weight``, ``qkv.bias``, ``proj.weight``,
``proj.bias``) loads as is.

Constructor: ``DropKeyAttention(dim, num_heads, *, variant, drop_ratio, reattention, backend,
fused_attn, record_weights, generator, <timm's keywords>)``. The attention regulariser is
``variant``: a registered name (:func:`dropkey.regularisers.names`: ``none``, ``dropout``,
``dropattention``, ``dropkey``, ``dropkey_block``, ``dropkey_cross``) or a
:class:`~dropkey.regularisers.Regulariser` carrying its settings (all-dropped convention, grid,
block side, ...), e.g. ``variant=regularisers.create("dropkey_block", grid=(8, 8))``. Its rate is
``drop_ratio`` (changed by :meth:`DropKeyAttention.set_drop_ratio`). It acts in training mode
only; eval mode is plain attention. ``reattention``: None, a form's name or
:class:`~dropkey.reattention.ReattentionSettings`.

Two paths compute the same thing (docs/attention.md, "DropKeyAttention: two paths"): the fast
path (the regulariser's :meth:`~dropkey.regularisers.Regulariser.attention`, weights never
materialised) and the reference path (logits -> keep mask -> the regulariser's
:meth:`~dropkey.regularisers.Regulariser.weights` -> optional Re-attention -> maps @ v), which
runs when weights are needed: ``forward(x, return_weights=True)``, ``record_weights=True``,
Re-attention, ``fused_attn=False``, or a caller's mask with a regulariser. Both draw the keep
mask from the same generator in the same way.

Observing the reference path. Three ``nn.Identity`` probes sit on it; forward hooks
on them (see :mod:`dropkey.diagnostics`) see the tensors without changing them:

- ``logits_probe``   logits (B, H, N, N) before masking (register a tensor hook on the
                     hook's output for dL/dlogits);
- ``weights_probe``  post-softmax weights (B, H, N, N), after the drop, before Re-attention;
- ``maps_probe``     the maps (B, H, N, N) that multiply V (after Re-attention if any).

The probes hold no parameters, so the state_dict keys stay timm's.

timm compatibility (``timm.layers.Attention``, checked against timm's current source):

- the constructor takes timm's keywords ``qkv_bias``, ``qk_norm`` (``q_norm``/``k_norm``:
  ``norm_layer`` over ``head_dim``, applied to q and k of every head; ``nn.Identity`` when off),
  ``scale_norm`` (``norm``: ``norm_layer`` over the attention output before ``proj``),
  ``proj_bias``, ``attn_drop``, ``proj_drop``, ``norm_layer`` (default: ``nn.LayerNorm``
  when a norm is asked for), ``attn_head_dim``, ``dim_out``, ``device`` and ``dtype``, with
  timm's submodule names, so timm's ``state_dict`` loads as is in every configuration;
- ``attn_drop`` is timm's post-softmax attention dropout. It is another name for the rate
  of ``variant="dropout"``: with ``variant`` not given (or ``"dropout"``) and
  ``drop_ratio == 0``, ``attn_drop=r`` gives ``variant="dropout"``, ``drop_ratio=r``
  (what timm does). Giving ``attn_drop > 0`` together with ``drop_ratio > 0``, or with
  another explicit ``variant``, raises ValueError (a regulariser is picked by ``variant``
  and its rate is ``drop_ratio``; use those for DropKey);
- ``forward(x, attn_mask=None, is_causal=False, *, return_weights=False)``: ``attn_mask``
  is a bool mask (True = takes part) or an additive float mask (of the inputs' dtype),
  broadcastable to (B, H, N, N), as in ``F.scaled_dot_product_attention``; ``is_causal``
  masks the keys after each query; the two exclude each other (ValueError), as in SDPA.
  Without a regulariser (eval mode, ``drop_ratio == 0``, ``variant="none"``) the result is
  timm's, bit for bit (fused: the same SDPA call; reference: logits + additive mask,
  softmax). With one, the caller's mask is added to the logits and the regulariser's keep
  mask is combined with it before the softmax (reference path): a key takes part iff the
  caller allows it and the regulariser keeps it. ``all_dropped`` then applies to rows where
  the caller allows keys but the regulariser dropped all of them: ``zero`` -> 0,
  ``uniform`` -> 1 / n over the n keys the caller allows, ``undropped`` -> the softmax with
  the caller's mask only (docs/theory.md section 1). A row the caller's mask leaves without any
  key gets weights 0 and output 0 on every backend and path, with or without a regulariser
  (timm gives SDPA's output there, zeros on CPU, and NaN on its non-fused path);
- NaN in, NaN out: a NaN in q, k or v reaches the output on every path, in training and eval
  (torch's CPU SDPA returns zeros for a row whose logits are all NaN: the fused paths give the
  NaN back, :func:`dropkey.functional.propagate_nan`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropkey import functional, masks, regularisers
from dropkey.reattention import ReattentionSettings
from dropkey.reference import check_input
from dropkey.regularisers import Context, Regulariser
from theory.checks import check_bool, check_choice, check_int

log = logging.getLogger(__name__)


#: The largest size (dim, heads, and in ViTConfig image side, depth, MLP width ...) a module may ask for: beyond
#: what torch's tensor sizes and a machine's memory can hold together (a ValueError naming it, not torch's errors).
MAX_SIZE = 2**31 - 1

def __getattr__(name: str) -> Any:
    """``VARIANTS`` and ``GRID_VARIANTS``: the registry's names now (a regulariser registered later counts)."""
    if name == "VARIANTS":
        return regularisers.names()
    if name == "GRID_VARIANTS":
        return regularisers.grid_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_variant(
    variant: str | Regulariser | None, drop_ratio: float, attn_drop: float
) -> tuple[Regulariser, float]:
    """(regulariser, drop_ratio) from the arguments, with timm's ``attn_drop`` mapped (see the module doc)."""
    name = (
        variant.name
        if isinstance(variant, Regulariser)
        else None if variant is None else regularisers.get(variant).name
    )
    if attn_drop == 0.0:
        return regularisers.create("dropkey" if variant is None else variant), drop_ratio
    if drop_ratio > 0.0:
        raise ValueError(
            f"give the attention regulariser's rate once: drop_ratio={drop_ratio!r} (for variant) or "
            f"timm's attn_drop={attn_drop!r} (post-softmax dropout), not both"
        )
    if name not in (None, "dropout"):
        raise ValueError(
            f"attn_drop is timm's post-softmax dropout and needs variant None or 'dropout', got "
            f"variant={name!r}; give that variant's rate as drop_ratio instead"
        )
    return regularisers.create("dropout" if variant is None else variant), attn_drop


def _blank_rows(attn_mask: Tensor | None) -> Tensor | None:
    """The rows (bool, (..., Nq, 1)) a caller's mask leaves without any key, or None (no mask).

    One rule on every backend and path (docs/attention.md, "Masks"): such a row's output is 0.
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return ~attn_mask.any(dim=-1, keepdim=True)
    return torch.isneginf(attn_mask).all(dim=-1, keepdim=True)


def _attn_bias(logits: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """The caller's mask as an additive bias for ``logits`` (-inf = excluded), or None (timm's rule)."""
    if is_causal:
        return logits.new_full(logits.shape[-2:], float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=logits.dtype).masked_fill_(~attn_mask, float("-inf"))


class DropKeyAttention(nn.Module):
    """Multi-head self-attention with a pluggable attention regulariser (see the module doc)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        # the attention regulariser and its rate
        variant: str | Regulariser | None = None,
        drop_ratio: float = 0.0,
        # DeepViT Re-attention
        reattention: str | ReattentionSettings | None = None,
        # implementation
        backend: str = "auto",
        fused_attn: bool = True,
        record_weights: bool = False,
        generator: torch.Generator | int | None = None,
        # timm's keywords
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``variant=None`` means ``"dropkey"`` (``"dropout"`` when only timm's ``attn_drop`` is given)."""
        super().__init__()
        dim = check_int(dim, "dim", 1, MAX_SIZE)
        num_heads = check_int(num_heads, "num_heads", 1, MAX_SIZE)
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
            head_dim = dim // num_heads
        else:
            head_dim = check_int(attn_head_dim, "attn_head_dim", 1, MAX_SIZE)
        dim_out = dim if dim_out is None else check_int(dim_out, "dim_out", 1, MAX_SIZE)
        qk_norm = check_bool(qk_norm, "qk_norm")
        scale_norm = check_bool(scale_norm, "scale_norm")
        qkv_bias = check_bool(qkv_bias, "qkv_bias")
        proj_bias = check_bool(proj_bias, "proj_bias")
        if norm_layer is None:
            norm_layer = nn.LayerNorm
        elif not callable(norm_layer):
            raise ValueError(
                f"norm_layer must be a callable building a norm module (e.g. nn.LayerNorm) or None, got {norm_layer!r}"
            )
        ratio = masks.validate_drop_ratio(drop_ratio, "drop_ratio")
        timm_ratio = masks.validate_drop_ratio(attn_drop, "attn_drop")
        self.regulariser, self.drop_ratio = _resolve_variant(variant, ratio, timm_ratio)
        self._check_rate(self.drop_ratio)
        self.backend = check_choice(backend, "backend", functional.BACKENDS)
        settings = ReattentionSettings.of(reattention)

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = self.head_dim**-0.5
        self.fused_attn = check_bool(fused_attn, "fused_attn")
        self.record_weights = check_bool(record_weights, "record_weights")
        self.set_generator(generator)
        self.last_weights: Tensor | None = None  # maps of the last forward, if record_weights

        factory = {"device": device, "dtype": dtype}
        norm_factory = {k: v for k, v in factory.items() if v is not None}  # timm's norms take them; others may not
        # registration order = timm's state_dict order: qkv, q_norm, k_norm, norm, proj
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(head_dim, **norm_factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **norm_factory) if qk_norm else nn.Identity()
        self.logits_probe = nn.Identity()  # (B, H, N, N) logits, reference path only
        self.weights_probe = nn.Identity()  # (B, H, N, N) post-softmax weights after the drop
        self.reattention = None if settings is None else settings.build(num_heads)
        if self.reattention is not None and norm_factory:
            self.reattention.to(**norm_factory)
        self.maps_probe = nn.Identity()  # (B, H, N, N) maps that multiply V
        self.norm = norm_layer(self.attn_dim, **norm_factory) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(masks.validate_drop_ratio(proj_drop, "proj_drop"))

    # --- configuration --------------------------------------------------------------

    @property
    def variant(self) -> str:
        """The regulariser's registered name."""
        return self.regulariser.name

    @property
    def all_dropped(self) -> str:
        """The regulariser's all-dropped convention."""
        return self.regulariser.all_dropped

    def _check_rate(self, ratio: float) -> None:
        if not self.regulariser.has_rate and ratio > 0.0:
            raise ValueError(f"drop_ratio must be 0 for variant={self.variant!r}, got {ratio!r}")

    def set_drop_ratio(self, drop_ratio: float) -> None:
        """Change the drop ratio (e.g. 0 to fine-tune the last epochs without the regulariser)."""
        ratio = masks.validate_drop_ratio(drop_ratio, "drop_ratio")
        self._check_rate(ratio)
        self.drop_ratio = ratio

    def set_generator(self, generator: torch.Generator | int | None) -> None:
        """Draw this module's masks from ``generator``; None = the global RNG.

        An int seed gives the module its own stream (not a fixed mask): a generator
        seeded with it is created on the device of the first input (and re-created,
        reseeded, if the module later sees inputs on another device).
        """
        generator = masks.check_generator(generator)
        self._seed = generator if isinstance(generator, int) else None
        self.generator = generator if isinstance(generator, torch.Generator) else None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self._seed is not None and (self.generator is None or self.generator.device != device):
            if self.generator is not None:
                log.info("mask generator moved to %s and reseeded with %d", device, self._seed)
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
        return self.generator

    @property
    def owns_generator(self) -> bool:
        """True when masks come from this module's own generator (int seed or torch.Generator), not the global RNG."""
        return self._seed is not None or self.generator is not None

    @contextlib.contextmanager
    def generator_override(self, generator: torch.Generator | int | None) -> Iterator[DropKeyAttention]:
        """Draw masks from ``generator`` inside the ``with`` block, as :meth:`set_generator` would.

        On exit the module's own generator comes back untouched: the same object in the
        same state (it is set aside, not reseeded), so its training stream goes on exactly
        where it was. Used by :func:`dropkey.inference.monte_carlo_predict`.
        """
        saved = (self._seed, self.generator)
        self.set_generator(generator)
        try:
            yield self
        finally:
            self._seed, self.generator = saved

    @property
    def regularising(self) -> bool:
        """True when the next forward applies the regulariser (training mode, r > 0)."""
        return self.training and self.drop_ratio > 0.0 and self.regulariser.has_rate

    @property
    def uses_reference_path(self) -> bool:
        """True when a plain forward materialises weights (so the probes see them)."""
        return not self.fused_attn or self.record_weights or self.reattention is not None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, {self.regulariser.describe()}, " \
            f"drop_ratio={self.drop_ratio}"

    # --- masks ----------------------------------------------------------------------

    def _context(self, device: torch.device, dtype: torch.dtype | None = None) -> Context:
        return Context(
            generator=self._generator_for(device), device=device, dtype=dtype, backend=self.backend, scale=self.scale
        )

    def keep_mask(
        self, shape: tuple[int, ...], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Draw this regulariser's keep mask (bool, True = kept) for logits of ``shape`` (..., N, N).

        Independent (dropkey, dropout): (..., N, N); dropattention: (..., 1, N);
        block/cross: as :mod:`dropkey.masks` returns them (broadcastable to ``shape``).
        For ``dropkey`` the mask is the one the fast path uses for inputs of ``dtype``
        on ``device``: the hash mask where that path resolves to the ``triton`` or
        ``cpp`` backend (:func:`dropkey.functional.resolve_backend`), else Bernoulli.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        return self.regulariser.keep_mask(shape, self.drop_ratio, self._context(device, dtype))

    # --- attention on per-head tensors ----------------------------------------------

    def _check_attn_mask(self, attn_mask: object, is_causal: object, q: Tensor, k: Tensor) -> None:
        check_bool(is_causal, "is_causal")
        if attn_mask is None:
            return
        if not isinstance(attn_mask, Tensor):
            raise ValueError(
                "attn_mask must be a torch.Tensor (bool: True = takes part, or an additive float mask) "
                f"or None, got {type(attn_mask).__name__} (return_weights is keyword-only)"
            )
        if is_causal:
            raise ValueError("attn_mask and is_causal=True exclude each other (as in scaled_dot_product_attention)")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise ValueError(
                f"attn_mask must be torch.bool or of the inputs' dtype ({q.dtype}), got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on the inputs' device ({q.device}), got {attn_mask.device}")
        target = (*q.shape[:-1], k.shape[-2])
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} must be broadcastable to (B, H, N, N) = {target}"
            )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """q, k (B, H, N, D), v (B, H, N, Dv) -> (output (B, H, N, Dv), maps (B, H, N, N) or None).

        ``attn_mask`` / ``is_causal``: the caller's mask, as in :meth:`forward`.
        """
        self._check_attn_mask(attn_mask, is_causal, q, k)
        masked = attn_mask is not None or is_causal
        if need_weights or self.uses_reference_path or (masked and self.regularising):
            return self._reference_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self._fused_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal), None

    def _fused_attention(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if not self.regularising:
            if attn_mask is not None or is_causal:
                if self.backend == "reference":
                    return self._reference_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)[0]
                # timm's fused call verbatim (every other backend's plain attention is SDPA), then the
                # rules SDPA does not keep everywhere: NaN in, NaN out; a row the mask blanks gives 0
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
                blank = _blank_rows(attn_mask)
                if blank is not None:
                    out = out.masked_fill(blank, 0.0)
                    if attn_mask.is_floating_point():  # a NaN in an additive mask is a NaN in the logits
                        out = out.masked_fill(torch.isnan(attn_mask).any(dim=-1, keepdim=True) & ~blank, float("nan"))
                return functional.propagate_nan(out, q, k, blank)
            if self.backend == "auto":
                # timm's fused call verbatim (default scale == self.scale): matches timm bit for bit
                return functional.propagate_nan(F.scaled_dot_product_attention(q, k, v), q, k)
            return functional.plain_attention(q, k, v, scale=self.scale, backend=self.backend)
        return self.regulariser.attention(q, k, v, self.drop_ratio, self._context(q.device))

    def _reference_attention(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N), timm's order of operations
        logits = self.logits_probe(logits)
        bias = _attn_bias(logits, attn_mask, is_causal)
        blank = None if is_causal else _blank_rows(bias)
        if blank is not None:  # a row the caller's mask blanks: finite logits there (no NaN, in backward too), 0 below
            bias = bias.masked_fill(blank, 0.0)
        if bias is not None:
            logits = logits + bias  # timm's maybe_add_mask
        if not self.regularising:
            weights = logits.softmax(dim=-1)
        else:
            keep = self.keep_mask(tuple(logits.shape), device=logits.device, dtype=logits.dtype)
            allowed = None if bias is None else ~torch.isneginf(bias)
            weights = self.regulariser.weights(logits, keep, self.drop_ratio, allowed)
        if blank is not None:  # a row the caller's mask blanks: weights 0, not softmax([-inf...]) = NaN
            weights = weights.masked_fill(blank, 0.0)
        weights = self.weights_probe(weights)
        maps = weights if self.reattention is None else self.reattention(weights)
        maps = self.maps_probe(maps)
        if self.record_weights:
            self.last_weights = maps.detach()
        return maps @ v, maps

    # --- module forward ---------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, N, C) -> (B, N, dim_out); with ``return_weights`` also the maps (B, H, N, N).

        ``attn_mask`` (bool, True = takes part, or additive float; broadcastable to
        (B, H, N, N)) and ``is_causal`` as in timm's Attention (see the module doc).
        """
        check_input(x, "x", (None, None, self.qkv.in_features), "(B, N, C)")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        out, maps = self.attend(q, k, v, need_weights=return_weights, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        if return_weights:
            return out, maps
        return out
