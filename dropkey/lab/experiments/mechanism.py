"""The gradient mechanism, measured directly: does DropKey's expected gradient lower the clean attention peak?

The paper's argument (docs/theory.md, section 4) is about gradients: without a regulariser the
gradient on a row's logits favours its largest weight (rich get richer), and DropKey damps that.
The outcome experiments see only where training ends; this probe measures the mechanism itself,
at fixed parameters, so that it has power on a CPU (docs/experiments.md, "The gradient mechanism").

For a trained ViT (no regulariser, or DropKey) at checkpoints along its training (epoch 0 =
initialisation), on a fixed probe set of its own un-augmented training images (in equal batches):

- ``J``: the gradient, with respect to every parameter, of each block's clean (eval-mode) mean
  attention peak and mean entropy over the probe set (2 x depth rows);
- ``g_R``: the gradient of the training loss over the probe set (cross-entropy with the run's
  label smoothing) under regulariser R at drop ratio r: exact for "none" (clean passes), and for
  DropKey and post-softmax dropout one value per mask pass (fresh masks for every batch; every
  other part of the model in eval mode, so only the attention regulariser differs): its mean over
  the K passes estimates the expected gradient, the passes are the replicates;
- the first-order change of each block's clean peak and entropy along one descent step,
  ``-lr J (M g_R)``, with M = 1 (a plain gradient step) or M = Adam's preconditioner
  1 / (sqrt(v_hat) + eps) from the checkpoint's own optimizer state (at initialisation, where
  there is none, Adam's first step: v_hat = g_none^2), and lr the run's peak learning rate: the
  change one optimizer step makes, to first order (d peak / d eta at eta -> 0). With the whole
  training set as the probe set, g is the expected minibatch gradient, so this is the expected
  change per training step.

The paired difference DropKey - none (and dropout - none) of that change is the direct test of
"DropKey's gradient dynamics shrink attention peaks". Also recorded: each block's clean peak and
entropy, and those of DropKey's exact expected attention E[w] of the same rows at each probed
ratio (:func:`theory.expected_attention`: does training with DropKey sharpen p while E[w] stays
near the plain model's p?); and per block and batch, the mean over rows of
log(|E dL/ds_top| / mean_{j != top} |E dL/ds_j|), the expected logit gradient of the row's
most-attended key (clean weights) against the others' (the real-ViT counterpart of the
Lagrangian argument, Eq. 11).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import theory
from dropkey import regularisers
from dropkey.diagnostics import attention_entropy, peak_weight
from dropkey.modules import DropKeyAttention
from theory.checks import check_choice, check_drop_ratio, check_int, check_real, check_tuple
from theory.seeding import address_sequence, integer_seeds

__all__ = ["ATTENTION_METRICS", "STEPS", "MechanismSettings", "adam_preconditioner", "checkpoint_epochs",
           "probe_checkpoint"]

ATTENTION_METRICS = ("peak", "entropy")  # per block, clean (eval mode), mean over images, heads and rows
STEPS = ("sgd", "adam")  # the descent direction: the gradient itself, or Adam-preconditioned
PROBED_REGULARISERS = ("dropkey", "dropout")
#: the address (seed, MASK_ADDRESS, epoch, regulariser, ratio, pass, batch) of the probe's mask streams
MASK_ADDRESS = 3
ADAM_EPS = 1e-8  # the trainer's AdamW default


@dataclass(frozen=True)
class MechanismSettings:
    """What the probe measures (frozen; validated on construction, ValueError naming the field)."""

    checkpoints: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)  # fractions of the run's epochs (0: initialisation)
    drop_ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    regularisers: tuple[str, ...] = PROBED_REGULARISERS
    masks: int = 16  # K: mask passes per regulariser and ratio (the replicates), each over every probe batch
    batches: int = 10  # the probe set: batches x batch_size training images (all of a 500-image subset)
    batch_size: int = 50
    trained_arms: tuple[str, ...] = ("none", "dropkey")  # the runs probed (DropKey at the scale's ratio)

    def __post_init__(self) -> None:
        fractions = check_tuple(self.checkpoints, "checkpoints", lambda v, n: check_real(v, n, 0.0, 1.0))
        object.__setattr__(self, "checkpoints", tuple(sorted(fractions)))
        object.__setattr__(self, "drop_ratios", check_tuple(
            self.drop_ratios, "drop_ratios", lambda v, n: check_drop_ratio(v, n, allow_zero=False)))
        object.__setattr__(self, "regularisers", check_tuple(
            self.regularisers, "regularisers", lambda v, n: check_choice(v, n, PROBED_REGULARISERS)))
        object.__setattr__(self, "trained_arms", check_tuple(
            self.trained_arms, "trained_arms", lambda v, n: check_choice(v, n, ("none", "dropkey"))))
        for name in ("masks", "batches", "batch_size"):
            check_int(getattr(self, name), name, 2 if name != "batch_size" else 1)


def checkpoint_epochs(settings: MechanismSettings, epochs: int) -> tuple[int, ...]:
    """The epochs probed for a run of ``epochs`` epochs: each fraction rounded, distinct, 0 = initialisation."""
    return tuple(sorted({int(round(f * check_int(epochs, "epochs", 1))) for f in settings.checkpoints}))


# --- one probe batch --------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[DropKeyAttention]:
    modules = [m for m in model.modules() if isinstance(m, DropKeyAttention)]
    if not modules or any(m.uses_reference_path is False for m in modules):
        raise ValueError("model must hold DropKeyAttention modules on their reference path (fused_attn=False)")
    return modules


class _Probes:
    """Forward hooks on each block's logits and weights probes: the tensors of the last forward."""

    def __init__(self, modules: Sequence[DropKeyAttention]) -> None:
        self.logits: list[Tensor | None] = [None] * len(modules)
        self.weights: list[Tensor | None] = [None] * len(modules)
        self._handles = []
        for layer, module in enumerate(modules):
            self._handles.append(module.logits_probe.register_forward_hook(self._store(self.logits, layer)))
            self._handles.append(module.weights_probe.register_forward_hook(self._store(self.weights, layer)))

    @staticmethod
    def _store(where: list, layer: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            where[layer] = output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params,
                                                                                                  strict=True)])


def _clean_jacobian(model: nn.Module, probes: _Probes, params: list[Tensor], images: Tensor) -> tuple[Tensor, list]:
    """J (2 * depth, P): d(mean peak, mean entropy of block l)/d params; and each block's clean weights."""
    model(images)
    rows, weights = [], []
    for w in probes.weights:
        weights.append(w.detach())
        for metric in ATTENTION_METRICS:
            value = peak_weight(w).mean() if metric == "peak" else attention_entropy(w).mean()
            rows.append(value)
    jacobian = torch.stack([
        _flat(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params) for value in rows
    ])
    return jacobian.double(), weights


def _loss_gradient(model: nn.Module, probes: _Probes, params: list[Tensor], images: Tensor, labels: Tensor,
                   label_smoothing: float) -> tuple[Tensor, list[Tensor]]:
    """(flat dL/d params, [dL/d logits of each block]) of one forward with the modules' current settings."""
    loss = F.cross_entropy(model(images).float(), labels, label_smoothing=label_smoothing)
    logits = list(probes.logits)
    grads = torch.autograd.grad(loss, [*params, *logits], allow_unused=True)
    return _flat(grads[: len(params)], params).double(), [g.detach().double() for g in grads[len(params):]]


def _log_top_rest(logit_grad: Tensor, clean_weights: Tensor) -> float:
    """Mean over rows of log(|g_top| / mean_{j != top} |g_j|), top = the clean row's most-attended key."""
    top = clean_weights.argmax(dim=-1, keepdim=True)
    magnitude = logit_grad.abs()
    top_value = magnitude.gather(-1, top).squeeze(-1)
    rest = (magnitude.sum(-1) - top_value) / (magnitude.shape[-1] - 1)
    ok = (top_value > 0) & (rest > 0)
    return float(torch.log(top_value[ok] / rest[ok]).mean()) if bool(ok.any()) else float("nan")


def adam_preconditioner(optimizer_state: dict[str, Any] | None, params: Sequence[Tensor], first_gradient: Tensor,
                        betas: tuple[float, float] = (0.9, 0.999)) -> Tensor:
    """Adam's 1 / (sqrt(v_hat) + eps) per parameter, flat, from an AdamW ``state_dict()``.

    The state's entries are matched to ``params`` in their order in the optimizer's param groups,
    which must list them all (the trainer's groups: decay, then no decay), given as
    ``optimizer_state["param_groups"][i]["params"]``. Without a state (initialisation):
    Adam's first step, v_hat = ``first_gradient``^2.
    """
    if not optimizer_state or not optimizer_state.get("state"):
        return 1.0 / (first_gradient.abs() + ADAM_EPS)
    order = [index for group in optimizer_state["param_groups"] for index in group["params"]]
    if len(order) != len(params):
        raise ValueError(f"optimizer_state lists {len(order)} parameters, the model has {len(params)}")
    parts = []
    for index, param in zip(order, params, strict=True):
        entry = optimizer_state["state"][index]
        if tuple(entry["exp_avg_sq"].shape) != tuple(param.shape):
            raise ValueError(f"optimizer_state entry {index} has shape {tuple(entry['exp_avg_sq'].shape)}, "
                             f"its parameter {tuple(param.shape)}: the params are not in the optimizer's order")
        step = float(entry["step"])
        v_hat = entry["exp_avg_sq"].double() / (1.0 - betas[1] ** step)
        parts.append((1.0 / (v_hat.sqrt() + ADAM_EPS)).reshape(-1))
    return torch.cat(parts)


def probe_checkpoint(
    model: nn.Module,
    params: list[Tensor],
    optimizer_state: dict[str, Any] | None,
    images: Tensor,
    labels: Tensor,
    settings: MechanismSettings,
    *,
    lr: float,
    label_smoothing: float,
    mask_seed: int,
    epoch: int,
) -> list[dict[str, Any]]:
    """The mechanism's rows for one checkpoint (see the module doc).

    ``model``: a ViT on its reference path (fused_attn=False) with the checkpoint's weights;
    ``params`` its parameters in the optimizer's order; ``images`` (batches, batch_size, C, H, W)
    and ``labels`` (batches, batch_size): the probe set, in equal batches. Pass m of a regulariser
    draws, for every batch b, the masks of the stream at ``(mask_seed, MASK_ADDRESS, epoch,
    regulariser, ratio, m, b)``. Rows: block, regulariser ("clean": the clean attention itself;
    "none"; or a probed one), drop_ratio, metric, step, pass (-1 where there are none), batch (-1:
    the whole probe set), value.
    """
    modules = _attention_modules(model)
    probes = _Probes(modules)
    saved = [(m.regulariser, m.drop_ratio) for m in modules]
    n_batches = images.shape[0]
    rows: list[dict[str, Any]] = []

    def row(**fields: Any) -> None:
        rows.append(dict(drop_ratio=0.0, step="", batch=-1) | {"pass": -1} | fields)

    try:
        model.eval()
        # J of the whole probe set (its peak is the mean of the batches' peaks: equal batches)
        jacobian, clean = 0.0, []
        for b in range(n_batches):
            part, weights = _clean_jacobian(model, probes, params, images[b])
            jacobian = jacobian + part / n_batches
            clean.append(weights)
        for layer in range(len(modules)):
            for metric in ATTENTION_METRICS:
                measure = peak_weight if metric == "peak" else attention_entropy
                value = sum(float(measure(clean[b][layer]).mean()) for b in range(n_batches)) / n_batches
                row(block=layer, regulariser="clean", metric=metric, value=value)
            # the compensation question: how far DropKey's E[w] (exact, theory) is from the learned p at each ratio
            maps = torch.cat([clean[b][layer] for b in range(n_batches)]).double()
            maps = maps / maps.sum(dim=-1, keepdim=True)  # float32 softmax rows, renormalised in float64
            for ratio in settings.drop_ratios:
                expected = theory.expected_attention(maps, ratio)
                row(block=layer, regulariser="clean", drop_ratio=ratio, metric="expected_peak",
                    value=float(peak_weight(expected).mean()))
                row(block=layer, regulariser="clean", drop_ratio=ratio, metric="expected_entropy",
                    value=float(attention_entropy(expected).mean()))

        def gradient_of(b: int) -> tuple[Tensor, list[Tensor]]:
            return _loss_gradient(model, probes, params, images[b], labels[b], label_smoothing)

        none_parts = [gradient_of(b) for b in range(n_batches)]
        g_none = sum(g for g, _ in none_parts) / n_batches
        steps = {"sgd": torch.ones_like(g_none), "adam": adam_preconditioner(optimizer_state, params, g_none)}

        def change_rows(name: str, ratio: float, gradient: Tensor, pass_index: int) -> None:
            for step in STEPS:
                change = -lr * (jacobian @ (steps[step] * gradient))  # (2 * depth,)
                for index, value in enumerate(change.tolist()):
                    layer, metric = divmod(index, len(ATTENTION_METRICS))
                    row(block=layer, regulariser=name, drop_ratio=ratio, metric=ATTENTION_METRICS[metric], step=step,
                        value=value, **{"pass": pass_index})

        def logit_rows(name: str, ratio: float, b: int, logit_grads: list[Tensor]) -> None:
            for layer, grad in enumerate(logit_grads):
                row(block=layer, regulariser=name, drop_ratio=ratio, metric="log_top_rest_gradient", batch=b,
                    value=_log_top_rest(grad, clean[b][layer]))

        change_rows("none", 0.0, g_none, -1)
        for b, (_, logit_grads) in enumerate(none_parts):
            logit_rows("none", 0.0, b, logit_grads)
        del none_parts
        for r_index, name in enumerate(settings.regularisers):
            for ratio_index, ratio in enumerate(settings.drop_ratios):
                totals = [0.0] * settings.masks  # pass m's gradient of the whole probe set
                for b in range(n_batches):
                    logit_sum = None
                    for m in range(settings.masks):
                        address = (epoch, r_index, ratio_index, m, b)
                        seeds = integer_seeds(address_sequence(mask_seed, MASK_ADDRESS, *address), len(modules))
                        with contextlib.ExitStack() as stack:
                            for module, seed in zip(modules, seeds, strict=True):
                                stack.enter_context(module.generator_override(seed))  # its own stream comes back
                                module.regulariser = regularisers.create(name)
                                module.set_drop_ratio(ratio)
                                module.train()
                            gradient, logit_grads = gradient_of(b)
                            for module in modules:
                                module.eval()
                        totals[m] = totals[m] + gradient / n_batches
                        logit_sum = logit_grads if logit_sum is None else [
                            a + g for a, g in zip(logit_sum, logit_grads, strict=True)]
                    logit_rows(name, ratio, b, [g / settings.masks for g in logit_sum])
                for m, gradient in enumerate(totals):
                    change_rows(name, ratio, gradient, m)
    finally:
        probes.close()
        for module, (regulariser, ratio) in zip(modules, saved, strict=True):
            module.regulariser, module.drop_ratio = regulariser, ratio
            module.eval()
    if any(not np.isfinite(r["value"]) for r in rows if r["metric"] in ATTENTION_METRICS):
        raise FloatingPointError(f"the mechanism probe at epoch {epoch} gave a non-finite change: a diverged model?")
    return rows
