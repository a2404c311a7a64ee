"""Re-attention (DeepViT): both forms against hand-written einsums of their definitions."""

from __future__ import annotations

import pytest
import torch

from dropkey.reattention import (
    REATTENTION_FORMS,
    ConvBatchNormReAttention,
    LayerNormReAttention,
    build_reattention,
)

HEADS = 4


def _maps(seed: int = 0, batch: int = 3, tokens: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEADS, tokens, tokens, generator=g, dtype=torch.float64).softmax(-1)


def test_conv_bn_matches_einsum_then_batchnorm_in_training():
    torch.manual_seed(0)
    module = ConvBatchNormReAttention(HEADS).double().train()
    with torch.no_grad():
        module.var_norm.weight.uniform_(0.5, 1.5)
        module.var_norm.bias.uniform_(-0.5, 0.5)
    attn = _maps()
    theta = module.reatten_matrix.weight[:, :, 0, 0]  # (out g, in h)
    mixed = torch.einsum("bhij,gh->bgij", attn, theta) + module.reatten_matrix.bias[None, :, None, None]
    mean = mixed.mean(dim=(0, 2, 3), keepdim=True)
    var = mixed.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    bn = module.var_norm
    expected = (mixed - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(module(attn), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.mixing_matrix, theta)


def test_conv_bn_uses_running_statistics_in_eval():
    torch.manual_seed(1)
    module = ConvBatchNormReAttention(HEADS).double()
    module.train()
    module(_maps(1))  # updates running stats
    module.eval()
    attn = _maps(2)
    bn = module.var_norm
    mixed = module.reatten_matrix(attn)
    expected = (mixed - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps
    )
    torch.testing.assert_close(module(attn), expected, rtol=1e-10, atol=1e-10)


def test_layernorm_form_matches_lucidrains_definition():
    torch.manual_seed(2)
    module = LayerNormReAttention(HEADS).double()
    with torch.no_grad():
        module.reattn_norm.weight.uniform_(0.5, 1.5)
        module.reattn_norm.bias.uniform_(-0.5, 0.5)
    attn = _maps(3)
    w = module.reattn_weights  # indexed [h_in, g_out], as in vit-pytorch's deepvit
    mixed = torch.einsum("bhij,hg->bgij", attn, w)
    mean = mixed.mean(dim=1, keepdim=True)
    var = mixed.var(dim=1, unbiased=False, keepdim=True)
    ln = module.reattn_norm
    expected = (mixed - mean) / torch.sqrt(var + ln.eps) * ln.weight[None, :, None, None] + ln.bias[None, :, None, None]
    torch.testing.assert_close(module(attn), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.mixing_matrix, w.t())


@pytest.mark.parametrize("form", REATTENTION_FORMS)
def test_identity_init_is_identity_mixing(form):
    module = build_reattention(form, HEADS, init="identity")
    torch.testing.assert_close(module.mixing_matrix, torch.eye(HEADS))
    if form == "conv_bn":
        assert torch.count_nonzero(module.reatten_matrix.bias) == 0


def test_default_init_follows_the_reference_codes():
    torch.manual_seed(3)
    conv = build_reattention("conv_bn", HEADS)
    # PyTorch's Conv2d default (kaiming_uniform(a=sqrt(5))): |w| <= 1/sqrt(fan_in)
    assert conv.reatten_matrix.weight.abs().max() <= HEADS**-0.5
    assert torch.equal(conv.var_norm.weight, torch.ones(HEADS))
    ln = build_reattention("layernorm", HEADS)
    assert ln.reattn_weights.shape == (HEADS, HEADS)
    assert not torch.equal(ln.reattn_weights, torch.eye(HEADS))  # randn, as in vit-pytorch


def test_state_dict_names_follow_the_reference_codes():
    assert set(build_reattention("conv_bn", HEADS).state_dict()) >= {
        "reatten_matrix.weight", "reatten_matrix.bias", "var_norm.weight", "var_norm.bias",
        "var_norm.running_mean", "var_norm.running_var",
    }
    assert set(build_reattention("layernorm", HEADS).state_dict()) == {
        "reattn_weights", "reattn_norm.weight", "reattn_norm.bias",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(form="talking_heads", num_heads=4), "reattention must be one of"),
        (dict(form="conv_bn", num_heads=0), r"num_heads must be an integer in \[1, inf\)"),
        (dict(form="layernorm", num_heads=4, init="zeros"), "init must be one of"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_reattention(**kwargs)


def test_gradients_reach_the_mixing_matrix():
    for form in REATTENTION_FORMS:
        module = build_reattention(form, HEADS)
        attn = _maps(4).float().requires_grad_()
        module(attn).pow(2).sum().backward()
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert torch.isfinite(attn.grad).all()
