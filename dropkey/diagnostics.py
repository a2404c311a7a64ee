"""Attention diagnostics collected by hooks that never change a model's outputs.

:class:`AttentionRecorder` attaches forward hooks to the probes of every
:class:`~dropkey.modules.DropKeyAttention` in a model (and tensor hooks on the
logits for gradients). Hooks only read detached copies under ``no_grad``, return
nothing and draw no random numbers, so outputs, gradients and RNG streams are
bit-identical with and without the recorder.

Definitions (per layer and head, averaged over batch and query rows; all rows,
class-token row included, all keys included):

- ``entropy``        -sum_j w_ij log w_ij of the post-softmax weights w (after the drop,
                     before Re-attention), in nats, 0 log 0 = 0 (for variant "dropout" the
                     rows are the rescaled b p / (1 - r), as they multiply V);
- ``peak``           max_j w_ij, the weight of the most-attended key;
- ``grad_top``       dL/ds_ij* on the logit s of the most-attended key j* = argmax_j w_ij;
- ``grad_rest``      the mean of dL/ds_ij over the other keys that received weight
                     (w_ij > 0, i.e. kept keys); rows where no other key was kept are skipped;
- ``abs_grad_top``, ``abs_grad_rest``  the same with |dL/ds|.

Without Re-attention, softmax gradients sum to 0 over a row, so the signed
``grad_rest`` is tied to ``grad_top``; the absolute values carry the comparison.

Cross-layer similarity (DeepViT, arXiv 2103.11886, section 3): for blocks p, q,
head h and token t, the cosine similarity between column t of block p's map and
column t of block q's map (the attention token t receives from every query),
averaged over batch and tokens. The uncentred cosine is close to 1 for any two
near-uniform maps (an untrained network scores ~1), so the suite also records the
*centred* similarity (``measure="correlation"``): the Pearson correlation of the two
columns, which a per-map shift or scale does not move and which is 0 on average for
unrelated maps. By default the maps are the ones that multiply V
(after Re-attention, where it is used: DeepViT's definition); ``source="weights"``
uses the softmax weights before any mixing instead. The two agree without
Re-attention; with it the mixed maps are BatchNorm-normalised over heads (signed,
roughly zero-mean), so their cosine is not comparable with a softmax map's and the
weights give the like-for-like comparison. Rows: block_a, block_b, head, value.

The recorder needs the weights, i.e. the reference path. A module configured for
the fused path would have to switch paths, which may change outputs at the level
of float rounding, so the recorder refuses (ValueError) unless
``switch_to_reference=True``, in which case it switches and restores on detach.
Build models with ``fused_attn=False`` to record without any change.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropkey.modules import DropKeyAttention
from theory.checks import check_choice

if TYPE_CHECKING:  # pandas builds the tidy frames only: imported where a frame is made
    import pandas as pd

log = logging.getLogger(__name__)

ROW_METRICS = ("entropy", "peak")
GRADIENT_METRICS = ("grad_top", "grad_rest", "abs_grad_top", "abs_grad_rest")
SIMILARITY_PAIRS = ("adjacent", "all")
SIMILARITY_SOURCES = ("maps", "weights")


# --- per-row quantities ---------------------------------------------------------------


def attention_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of each row of weights (..., N) -> (...); 0 log 0 = 0 (the torch home of the entropy;
    numpy's is :func:`theory.conventions.entropy`)."""
    return torch.special.entr(weights).sum(dim=-1)


def peak_weight(weights: Tensor) -> Tensor:
    """Largest weight of each row (..., N) -> (...)."""
    return weights.amax(dim=-1)


def top_and_rest_gradient(grad: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split dL/dlogits (..., N) into the most-attended key's gradient and the rest's mean.

    Returns (top, rest_mean, abs_top, abs_rest_mean), each (...), and rows whose other
    keys all have zero weight give NaN in the rest columns (callers skip them).
    """
    top_index = weights.argmax(dim=-1, keepdim=True)  # (..., 1)
    top = grad.gather(-1, top_index).squeeze(-1)
    rest = (weights > 0).scatter(-1, top_index, False)  # other keys that received weight
    count = rest.sum(dim=-1)
    rest_grad = torch.where(rest, grad, torch.zeros_like(grad))
    nan = torch.full_like(top, float("nan"))
    rest_mean = torch.where(count > 0, rest_grad.sum(-1) / count.clamp(min=1), nan)
    abs_rest_mean = torch.where(count > 0, rest_grad.abs().sum(-1) / count.clamp(min=1), nan)
    return top, rest_mean, top.abs(), abs_rest_mean


def column_cosine_similarity(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """DeepViT's similarity: cosine over queries of column t of two maps (B, H, N, N) -> (B, H, N)."""
    return F.cosine_similarity(maps_a.double(), maps_b.double(), dim=-2)


#: A column whose centred norm is below this fraction of its uncentred norm is numerically constant.
CONSTANT_COLUMN_TOLERANCE = 1e-9


def column_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Centred similarity: Pearson correlation over queries of column t of two maps (B, H, N, N) -> (B, H, N).

    Each column is centred on its mean over queries before the cosine, so a per-map shift and
    scale (what a BatchNorm over heads applies) leaves it unchanged, and a uniform map does not
    score 1 with every other map. A numerically constant column has no correlation: NaN.
    """
    a, b = maps_a.double(), maps_b.double()
    a_centred = a - a.mean(dim=-2, keepdim=True)
    b_centred = b - b.mean(dim=-2, keepdim=True)
    norm_a, norm_b = a_centred.norm(dim=-2), b_centred.norm(dim=-2)
    constant = (norm_a <= CONSTANT_COLUMN_TOLERANCE * a.norm(dim=-2)) | (
        norm_b <= CONSTANT_COLUMN_TOLERANCE * b.norm(dim=-2)
    )
    value = (a_centred * b_centred).sum(dim=-2) / (norm_a * norm_b).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(constant, torch.full_like(value, float("nan")), value)


#: How two maps' columns are compared: DeepViT's uncentred cosine, or the centred (Pearson) correlation.
SIMILARITY_MEASURES = {"cosine": column_cosine_similarity, "correlation": column_correlation}


def cross_layer_similarity(maps: Sequence[Tensor], *, pairs: str = "adjacent", measure: str = "cosine") -> pd.DataFrame:
    """Tidy similarity rows (block_a, block_b, head, value) for maps[i] of block i, each (B, H, N, N).

    pairs: ``"adjacent"`` (each block vs the next) or ``"all"`` (every p < q). measure: ``"cosine"``
    (DeepViT's definition) or ``"correlation"`` (centred; constant columns are left out of the mean).
    """
    check_choice(pairs, "pairs", SIMILARITY_PAIRS)
    check_choice(measure, "measure", tuple(SIMILARITY_MEASURES))
    compare = SIMILARITY_MEASURES[measure]
    indices = range(len(maps))
    chosen = zip(indices, indices[1:], strict=False) if pairs == "adjacent" else itertools.combinations(indices, 2)
    rows = []
    for a, b in chosen:
        per_head = compare(maps[a], maps[b]).nanmean(dim=(0, 2))  # (H,)
        rows += [
            {"block_a": a, "block_b": b, "head": h, "value": float(v)} for h, v in enumerate(per_head.tolist())
        ]
    import pandas as pd

    return pd.DataFrame(rows, columns=["block_a", "block_b", "head", "value"])


# --- the recorder ---------------------------------------------------------------------


class AttentionRecorder:
    """Context manager recording attention diagnostics of every DropKeyAttention in ``model``.

    >>> with AttentionRecorder(model) as recorder:      # doctest: +SKIP
    ...     model(images).logsumexp(-1).sum().backward()
    >>> recorder.to_frame()                             # layer, module, head, metric, value, count

    store_maps: keep every forward's maps and softmax weights (memory: 2 x B x H x N x N per
    layer and call) for :meth:`similarity_frame`. switch_to_reference: see the module doc.
    """

    def __init__(self, model: nn.Module, *, store_maps: bool = False, switch_to_reference: bool = False) -> None:
        self.model = model
        self.store_maps = bool(store_maps)
        self.switch_to_reference = bool(switch_to_reference)
        self.layers: list[tuple[str, DropKeyAttention]] = [
            (name, m) for name, m in model.named_modules() if isinstance(m, DropKeyAttention)
        ]
        if not self.layers:
            raise ValueError("model has no DropKeyAttention module to record")
        self._handles: list[Any] = []
        self._switched: list[DropKeyAttention] = []
        self._attached = False
        self.reset()

    # attach / detach

    def attach(self) -> AttentionRecorder:
        if self._attached:
            raise RuntimeError("AttentionRecorder is already attached")
        fused = [name or "<model>" for name, m in self.layers if not m.uses_reference_path]
        if fused and not self.switch_to_reference:
            raise ValueError(
                f"modules {fused} run the fused path (no weights to observe); build them with "
                "fused_attn=False, or pass switch_to_reference=True (outputs may then differ "
                "from the fused path's at float-rounding level)"
            )
        for layer, (_, module) in enumerate(self.layers):
            if not module.uses_reference_path:
                module.fused_attn = False
                self._switched.append(module)
            self._handles.append(module.logits_probe.register_forward_hook(self._logits_hook(layer)))
            self._handles.append(module.weights_probe.register_forward_hook(self._weights_hook(layer)))
            if self.store_maps:
                self._handles.append(module.maps_probe.register_forward_hook(self._maps_hook(layer)))
        self._attached = True
        log.debug("AttentionRecorder attached to %d modules (%d switched)", len(self.layers), len(self._switched))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._switched:
            module.fused_attn = True
        self._switched.clear()
        self._pending.clear()
        self._attached = False

    def __enter__(self) -> AttentionRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._sums: dict[tuple[int, str], Tensor] = {}
        self._counts: dict[tuple[int, str], Tensor] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}
        self.maps: dict[int, list[Tensor]] = defaultdict(list)
        self.weights: dict[int, list[Tensor]] = defaultdict(list)

    # hooks (read-only: they return None and touch only detached tensors)

    def _accumulate(self, layer: int, metric: str, values: Tensor) -> None:
        """Add per-row values (B, H, N) (NaN = skip) to the per-head sums."""
        values = values.detach().double()
        valid = ~torch.isnan(values)
        total = torch.where(valid, values, torch.zeros_like(values)).sum(dim=(0, 2)).cpu()
        count = valid.sum(dim=(0, 2)).cpu()
        key = (layer, metric)
        if key in self._sums:
            self._sums[key] += total
            self._counts[key] += count
        else:
            self._sums[key], self._counts[key] = total, count

    def _logits_hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], logits: Tensor) -> None:
            if not (self._attached and torch.is_grad_enabled() and logits.requires_grad):
                return
            state: dict[str, Tensor] = {}
            self._pending[layer] = state  # filled by the weights hook of the same forward

            def on_grad(grad: Tensor) -> None:
                if not self._attached or "weights" not in state:
                    return
                with torch.no_grad():
                    parts = top_and_rest_gradient(grad.detach(), state.pop("weights"))
                for metric, values in zip(GRADIENT_METRICS, parts, strict=True):
                    self._accumulate(layer, metric, values)

            logits.register_hook(on_grad)

        return hook

    def _weights_hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor) -> None:
            with torch.no_grad():
                w = weights.detach()
                self._accumulate(layer, "entropy", attention_entropy(w))
                self._accumulate(layer, "peak", peak_weight(w))
                state = self._pending.pop(layer, None)
                if state is not None:
                    state["weights"] = w
                if self.store_maps:
                    self.weights[layer].append(w)

        return hook

    def _maps_hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], maps: Tensor) -> None:
            self.maps[layer].append(maps.detach())

        return hook

    # results

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: layer, module, head, metric, value (mean over rows), count (rows)."""
        rows = []
        for (layer, metric), total in sorted(self._sums.items()):
            count = self._counts[(layer, metric)]
            for head in range(total.numel()):
                n = int(count[head])
                rows.append({
                    "layer": layer, "module": self.layers[layer][0], "head": head, "metric": metric,
                    "value": float(total[head] / n) if n else float("nan"), "count": n,
                })
        import pandas as pd

        return pd.DataFrame(rows, columns=["layer", "module", "head", "metric", "value", "count"])

    def similarity_frame(
        self, *, pairs: str = "adjacent", source: str = "maps", measure: str = "cosine"
    ) -> pd.DataFrame:
        """DeepViT cross-layer similarity of the stored maps or softmax weights (needs ``store_maps=True``).

        source: ``"maps"`` (what multiplies V, after Re-attention: DeepViT's definition) or
        ``"weights"`` (the softmax weights before any mixing); see the module doc. measure:
        ``"cosine"`` (DeepViT's) or ``"correlation"`` (centred, see :func:`column_correlation`).
        """
        if not self.store_maps:
            raise ValueError("similarity_frame needs AttentionRecorder(..., store_maps=True)")
        check_choice(source, "source", SIMILARITY_SOURCES)
        recorded = self.maps if source == "maps" else self.weights
        layers = sorted(recorded)
        if layers != list(range(len(self.layers))):
            raise ValueError("no maps recorded for some layers; run a forward pass inside the recorder")
        stacked = [torch.cat(recorded[layer], dim=0) for layer in layers]
        return cross_layer_similarity(stacked, pairs=pairs, measure=measure)
