"""Diagnostics: hooks never change outputs; each metric matches its hand-written definition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from stat_assertions import assert_within_standard_errors
from torch import nn

from dropkey.diagnostics import (
    AttentionRecorder,
    column_correlation,
    column_cosine_similarity,
    cross_layer_similarity,
    top_and_rest_gradient,
)
from dropkey.models import create_model
from dropkey.modules import DropKeyAttention


def _model(name: str = "vit_tiny_8", **overrides):
    torch.manual_seed(0)
    overrides = {"drop_ratio": 0.3, "mask_seed": 4, "fused_attn": False} | overrides
    return create_model(name, **overrides)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _train_step(model, images, labels):
    torch.manual_seed(1)  # the global RNG (drop path) starts from the same state in both runs
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["vit_tiny_8", "deepvit_tiny_8"])
def test_recorder_leaves_outputs_and_gradients_bit_identical(name):
    images, labels = _batch()
    plain = _model(name, drop_path=0.1).train()
    observed = _model(name, drop_path=0.1).train()
    expected_logits, expected_grads = _train_step(plain, images, labels)
    with AttentionRecorder(observed, store_maps=True) as recorder:
        logits, grads = _train_step(observed, images, labels)
    assert torch.equal(logits, expected_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    frame = recorder.to_frame()
    assert set(frame["metric"]) == {"entropy", "peak", "grad_top", "grad_rest", "abs_grad_top", "abs_grad_rest"}
    # and the next forward (after detach) is still identical and unobserved
    rows = len(frame)
    plain.eval(), observed.eval()
    assert torch.equal(plain(images), observed(images))
    assert len(recorder.to_frame()) == rows and recorder.to_frame()["count"].equals(frame["count"])


def test_recorder_detaches_cleanly():
    model = _model()
    with AttentionRecorder(model, store_maps=True):
        pass
    for attn in model.attention_modules:
        for probe in (attn.logits_probe, attn.weights_probe, attn.maps_probe):
            assert not probe._forward_hooks


def test_fused_modules_are_refused_unless_switching_is_asked_for():
    model = _model(fused_attn=True)
    with pytest.raises(ValueError, match="fused path"):
        AttentionRecorder(model).attach()
    with AttentionRecorder(model, switch_to_reference=True) as recorder:
        assert all(not a.fused_attn for a in model.attention_modules)
        model.eval()(_batch()[0])
    assert all(a.fused_attn for a in model.attention_modules)
    assert len(recorder.to_frame()) > 0


def test_model_without_dropkey_attention_is_refused():
    with pytest.raises(ValueError, match="no DropKeyAttention"):
        AttentionRecorder(nn.Linear(2, 2))


def test_entropy_and_peak_match_their_definitions():
    torch.manual_seed(0)
    attn = DropKeyAttention(16, 2, fused_attn=False).eval()
    x = torch.randn(3, 5, 16)
    _, weights = attn(x, return_weights=True)
    with AttentionRecorder(attn) as recorder:
        attn(x)
    frame = recorder.to_frame().set_index(["metric", "head"])["value"]
    w = weights.double()
    entropy = -(w * w.log()).sum(-1).mean(dim=(0, 2))  # (H,)
    peak = w.max(-1).values.mean(dim=(0, 2))
    for head in range(2):
        assert frame[("entropy", head)] == pytest.approx(entropy[head].item(), rel=1e-6)
        assert frame[("peak", head)] == pytest.approx(peak[head].item(), rel=1e-6)


def test_gradient_metrics_match_the_retained_logit_gradient():
    torch.manual_seed(0)
    attn = DropKeyAttention(16, 2, fused_attn=False).eval()
    x = torch.randn(3, 5, 16)
    kept = {}

    def retain(module, inputs, logits):
        logits.retain_grad()
        kept["logits"] = logits

    handle = attn.logits_probe.register_forward_hook(retain)
    with AttentionRecorder(attn) as recorder:
        out, weights = attn(x, return_weights=True)
        out.square().sum().backward()
    handle.remove()
    grad, w = kept["logits"].grad.double(), weights.detach().double()
    top_index = w.argmax(-1, keepdim=True)
    top = grad.gather(-1, top_index).squeeze(-1)
    others = torch.ones_like(grad, dtype=torch.bool).scatter(-1, top_index, False)
    rest = (grad * others).sum(-1) / others.sum(-1)
    frame = recorder.to_frame().set_index(["metric", "head"])["value"]
    for head in range(2):
        assert frame[("grad_top", head)] == pytest.approx(top[:, head].mean().item(), rel=1e-6, abs=1e-12)
        assert frame[("grad_rest", head)] == pytest.approx(rest[:, head].mean().item(), rel=1e-6, abs=1e-12)
        assert frame[("abs_grad_top", head)] == pytest.approx(top[:, head].abs().mean().item(), rel=1e-6)


def test_top_and_rest_gradient_skips_rows_with_no_other_kept_key():
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]])
    grad = torch.tensor([[0.0, 9.0, 9.0], [-1.0, 0.5, 0.5]])
    top, rest, abs_top, abs_rest = top_and_rest_gradient(grad, weights)
    assert top.tolist() == [0.0, -1.0] and abs_top.tolist() == [0.0, 1.0]
    assert torch.isnan(rest[0]) and rest[1].item() == 0.5 and abs_rest[1].item() == 0.5


def test_column_similarity_is_deepvits_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 4, generator=g).softmax(-1)
    b = torch.rand(2, 3, 4, 4, generator=g).softmax(-1)
    sim = column_cosine_similarity(a, b)
    for batch, head, token in itertools.product(range(2), range(3), range(4)):
        col_a, col_b = a[batch, head, :, token].double(), b[batch, head, :, token].double()
        expected = col_a @ col_b / (col_a.norm() * col_b.norm())
        assert sim[batch, head, token].item() == pytest.approx(expected.item(), rel=1e-12)
    frame = cross_layer_similarity([a, a, b], pairs="all")
    assert list(frame.columns) == ["block_a", "block_b", "head", "value"]
    assert len(frame) == 3 * 3
    same = frame[(frame.block_a == 0) & (frame.block_b == 1)]["value"]
    assert same.to_list() == pytest.approx([1.0] * 3)
    assert len(cross_layer_similarity([a, a, b], pairs="adjacent")) == 2 * 3
    with pytest.raises(ValueError, match="pairs must be one of"):
        cross_layer_similarity([a, b], pairs="next")


def test_column_correlation_is_centred_and_scale_free():
    """Centred similarity = Pearson correlation of the columns: unmoved by a per-map shift and scale (what a
    BatchNorm over heads applies), ~0 for unrelated maps, NaN for a constant column."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 5, 5, generator=g).softmax(-1)
    b = torch.rand(2, 3, 5, 5, generator=g).softmax(-1)
    corr = column_correlation(a, b)
    for batch, head, token in itertools.product(range(2), range(3), range(5)):
        col_a, col_b = a[batch, head, :, token].double().numpy(), b[batch, head, :, token].double().numpy()
        assert corr[batch, head, token].item() == pytest.approx(float(np.corrcoef(col_a, col_b)[0, 1]), rel=1e-10)
    shifted = 3.0 * a.double() - 0.7  # per-map affine map with a positive scale (float64: no rounding)
    assert column_correlation(shifted, b).numpy() == pytest.approx(corr.numpy(), rel=1e-10)
    assert column_correlation(a, a).numpy() == pytest.approx(np.ones((2, 3, 5)))
    uniform = torch.full_like(a, 0.2)
    assert torch.isnan(column_correlation(uniform, b)).all()  # constant columns carry no correlation
    assert column_cosine_similarity(uniform, uniform + 1e-3 * b).min() > 0.99  # while the uncentred cosine is ~1
    # unrelated random maps: mean correlation near 0 (4000 columns, SE about 1/sqrt(4000 * (5 - 3)))
    big_a = torch.rand(40, 4, 25, 25, generator=g).softmax(-1)
    big_b = torch.rand(40, 4, 25, 25, generator=g).softmax(-1)
    frame = cross_layer_similarity([big_a, big_b], measure="correlation")
    # 5 SE; the column SD of r is about 0.2
    assert_within_standard_errors(frame["value"].mean(), 0.0, 0.2 / np.sqrt(40 * 25 * 4), what="mean correlation")
    with pytest.raises(ValueError, match="measure must be one of"):
        cross_layer_similarity([a, b], measure="dot")


def test_recorder_similarity_frame_over_blocks():
    model = _model("deepvit_tiny_8").eval()
    with AttentionRecorder(model, store_maps=True) as recorder:
        with torch.no_grad():
            model(_batch()[0])
            model(_batch(1)[0])
    frame = recorder.similarity_frame(pairs="adjacent")
    heads, depth = model.config.num_heads, model.config.depth
    assert len(frame) == (depth - 1) * heads
    assert frame["value"].between(-1 - 1e-9, 1 + 1e-9).all()
    assert recorder.maps[0][0].shape == (6, heads, 17, 17)
    # the softmax weights before Re-attention (blocks 2, 3 mix heads): equal to the maps below it only
    softmax = recorder.similarity_frame(pairs="adjacent", source="weights")
    assert softmax["value"].between(0.0, 1 + 1e-9).all()  # non-negative weights: cosine >= 0
    first = (frame["block_a"] == 0).to_numpy()
    assert softmax["value"].to_numpy()[first] == pytest.approx(frame["value"].to_numpy()[first], abs=1e-12)
    assert not softmax["value"].to_numpy()[~first] == pytest.approx(frame["value"].to_numpy()[~first], abs=1e-6)
    with pytest.raises(ValueError, match=r"source must be one of \('maps', 'weights'\)"):
        recorder.similarity_frame(source="logits")
    # no gradients under no_grad: only the row metrics are recorded
    assert set(recorder.to_frame()["metric"]) == {"entropy", "peak"}
    with pytest.raises(ValueError, match="store_maps=True"):
        AttentionRecorder(model).similarity_frame()


def test_timm_style_module_with_a_caller_mask_records_tidy_pandas_rows():
    # qk_norm and an attn_mask (as timm's Block passes it): hooks still change nothing,
    # and the recorder's result is a tidy pandas frame, one row per (layer, head, metric)
    import pandas as pd

    def build() -> DropKeyAttention:
        torch.manual_seed(0)
        return DropKeyAttention(16, 2, qkv_bias=True, qk_norm=True, drop_ratio=0.3, fused_attn=False, generator=2)

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    plain, observed = build().train(), build().train()
    expected = plain(x, attn_mask=mask)
    with AttentionRecorder(observed) as recorder:
        out, weights = observed(x, attn_mask=mask, return_weights=True)
    assert torch.equal(out, expected)
    frame = recorder.to_frame()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["layer", "module", "head", "metric", "value", "count"]
    assert len(frame) == len(frame.drop_duplicates(["layer", "head", "metric"])) == 2 * 2  # entropy, peak
    entropy = frame.set_index(["metric", "head"])["value"]
    by_hand = torch.special.entr(weights.double()).sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor([entropy["entropy", 0], entropy["entropy", 1]]), by_hand)
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()
