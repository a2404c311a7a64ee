"""DropKeyAttention inside a real timm VisionTransformer (skipped where timm is not installed).

timm is not a dependency (installing it pulls torchvision); tests/test_modules.py checks
the same contract against a hand-written copy of timm's current ``Attention``. These
tests run the real thing where it is present: swap every block's ``attn`` for a
DropKeyAttention, load timm's own state_dict strictly, and compare outputs bit for bit.
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", minversion="0.9")
vision_transformer = pytest.importorskip("timm.models.vision_transformer")

from dropkey.modules import DropKeyAttention  # noqa: E402

DIM, HEADS, DEPTH = 64, 4, 2


def _timm_attention_class() -> type[nn.Module]:
    layers = pytest.importorskip("timm.layers")
    return getattr(layers, "Attention", None) or vision_transformer.Attention


def _vit(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10, qkv_bias=True,
        **kwargs,
    )
    with torch.no_grad():  # move norms and biases away from their init, so that they matter
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _swap_attention(model: nn.Module, **kwargs: object) -> nn.Module:
    """A copy of ``model`` whose blocks' attention layers are DropKeyAttention loaded from timm's."""
    swapped = copy.deepcopy(model)
    for block in swapped.blocks:
        old = block.attn
        qk_norm = not isinstance(old.q_norm, nn.Identity)
        norm_layer = functools.partial(nn.LayerNorm, eps=old.q_norm.eps) if qk_norm else None
        new = DropKeyAttention(
            DIM, num_heads=HEADS, qkv_bias=old.qkv.bias is not None, qk_norm=qk_norm, norm_layer=norm_layer,
            fused_attn=bool(old.fused_attn), **kwargs,
        )
        new.load_state_dict(old.state_dict())  # strict: same keys and shapes
        block.attn = new
    swapped.load_state_dict(model.state_dict())  # the whole model's checkpoint loads as is
    return swapped


def test_constructor_and_forward_take_every_timm_argument():
    attention = _timm_attention_class()
    ours_init = inspect.signature(DropKeyAttention.__init__).parameters
    ours_forward = inspect.signature(DropKeyAttention.forward).parameters
    missing_init = [name for name in inspect.signature(attention.__init__).parameters if name not in ours_init]
    missing_forward = [name for name in inspect.signature(attention.forward).parameters if name not in ours_forward]
    assert missing_init == [] and missing_forward == []


@pytest.mark.parametrize("qk_norm", [False, True])
def test_swapped_vit_matches_timm_in_eval_and_trains(qk_norm):
    model = _vit(qk_norm=qk_norm)
    swapped = _swap_attention(model, variant="dropkey", drop_ratio=0.2, generator=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(swapped(x), model(x))
    swapped.train()
    logits = swapped(x)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in swapped.parameters() if p.grad is not None)
    assert not torch.equal(logits.detach(), model(x))  # DropKey acts in training


def test_swapped_blocks_take_timms_attention_mask():
    model = _vit()
    if "attn_mask" not in inspect.signature(type(model.blocks[0]).forward).parameters:
        pytest.skip("this timm's Block has no attn_mask")
    swapped = _swap_attention(model, variant="dropkey", drop_ratio=0.2)
    tokens = 1 + (32 // 8) ** 2
    x = torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(tokens, tokens, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        for ours, theirs in zip(swapped.blocks, model.blocks, strict=True):
            assert torch.equal(ours(x, attn_mask=mask), theirs(x, attn_mask=mask))


def test_vit_built_with_dropkey_attention_as_its_attn_layer():
    if "attn_layer" not in inspect.signature(vision_transformer.VisionTransformer.__init__).parameters:
        pytest.skip("this timm's VisionTransformer has no attn_layer")
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10,
        attn_layer=DropKeyAttention, attn_drop_rate=0.1,
    )
    assert all(isinstance(block.attn, DropKeyAttention) for block in model.blocks)
    # timm's attn_drop_rate becomes post-softmax dropout, as in timm's own Attention
    assert {(block.attn.variant, block.attn.drop_ratio) for block in model.blocks} == {("dropout", 0.1)}
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
