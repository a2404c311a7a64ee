"""Small Vision Transformers (and DeepViT) built on :class:`DropKeyAttention`.

A pre-norm ViT in timm's layout and parameter names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.norm1/attn/norm2/mlp.fc1/mlp.fc2``,
``norm``, ``head``), sized for small images so that the tiny configurations
train on a 2-core CPU in minutes.

One config mechanism: the frozen :class:`ViTConfig`. Per block it sets the
attention regulariser (``attn_variant``: one name or one per block) and the
drop ratio (one float or a schedule from :mod:`dropkey.schedules`).

DeepViT is the same class: ``reattention_blocks`` lists the blocks whose
attention maps are mixed by Re-attention (form ``reattention``, see
:mod:`dropkey.reattention`). The official DeepViT-S/L put it in their last
blocks; our ``deepvit_*`` configurations do the same (the second half).

Named configurations live in :data:`MODEL_CONFIGS`; build one with
``create_model(name, **overrides)``.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dropkey import regularisers
from dropkey.functional import BACKENDS
from dropkey.modules import MAX_SIZE, DropKeyAttention
from dropkey.reattention import ReattentionSettings
from dropkey.reference import check_input
from dropkey.schedules import validate_schedule
from theory.checks import check_bool, check_choice, check_drop_ratio, check_int, check_real, check_seed
from theory.conventions import DEFAULT, check_all_dropped

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


def _as_tuple(value: object) -> object:
    """Lists and ranges become tuples (a frozen config must be hashable)."""
    if isinstance(value, (list, range)):
        return tuple(value)
    return value


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a model; validated on construction (ValueError)."""

    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    pooling: str = "cls"  # "cls": class token; "mean": mean of patch tokens (no class token)
    # attention regulariser, per block: one value for all blocks or one per block
    attn_variant: str | tuple[str, ...] = "dropkey"
    drop_ratio: float | tuple[float, ...] = 0.0
    all_dropped: str = DEFAULT
    block_side: int = 3  # dropkey_block window side
    cross_arm: int = 1  # dropkey_cross arm length
    # DeepViT Re-attention
    reattention: str = "conv_bn"
    reattention_blocks: tuple[int, ...] = ()
    reattention_init: str = "default"
    # other regularisers
    drop_path: float = 0.0  # stochastic depth of the last block; linear from 0 at the first
    proj_drop: float = 0.0
    mlp_drop: float = 0.0
    pos_drop: float = 0.0
    # implementation
    fused_attn: bool = True  # False: always the reference path (weights visible to hooks)
    backend: str = "auto"
    mask_seed: int | None = None  # seeds block i's mask generator with mask_seed + i
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("attn_variant", "drop_ratio", "reattention_blocks"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        sizes = ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "num_heads")
        for name in (*sizes, "block_side", "cross_arm"):
            check_int(getattr(self, name), name, 1, MAX_SIZE)
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size must be divisible by patch_size, got {self.image_size} and {self.patch_size}"
            )
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got {self.dim} and {self.num_heads}")
        check_real(self.mlp_ratio, "mlp_ratio", 0.0, None, low_open=True)
        if not 1 <= self.mlp_hidden <= MAX_SIZE:
            raise ValueError(
                f"mlp_ratio must give the MLP between 1 and {MAX_SIZE} hidden units (int(dim * mlp_ratio)), "
                f"got mlp_ratio={self.mlp_ratio!r} with dim={self.dim}"
            )
        check_real(self.norm_eps, "norm_eps", 0.0, None, low_open=True)
        check_bool(self.qkv_bias, "qkv_bias")
        check_bool(self.fused_attn, "fused_attn")
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.pooling, "pooling", POOLINGS)
        for variant in self.layer_variants:
            check_choice(variant, "attn_variant", regularisers.names())
        for i, (variant, ratio) in enumerate(zip(self.layer_variants, self.layer_drop_ratios, strict=True)):
            if not regularisers.get(variant).has_rate and ratio > 0.0:
                raise ValueError(f"drop_ratio of block {i} must be 0 for attn_variant {variant!r}, got {ratio!r}")
        check_all_dropped(self.all_dropped)
        ReattentionSettings(self.reattention, self.reattention_init)  # validates both
        blocks = self.reattention_blocks
        if not isinstance(blocks, tuple) or not all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) and 0 <= b < self.depth for b in blocks
        ):
            raise ValueError(f"reattention_blocks must be block indices in [0, {self.depth}), got {blocks!r}")
        for name in ("drop_path", "proj_drop", "mlp_drop", "pos_drop"):
            check_drop_ratio(getattr(self, name), name)
        if self.mask_seed is not None:  # block i draws from mask_seed + i
            check_seed(self.mask_seed, "mask_seed")

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden units, ``int(dim * mlp_ratio)``."""
        return int(self.dim * float(self.mlp_ratio))

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pooling == "cls" else 0

    def layer_regulariser(self, index: int) -> regularisers.Regulariser:
        """Block ``index``'s regulariser, with this config's settings (convention, grid, block side, ...)."""
        settings = {
            "all_dropped": self.all_dropped, "grid": self.grid, "num_prefix_tokens": self.num_prefix_tokens,
            "block_side": self.block_side, "cross_arm": self.cross_arm,
        }
        return regularisers.from_settings(self.layer_variants[index], settings)

    @property
    def layer_variants(self) -> tuple[str, ...]:
        """One attention variant per block."""
        variants = self.attn_variant
        if isinstance(variants, str):
            return (variants,) * self.depth
        if not isinstance(variants, tuple) or len(variants) != self.depth:
            raise ValueError(f"attn_variant must be a name or one name per block ({self.depth}), got {variants!r}")
        return variants

    @property
    def layer_drop_ratios(self) -> tuple[float, ...]:
        """One drop ratio per block, each in [0, 1)."""
        ratios = self.drop_ratio
        if isinstance(ratios, numbers.Real) and not isinstance(ratios, bool):
            return (check_drop_ratio(ratios, "drop_ratio"),) * self.depth
        if not isinstance(ratios, Sequence):
            raise ValueError(f"drop_ratio must be a number or a schedule of {self.depth} ratios, got {ratios!r}")
        return validate_schedule(ratios, self.depth, "drop_ratio")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C_in, H, W) -> (B, num_patches, dim)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        side = self.image_size
        check_input(x, "x", (None, self.proj.in_channels, side, side), f"of {side}x{side} images (B, C, H, W)")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's Mlp names)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale by 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        attn: DropKeyAttention,
        mlp_ratio: float = 4.0,
        *,
        mlp_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)  # ViTConfig.mlp_hidden
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT (and DeepViT, via ``config.reattention_blocks``): images (B, C, H, W) -> logits (B, classes)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.num_prefix_tokens = c.num_prefix_tokens
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_chans, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_prefix_tokens + c.num_patches, c.dim))
        self.pos_drop = nn.Dropout(c.pos_drop)

        drop_paths = torch.linspace(0.0, c.drop_path, c.depth).tolist()  # timm's decay rule
        ratios = c.layer_drop_ratios
        blocks = []
        for i in range(c.depth):
            reattention = ReattentionSettings(c.reattention, c.reattention_init) if i in c.reattention_blocks else None
            attn = DropKeyAttention(
                c.dim, c.num_heads, variant=c.layer_regulariser(i), drop_ratio=ratios[i], reattention=reattention,
                backend=c.backend, fused_attn=c.fused_attn, generator=None if c.mask_seed is None else c.mask_seed + i,
                qkv_bias=c.qkv_bias, proj_drop=c.proj_drop,
            )
            blocks.append(
                Block(c.dim, attn, c.mlp_ratio, mlp_drop=c.mlp_drop, drop_path=drop_paths[i], norm_eps=c.norm_eps)
            )
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm-style: truncated normal (std .02) for Linear and the embeddings; the patch
        # conv and Re-attention keep PyTorch's defaults (as the official DeepViT code does).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def attention_modules(self) -> list[DropKeyAttention]:
        """The blocks' attention modules, first block first."""
        return [block.attn for block in self.blocks]

    def set_drop_ratios(self, ratios: Sequence[float] | float) -> None:
        """Set every block's drop ratio (a number or one per block), e.g. 0 for final fine-tuning."""
        if isinstance(ratios, numbers.Real):
            ratios = (ratios,) * len(self.blocks)
        for attn, ratio in zip(self.attention_modules, validate_schedule(ratios, len(self.blocks)), strict=True):
            attn.set_drop_ratio(ratio)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + patches, dim)."""
        x = self.patch_embed(x)  # (B, P, dim)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Tokens (B, N, dim) -> logits (B, classes)."""
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- named configurations -------------------------------------------------------------

_CIFAR = dict(image_size=32, patch_size=4, in_chans=3, num_classes=10)  # 8x8 grid, 65 tokens
_FASHION = dict(image_size=28, patch_size=4, in_chans=1, num_classes=10)  # 7x7 grid, 50 tokens
_DIGITS = dict(image_size=8, patch_size=2, in_chans=1, num_classes=10)  # 4x4 grid, 17 tokens

MODEL_CONFIGS: dict[str, ViTConfig] = {
    # CIFAR-10 (32x32x3)
    "vit_tiny_32": ViTConfig(**_CIFAR, dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_small_32": ViTConfig(**_CIFAR, dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "vit_deep_32": ViTConfig(**_CIFAR, dim=64, depth=12, num_heads=4, mlp_ratio=2.0),
    "deepvit_tiny_32": ViTConfig(**_CIFAR, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, reattention_blocks=(2, 3)),
    "deepvit_deep_32": ViTConfig(
        **_CIFAR, dim=64, depth=12, num_heads=4, mlp_ratio=2.0, reattention_blocks=tuple(range(6, 12))
    ),
    # Fashion-MNIST (28x28x1)
    "vit_tiny_28": ViTConfig(**_FASHION, dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_small_28": ViTConfig(**_FASHION, dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "vit_tiny_28_p7": ViTConfig(**{**_FASHION, "patch_size": 7}, dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "deepvit_tiny_28": ViTConfig(**_FASHION, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, reattention_blocks=(2, 3)),
    # scikit-learn digits (8x8x1)
    "vit_tiny_8": ViTConfig(**_DIGITS, dim=32, depth=3, num_heads=4, mlp_ratio=2.0),
    "deepvit_tiny_8": ViTConfig(**_DIGITS, dim=32, depth=4, num_heads=4, mlp_ratio=2.0, reattention_blocks=(2, 3)),
}


def create_model(name: str, **overrides: object) -> VisionTransformer:
    """Build the named configuration, with any :class:`ViTConfig` field overridden."""
    check_choice(name, "name", sorted(MODEL_CONFIGS))
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViTConfig fields {unknown}; allowed: {sorted(fields)}")
    config = dataclasses.replace(MODEL_CONFIGS[name], **overrides)
    log.debug("create_model %s: %s", name, config)
    return VisionTransformer(config)
