"""DropKey attention (Li et al., "DropKey for Vision Transformer", CVPR 2023): one function, several backends.

In training every attention logit ``(..., query, key)`` is dropped independently with
probability ``drop_ratio`` (set to -inf before the softmax), with no rescaling:

    w_j = b_j p_j / sum_k b_k p_k,   b_j ~ Bernoulli(1 - drop_ratio),   o = sum_j w_j v_j.

A row whose keys are all dropped (probability ``r ** Nk``) follows the convention
``all_dropped`` (``zero``, ``uniform`` -- the default --, ``undropped``; docs/theory.md
section 1). No convention ever produces NaN, in any floating dtype, for finite q, k, v.

Backends (:data:`BACKENDS`), all exact and tested against ``reference``:

- ``reference``: the specification, :func:`~dropkey.reference.masked_softmax` then ``@ v``;
- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` with a bool mask,
  all-dropped rows fixed exactly afterwards;
- ``fused``: chunked custom-autograd attention that never holds an N x N float tensor
  (:mod:`dropkey.kernels.fused`; on CPU torch's flash kernels, :mod:`dropkey.kernels.fused_flash`),
  the Bernoulli mask streamed and kept at 1 bit per logit;
- ``triton``: the fused Triton kernels (CUDA, or the interpreter in tests), hash mask;
- ``cpp``: the fused C++ CPU kernel (float32), hash mask;
- ``auto``: ``cpp`` / ``triton`` where they apply, else ``fused`` on CPU and ``sdpa`` elsewhere
  (:func:`resolve_backend`).

Masks (:data:`MASKS`): ``"bernoulli"`` (:func:`dropkey.masks.bernoulli_drop_mask`; the same
generator state gives the same mask in every backend) or ``"hash"``
(:func:`dropkey.kernels.hash_drop_mask`, what ``triton`` and ``cpp`` compute inside the
kernel; the other backends materialise the same mask). ``training=False`` or
``drop_ratio == 0`` is :func:`plain_attention` of the same backend. The baselines
(:func:`post_softmax_dropout_attention`, :func:`paper_dropkey_attention`) live in
:mod:`dropkey.baseline`. Kernel internals and design history: docs/attention.md.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from dropkey.baseline import paper_dropkey_attention, post_softmax_dropout_attention
from dropkey.kernels.fused import FusedMaskedAttention
from dropkey.kernels.fused_flash import FlashMaskedAttention, uses_flash
from dropkey.masks import BernoulliStream, GeneratorLike, bernoulli_drop_mask, resolve_generator, validate_drop_ratio
from dropkey.reference import (
    ALL_DROPPED_CONVENTIONS,
    DEFAULT,
    HALF,
    check_keep,
    check_qkv,
    check_scale,
    check_training,
    masked_softmax,
    reference_attention_output,
    reference_logits,
    reference_masked_attention,
)
from theory.checks import check_choice
from theory.conventions import check_all_dropped

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_DROPPED_CONVENTIONS",
    "BACKENDS",
    "HASH_BACKENDS",
    "attention_from_keep_mask",
    "dropkey_attention",
    "masked_softmax",
    "MASKS",
    "paper_dropkey_attention",
    "plain_attention",
    "post_softmax_dropout_attention",
    "propagate_nan",
    "resolve_backend",
]

BACKENDS = ("auto", "reference", "sdpa", "fused", "triton", "cpp")
MASKS = ("bernoulli", "hash")
# Backends that take a given mask (attention_from_keep_mask): all but the two kernels,
# which compute their own hash mask.
_MASK_BACKENDS = ("auto", "reference", "sdpa", "fused")
HASH_BACKENDS = ("triton", "cpp")  # the kernels that compute their own hash mask (no given mask)


# --------------------------------------------------------------------------- validation


def _check_backend(backend: object, allowed: tuple[str, ...] = BACKENDS) -> str:
    return check_choice(backend, "backend", allowed)


def _check_mask(mask: object) -> Optional[str]:
    if mask is not None and mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS} or None (the backend's own), got {mask!r}")
    return None if mask is None else str(mask)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Backend for a given mask: ``auto`` -> ``fused`` on CPU, ``sdpa`` elsewhere (never ``triton``)."""
    if backend == "auto":
        return "fused" if device.type == "cpu" else "sdpa"
    return backend


def resolve_backend(
    backend: str, device: torch.device | str, dtype: Optional[torch.dtype] = None, mask: Optional[str] = None
) -> tuple[str, str]:
    """(backend, mask) that :func:`dropkey_attention` uses for inputs on ``device`` of ``dtype``.

    ``auto`` becomes, unless ``mask="bernoulli"`` and for ``dtype`` None or one the
    kernel supports: on CPU ``cpp`` (float32) when the C++ kernel builds and loads
    (torch custom ops: :func:`torch.compile` traces them); on CUDA ``triton`` (float16,
    bfloat16, float32) when triton is importable. Otherwise ``auto`` is ``fused``
    on CPU and ``sdpa`` elsewhere. ``mask=None`` becomes ``"hash"`` for ``triton``
    and ``cpp`` and ``"bernoulli"`` otherwise. ``backend="triton"`` or ``"cpp"``
    with ``mask="bernoulli"`` raises ValueError (those kernels only hash).
    """
    name = _check_backend(backend)
    kind = _check_mask(mask)
    dev = torch.device(device)
    if name == "auto":
        name = _resolve_backend(name, dev)
        if kind != "bernoulli":
            if dev.type == "cuda" and dtype in (None, torch.float16, torch.bfloat16, torch.float32):
                from dropkey.kernels import triton_available

                if triton_available():
                    name = "triton"
            elif dev.type == "cpu" and dtype in (None, torch.float32):
                from dropkey.kernels import cpp_available

                if cpp_available():
                    name = "cpp"
    if kind is None:
        kind = "hash" if name in HASH_BACKENDS else "bernoulli"
    if name in HASH_BACKENDS and kind != "hash":
        raise ValueError(f"mask must be 'hash' (or None) with backend={name!r}: the kernel computes a hash mask")
    return name, kind


# --------------------------------------------------------------------------- plain attention


def plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None, backend: str = "auto"
) -> torch.Tensor:
    """Plain softmax attention, (..., Nq, d) from q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv).

    ``reference``: ``softmax((q @ k^T) * scale)`` (float32 softmax for half dtypes) ``@ v``.
    Every other backend: ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.
    This is what :func:`dropkey_attention` returns in eval mode or at ``drop_ratio == 0``.
    """
    check_qkv(q, k, v)
    backend = _check_backend(backend)
    scale_value = check_scale(scale, q)
    if backend == "reference":
        return reference_attention_output(masked_softmax(reference_logits(q, k, scale_value), None), v)
    return propagate_nan(F.scaled_dot_product_attention(q, k, v, scale=scale_value), q, k)


def propagate_nan(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, blank: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``out`` of SDPA on q, k with NaN in every row whose logits hold a NaN: NaN in, NaN out.

    A NaN in q's row i makes every logit of row i NaN, and a NaN in any key makes one logit of
    every row NaN; the softmax of such a row is NaN. torch's CPU SDPA kernels return zeros
    instead for a row whose logits are *all* NaN (they take it for a fully masked row), hiding
    the NaN. Those rows get their NaN back here. ``blank``: bool, broadcastable to (..., Nq, 1),
    the rows a caller's mask leaves without any key (their output is 0, NaN or not).

    Cost: on CPU one sum over q and one over k (O(B*H*N*d), no N x N work, no allocation of
    their size) decides whether anything is NaN; only then are the rows found. Elsewhere (no
    free host sync) the row test and one ``masked_fill`` of the output run every time, O(B*H*N*d).
    """
    if out.device.type == "cpu" and not torch.compiler.is_compiling():
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        if not bool(torch.isnan(q.sum(dtype=work) + k.sum(dtype=work))):  # inf - inf: a false alarm only
            return out
    rows = torch.isnan(q).any(dim=-1, keepdim=True) | torch.isnan(k).flatten(-2).any(dim=-1)[..., None, None]
    if blank is not None:
        rows = rows & ~blank
    return out.masked_fill(rows, float("nan"))


# --------------------------------------------------------------------------- sdpa


def _sdpa_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, convention: str, scale: float, owned: bool
) -> torch.Tensor:
    """SDPA with a bool mask; empty rows get a full row of True first, then the exact fix-up."""
    nk = k.shape[-2]
    keep = keep.expand(*keep.shape[:-1], nk)
    # (..., Nq or 1, 1); a uint8 max is several times faster than bool any() on CPU
    dead = keep.view(torch.uint8).amax(dim=-1, keepdim=True) == 0
    # in place when the mask is ours; not under torch.compile: functionalising an in-place op on
    # the result of expand (even a no-op one) fails there (torch 2.13: "Subtraction ... two bool tensors")
    if owned and keep.is_contiguous() and not torch.compiler.is_compiling():
        safe = keep.logical_or_(dead)
    else:
        safe = keep | dead
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    if convention == "zero":
        out = out.masked_fill(dead, 0.0)
    elif convention == "uniform":
        out = torch.where(dead, v.mean(dim=-2, keepdim=True), out)
    return out  # undropped: SDPA of a full row is plain attention of that row


# --------------------------------------------------------------------------- fused


def _fused_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop: Optional[torch.Tensor],
    stream: Optional[BernoulliStream],
    convention: str,
    scale: float,
) -> torch.Tensor:
    """The fused backend's autograd function: flash kernels on CPU (zero-padding q, k or v to one
    head size when d != dv: exact), else the chunked matmul path."""
    if not uses_flash(q, k):
        return FusedMaskedAttention.apply(q, k, v, drop, stream, scale, convention)
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv:
        return FlashMaskedAttention.apply(q, k, v, drop, stream, scale, convention)
    if dv < d:
        return FlashMaskedAttention.apply(q, k, F.pad(v, (0, d - dv)), drop, stream, scale, convention)[..., :dv]
    q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    return FlashMaskedAttention.apply(q, k, v, drop, stream, scale, convention)


def _fused_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: torch.Tensor, convention: str, scale: float
) -> torch.Tensor:
    """Fused backend from a drop mask (True = dropped) broadcastable to (..., Nq, Nk)."""
    lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
    full = (*lead, nq, nk)
    if torch.compiler.is_compiling():
        # Under torch.compile: the same maths in plain differentiable ops, without
        # data-dependent branches, so the compiler traces and fuses it.
        dead = drop.expand(full).all(dim=-1, keepdim=True)
        logits = torch.matmul(q * scale, k.transpose(-2, -1))
        logits = logits.float() if q.dtype in HALF else logits
        hide = drop & ~dead & ~torch.isnan(logits)  # a dropped NaN logit stays NaN (masked_softmax's rule)
        weights = torch.softmax(logits.masked_fill(hide, float("-inf")), dim=-1)
        if convention != "undropped":
            weights = weights.masked_fill(dead, 0.0)
        out = torch.matmul(weights.to(v.dtype), v)
        if convention == "uniform":
            out = torch.where(dead, v.mean(dim=-2, keepdim=True), out)
        return out
    drop3 = drop.expand(full).reshape(-1, nq, nk)  # a view when drop is full and contiguous
    return _fused_apply(q, k, v, drop3, None, convention, scale)


def _dispatch(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop: torch.Tensor,
    convention: str,
    scale: float,
    owned: bool,
) -> torch.Tensor:
    """Masked attention from a *drop* mask (True = dropped) by ``backend`` (resolved)."""
    if backend == "fused":
        return _fused_masked(q, k, v, drop, convention, scale)
    keep = drop.logical_not_() if owned else ~drop
    if backend == "sdpa":
        return _sdpa_masked(q, k, v, keep, convention, scale, owned=True)
    return reference_masked_attention(q, k, v, keep, convention, scale)


# --------------------------------------------------------------------------- public API


def dropkey_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_ratio: float,
    *,
    training: bool = True,
    all_dropped: str = DEFAULT,
    generator: GeneratorLike = None,
    backend: str = "auto",
    scale: Optional[float] = None,
    mask: Optional[str] = None,
) -> torch.Tensor:
    """DropKey attention: (..., Nq, dv) from q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv).

    In training, every logit (..., query, key) is dropped independently with
    probability ``drop_ratio`` in [0, 1) before the softmax, with no rescaling; rows
    with all keys dropped follow ``all_dropped`` (see the module doc). With
    ``training=False`` or ``drop_ratio == 0`` this is exactly :func:`plain_attention`
    of the same backend. ``generator``: a :class:`torch.Generator`, an int seed (a
    fresh generator on q's device; for ``mask="hash"`` on the CPU) or None (global
    RNG; for ``mask="hash"`` the CPU one). ``scale`` defaults to ``1 / sqrt(d)``.
    ``backend``: one of :data:`BACKENDS`. ``mask``: one of :data:`MASKS` or None
    (the backend's own: ``"hash"`` for ``triton``, else ``"bernoulli"``).
    """
    check_qkv(q, k, v)
    r = validate_drop_ratio(drop_ratio)
    training = check_training(training)
    convention = check_all_dropped(all_dropped)
    resolved, kind = resolve_backend(backend, q.device, q.dtype, mask)
    scale_value = check_scale(scale, q)
    if not training or r == 0.0:
        return plain_attention(q, k, v, scale=scale_value, backend=backend)
    shape = (*q.shape[:-2], q.shape[-2], k.shape[-2])
    if kind == "hash":
        from dropkey.kernels import hash_drop_mask, hash_seed, hash_seed_tensor

        if resolved == "triton":
            from dropkey.kernels import triton_attention

            return triton_attention(q, k, v, r, seed=hash_seed(generator), all_dropped=convention, scale=scale_value)
        # the seed stays a tensor: nothing for a tracer to break on (the kernel and the mask read it inside their ops)
        seed = hash_seed_tensor(generator)
        if resolved == "cpp":
            from dropkey.kernels import cpp_attention

            return cpp_attention(q, k, v, r, seed=seed, all_dropped=convention, scale=scale_value)
        drop = hash_drop_mask(seed, shape, r, device=q.device)
        return _dispatch(resolved, q, k, v, drop, convention, scale_value, owned=True)
    gen = resolve_generator(generator, q.device)
    if resolved == "fused" and q.device.type == "cpu" and not torch.compiler.is_compiling():
        if gen is not None and gen.device.type != "cpu":
            raise ValueError(f"generator is on {gen.device} but q is on {q.device}: pass a generator of that device")
        stream = BernoulliStream(math.prod(shape), r, gen)  # the very flags bernoulli_drop_mask(shape) would draw
        return _fused_apply(q, k, v, None, stream, convention, scale_value)
    drop = bernoulli_drop_mask(shape, r, generator=gen, device=q.device)
    return _dispatch(resolved, q, k, v, drop, convention, scale_value, owned=True)


def attention_from_keep_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    all_dropped: str = DEFAULT,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``masked_softmax(q k^T * scale, keep) @ v`` by the chosen backend: (..., Nq, dv).

    keep: bool, True = kept, broadcastable to (..., Nq, Nk) (e.g. (..., 1, Nk) for
    DropAttention). ``keep`` is never modified. ``backend``: one of :data:`BACKENDS`
    but ``triton`` (which computes its own hash mask); ``auto`` never picks it.
    """
    check_qkv(q, k, v)
    convention = check_all_dropped(all_dropped)
    backend = _check_backend(backend, _MASK_BACKENDS)
    scale_value = check_scale(scale, q)
    keep = check_keep(keep, (*q.shape[:-2], q.shape[-2], k.shape[-2]), q.device)
    resolved = _resolve_backend(backend, q.device)
    if resolved == "reference":
        return reference_masked_attention(q, k, v, keep, convention, scale_value)
    if resolved == "sdpa":
        return _sdpa_masked(q, k, v, keep, convention, scale_value, owned=False)
    return _fused_masked(q, k, v, keep.logical_not(), convention, scale_value)

