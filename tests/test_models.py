"""ViT / DeepViT models: every named configuration builds, runs and trains; configs validate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dropkey.models import MODEL_CONFIGS, VisionTransformer, ViTConfig, create_model
from dropkey.modules import DropKeyAttention
from dropkey.reattention import ConvBatchNormReAttention, LayerNormReAttention
from dropkey.schedules import linear_decreasing


def _images(config: ViTConfig, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_chans, config.image_size, config.image_size, generator=g)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_named_config_runs_and_trains(name):
    torch.manual_seed(0)
    model = create_model(name, drop_ratio=0.2, mask_seed=0)
    config = model.config
    x = _images(config)
    model.train()
    logits = model(x)
    assert logits.shape == (4, config.num_classes)
    torch.nn.functional.cross_entropy(logits, torch.arange(4) % config.num_classes).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, config.num_classes)
        tokens = model.forward_features(x)
    assert tokens.shape == (4, config.num_prefix_tokens + config.num_patches, config.dim)


def test_tiny_and_small_configs_exist_for_32x32_rgb_and_28x28_grey():
    # the "tiny and small for 32x32 and 28x28 input"
    for size, chans in ((32, 3), (28, 1)):
        tiny, small = MODEL_CONFIGS[f"vit_tiny_{size}"], MODEL_CONFIGS[f"vit_small_{size}"]
        for config in (tiny, small):
            assert (config.image_size, config.in_chans, config.num_classes) == (size, chans, 10)
        assert (small.dim, small.depth) == (128, 6) and (tiny.dim, tiny.depth) == (64, 4)
    small_28 = create_model("vit_small_28")
    assert small_28(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    tiny_28 = create_model("vit_tiny_28")
    assert sum(p.numel() for p in small_28.parameters()) > 2 * sum(p.numel() for p in tiny_28.parameters())


def test_tiny_configs_are_tiny():
    for name in ("vit_tiny_32", "vit_tiny_28", "vit_tiny_8", "deepvit_tiny_32"):
        params = sum(p.numel() for p in create_model(name).parameters())
        assert params < 200_000, (name, params)


def test_deepvit_configs_put_reattention_in_their_blocks():
    model = create_model("deepvit_deep_32")
    flags = [attn.reattention is not None for attn in model.attention_modules]
    assert flags == [i in range(6, 12) for i in range(12)]
    assert isinstance(model.attention_modules[-1].reattention, ConvBatchNormReAttention)
    ln = create_model("vit_tiny_8", reattention="layernorm", reattention_blocks=range(1, 3))
    assert [type(a.reattention) for a in ln.attention_modules] == [
        type(None), LayerNormReAttention, LayerNormReAttention
    ]
    assert ln.config.reattention_blocks == (1, 2)  # ranges and lists become tuples


def test_per_layer_schedule_and_variants_reach_the_modules():
    ratios = linear_decreasing(3, 0.3, 0.1)
    model = create_model("vit_tiny_8", drop_ratio=ratios, attn_variant=["dropkey", "dropkey_block", "dropout"])
    assert [a.drop_ratio for a in model.attention_modules] == list(ratios)
    assert [a.variant for a in model.attention_modules] == ["dropkey", "dropkey_block", "dropout"]
    assert model.attention_modules[1].regulariser.grid == (4, 4)
    model.set_drop_ratios(0.0)
    assert all(not a.regularising for a in model.train().attention_modules)


def test_mean_pooling_has_no_class_token_and_structured_masks_still_fit():
    model = create_model("vit_tiny_8", pooling="mean", attn_variant="dropkey_cross", drop_ratio=0.3)
    assert model.cls_token is None and model.config.num_prefix_tokens == 0
    assert model.attention_modules[0].regulariser.num_prefix_tokens == 0
    assert model.train()(_images(model.config)).shape == (4, 10)


def test_eval_is_deterministic_and_mask_seed_reproduces_training():
    def build() -> VisionTransformer:
        torch.manual_seed(0)
        return create_model("vit_tiny_8", drop_ratio=0.3, mask_seed=1, fused_attn=False)

    x = _images(MODEL_CONFIGS["vit_tiny_8"])
    a, b = build().train(), build().train()
    assert torch.equal(a(x), b(x))
    a.eval()
    assert torch.equal(a(x), a(x))


def test_parameter_names_follow_timm():
    names = set(create_model("vit_tiny_8").state_dict())
    for expected in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                     "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert expected in names
    assert all(isinstance(block.attn, DropKeyAttention) for block in create_model("vit_tiny_8").blocks)


def test_config_is_frozen_and_hashable():
    config = MODEL_CONFIGS["vit_tiny_8"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 5  # type: ignore[misc]
    assert hash(dataclasses.replace(config, drop_ratio=[0.1, 0.2, 0.3])) is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=9), "divisible by patch_size"),
        (dict(dim=30), "dim must be divisible by num_heads"),
        (dict(depth=0), r"depth must be an integer in \[1, 2147483647\]"),
        (dict(pooling="max"), "pooling must be one of"),
        (dict(attn_variant="dropblock"), "attn_variant must be one of"),
        (dict(attn_variant=("dropkey",) * 2), "one name per block"),
        (dict(drop_ratio=1.0), r"must be a real number in \[0, 1\)"),
        (dict(drop_ratio=(0.1, 0.2)), "length must equal depth"),
        (dict(attn_variant="none", drop_ratio=0.1), "must be 0 for attn_variant 'none'"),
        (dict(reattention="talking_heads"), "reattention must be one of"),
        (dict(reattention_blocks=(3,)), r"reattention_blocks must be block indices in \[0, 3\)"),
        (dict(drop_path=1.0), r"drop_path must be a real number in \[0, 1\)"),
        (dict(mlp_ratio=0), "mlp_ratio must be"),
        (dict(mask_seed="1"), "mask_seed must be an integer"),
    ],
)
def test_invalid_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MODEL_CONFIGS["vit_tiny_8"], **overrides)


def test_create_model_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="name must be one of"):
        create_model("vit_huge_14")
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        create_model("vit_tiny_8", dropkey_ratio=0.1)
    with pytest.raises(ValueError, match="of 8x8 images"):
        create_model("vit_tiny_8")(torch.randn(1, 1, 16, 16))


def test_torch_compile_eval_full_graph_matches_eager():
    # aot_eager traces the whole model through dynamo + AOTAutograd in ~3 s (no C++ build)
    torch.manual_seed(0)
    model = create_model("vit_tiny_8", drop_ratio=0.2).eval()
    x = _images(model.config)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
# torch-internal warnings (inductor's imports; dynamo probing .grad at a graph break)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_torch_compile_inductor_trains_with_dropkey():
    # inductor compiles C++ kernels: ~45 s on 2 cores. Training graphs have breaks in the
    # mask sampling (data-dependent sizes), so fullgraph is not requested here.
    torch.manual_seed(0)
    model = create_model("vit_tiny_8", drop_ratio=0.2, mask_seed=0).train()
    compiled = torch.compile(model)
    logits = compiled(_images(model.config))
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
