"""Re-attention (DeepViT, Zhou et al., arXiv 2103.11886): mix the heads' attention maps.

Given the H post-softmax maps A (B x H x N x N) of one block, Re-attention forms

    A'[b, g, i, j] = Norm( sum_h Theta[g, h] A[b, h, i, j] )

with a learnable H x H matrix Theta, and A' (not A) multiplies V. Two forms:

``"conv_bn"`` -- the official DeepViT code (zhoudaquan/dvit_repo, ``ReAttention``):
    ``nn.Conv2d(H, H, 1)`` over the head axis (so Theta = conv.weight[:, :, 0, 0]
    plus a bias per output head), then ``nn.BatchNorm2d(H)``: each output head
    is normalised over (batch, query, key) with batch statistics in training and
    running statistics in eval. Submodule names ``reatten_matrix`` and
    ``var_norm`` follow the official code so its weights load. Initialisation:
    the official model's ``_init_weights`` touches only Linear and LayerNorm, so
    the 1x1 conv keeps PyTorch's default (Kaiming-uniform weight, uniform bias)
    and BatchNorm its default (weight 1, bias 0). ``init="default"`` reproduces
    that; ``init="identity"`` starts from Theta = I, bias 0 (each head keeps its
    own map, up to the BatchNorm). ``scale`` multiplies the result (the official
    ``reatten_scale``: 1, or the attention scale with ``transform_scale=True``).

``"layernorm"`` -- lucidrains' vit-pytorch ``deepvit.py``: the einsum
    ``'b h i j, h g -> b g i j'`` with a learnable H x H parameter
    ``reattn_weights`` (so Theta = reattn_weights.T, no bias), then LayerNorm
    over the head axis (``b h i j -> b i j h``, ``LayerNorm(H)``, back).
    ``init="default"`` is that code's ``torch.randn(H, H)``; ``init="identity"`` is I.

Neither form keeps rows summing to 1: the normalised maps are signed. With
DropKey, the keep mask acts before the softmax and this mixing after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from theory.checks import check_choice, check_int

REATTENTION_FORMS = ("conv_bn", "layernorm")
REATTENTION_INITS = ("default", "identity")


def _check_heads(num_heads: object) -> int:
    return check_int(num_heads, "num_heads", 1)


def _check_init(init: object) -> str:
    return check_choice(init, "init", REATTENTION_INITS)


@dataclass(frozen=True)
class ReattentionSettings:
    """The settings of one block's Re-attention: its ``form`` and the ``init`` of its mixing matrix."""

    form: str = "conv_bn"
    init: str = "default"

    def __post_init__(self) -> None:
        check_choice(self.form, "reattention", REATTENTION_FORMS)
        check_choice(self.init, "reattention_init", REATTENTION_INITS)

    @classmethod
    def of(cls, reattention: str | ReattentionSettings | None) -> ReattentionSettings | None:
        """None, a form's name (default init) or the settings themselves, as settings (ValueError otherwise)."""
        if reattention is None or isinstance(reattention, ReattentionSettings):
            return reattention
        return cls(form=check_choice(reattention, "reattention", REATTENTION_FORMS))

    def build(self, num_heads: int) -> ConvBatchNormReAttention | LayerNormReAttention:
        return build_reattention(self.form, num_heads, init=self.init)


class ConvBatchNormReAttention(nn.Module):
    """The official DeepViT Re-attention: 1x1 conv over heads (with bias), then BatchNorm2d."""

    form = "conv_bn"

    def __init__(self, num_heads: int, *, init: str = "default", scale: float = 1.0) -> None:
        super().__init__()
        self.num_heads = _check_heads(num_heads)
        self.init = _check_init(init)
        self.scale = float(scale)
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, kernel_size=1, stride=1)
        self.var_norm = nn.BatchNorm2d(num_heads)
        if init == "identity":
            with torch.no_grad():
                self.reatten_matrix.weight.copy_(torch.eye(num_heads)[:, :, None, None])
                self.reatten_matrix.bias.zero_()

    @property
    def mixing_matrix(self) -> Tensor:
        """Theta (H x H) with mixed[g] = sum_h Theta[g, h] A[h] (+ bias[g])."""
        return self.reatten_matrix.weight[:, :, 0, 0]

    def forward(self, attn: Tensor) -> Tensor:
        # attn: (B, H, N, N) -> (B, H, N, N)
        return self.var_norm(self.reatten_matrix(attn)) * self.scale


class LayerNormReAttention(nn.Module):
    """lucidrains' Re-attention: einsum with an H x H matrix, then LayerNorm over heads."""

    form = "layernorm"

    def __init__(self, num_heads: int, *, init: str = "default", scale: float = 1.0) -> None:
        super().__init__()
        self.num_heads = _check_heads(num_heads)
        self.init = _check_init(init)
        self.scale = float(scale)
        start = torch.eye(num_heads) if init == "identity" else torch.randn(num_heads, num_heads)
        self.reattn_weights = nn.Parameter(start)  # indexed [h_in, g_out]
        self.reattn_norm = nn.LayerNorm(num_heads)

    @property
    def mixing_matrix(self) -> Tensor:
        """Theta (H x H) with mixed[g] = sum_h Theta[g, h] A[h]."""
        return self.reattn_weights.t()

    def forward(self, attn: Tensor) -> Tensor:
        # attn: (B, H, N, N); mix heads, then LayerNorm over the head axis
        mixed = torch.einsum("bhij,hg->bgij", attn, self.reattn_weights)
        normed = self.reattn_norm(mixed.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return normed * self.scale


def build_reattention(
    form: str, num_heads: int, *, init: str = "default", scale: float = 1.0
) -> ConvBatchNormReAttention | LayerNormReAttention:
    """Re-attention of the given ``form`` (one of :data:`REATTENTION_FORMS`)."""
    if form == "conv_bn":
        return ConvBatchNormReAttention(num_heads, init=init, scale=scale)
    if form == "layernorm":
        return LayerNormReAttention(num_heads, init=init, scale=scale)
    raise ValueError(f"reattention must be one of {REATTENTION_FORMS} or None, got {form!r}")
