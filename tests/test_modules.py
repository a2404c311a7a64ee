"""DropKeyAttention: timm compatibility, exact plain attention, path agreement, theory.

Statistical tests compare the empirical mean of M independent draws with the exact
expectation and pass when every entry lies within 5 standard errors (SE = sample
standard deviation / sqrt(M)) plus 1e-6 for float rounding. With fixed seeds they
are deterministic; for a correct implementation a 5-SE miss has probability
~6e-7 per entry.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import theory
from dropkey import functional, masks
from dropkey.modules import GRID_VARIANTS, VARIANTS, DropKeyAttention

DIM, HEADS = 32, 4
GRID = (4, 4)
TOKENS = 1 + GRID[0] * GRID[1]  # class token + 4x4 patches
REGULARISED = [v for v in VARIANTS if v != "none"]
SE_TOLERANCE = 5.0


class TimmAttention(nn.Module):
    """timm's ``vision_transformer.Attention`` forward (default options), written out for reference."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, fused_attn: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def _module(variant: str = "dropkey", drop_ratio: float = 0.3, **kwargs) -> DropKeyAttention:
    if variant in GRID_VARIANTS:
        kwargs.setdefault("grid", GRID)
    if variant == "none":
        drop_ratio = 0.0
    torch.manual_seed(0)
    return DropKeyAttention(DIM, HEADS, qkv_bias=True, drop_ratio=drop_ratio, variant=variant, **kwargs)


def _tokens(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


# --- timm compatibility and plain attention ------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_state_dict_keys_are_timms(qkv_bias):
    module = DropKeyAttention(DIM, HEADS, qkv_bias=qkv_bias, reattention=None)
    expected = {"qkv.weight", "proj.weight", "proj.bias"} | ({"qkv.bias"} if qkv_bias else set())
    assert set(module.state_dict()) == expected
    assert (module.num_heads, module.head_dim, module.scale) == (HEADS, DIM // HEADS, (DIM // HEADS) ** -0.5)
    assert isinstance(module.proj_drop, nn.Dropout)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_mode_is_timm_attention_bit_for_bit(variant, fused):
    timm_attn = TimmAttention(DIM, HEADS, qkv_bias=True, fused_attn=fused)
    module = _module(variant, fused_attn=fused).eval()
    module.load_state_dict(timm_attn.state_dict())  # timm weights load as is
    x = _tokens()
    assert torch.equal(module(x), timm_attn(x))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_drop_ratio_in_training_is_plain_attention_exactly(variant, fused):
    timm_attn = TimmAttention(DIM, HEADS, qkv_bias=True, fused_attn=fused)
    module = _module(variant, drop_ratio=0.0, fused_attn=fused).train()
    module.load_state_dict(timm_attn.state_dict())
    x = _tokens()
    assert torch.equal(module(x), timm_attn(x))


def test_return_weights_in_eval_are_the_softmax():
    module = _module("dropkey").eval()
    x = _tokens()
    out, weights = module(x, return_weights=True)
    q, k, _ = module.qkv(x).reshape(3, TOKENS, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    assert torch.equal(weights, ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1))
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-6)  # vs the fused path


# --- fast path vs reference path --------------------------------------------------------


@pytest.mark.parametrize("all_dropped", functional.ALL_DROPPED_CONVENTIONS)
@pytest.mark.parametrize("variant", REGULARISED)
def test_fast_and_reference_paths_agree_with_the_same_mask(variant, all_dropped):
    module = _module(variant, drop_ratio=0.5, all_dropped=all_dropped).train()
    x = _tokens(batch=4).requires_grad_()
    module.set_generator(123)
    fast = module(x)
    module.set_generator(123)
    reference, weights = module(x, return_weights=True)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    # and the gradients
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    (g_ref,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    assert (weights == 0).any()  # the regulariser really acted


@pytest.mark.parametrize("backend", functional.BACKENDS)
@pytest.mark.parametrize("variant", ["dropkey", "dropkey_block"])
def test_every_backend_agrees_with_the_reference_path(variant, backend):
    module = _module(variant, drop_ratio=0.5, backend=backend).train()
    x = _tokens(batch=4)
    module.set_generator(321)
    fast = module(x)
    module.set_generator(321)
    reference, _ = module(x, return_weights=True)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_same_seed_same_output_and_new_draw_each_call():
    module = _module("dropkey", drop_ratio=0.5, generator=7).train()
    x = _tokens()
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # a seed gives a stream, not a fixed mask
    module.set_generator(7)
    assert torch.equal(module(x), first)


def test_record_weights_and_probe_hooks_do_not_change_outputs():
    x = _tokens()
    plain = _module("dropkey", fused_attn=False).eval()
    expected = plain(x)
    recording = copy.deepcopy(plain)
    recording.record_weights = True
    seen = []
    recording.weights_probe.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    out = recording(x)
    assert torch.equal(out, expected)
    assert torch.equal(recording.last_weights, seen[0])
    assert recording.last_weights.shape == (3, HEADS, TOKENS, TOKENS)


# --- expected attention vs theory (5 standard errors) -----------------------------------

SAMPLES, KEYS, HEAD_DIM = 20_000, 4, 8


def _qk(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One (q, k) pair of shape (1, 2, KEYS, HEAD_DIM) and its softmax rows p (2 * KEYS, KEYS)."""
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(1, 2, KEYS, HEAD_DIM, generator=g, dtype=torch.float64)
    k = 1.5 * torch.randn(1, 2, KEYS, HEAD_DIM, generator=g, dtype=torch.float64)
    p = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(-1)
    return q, k, p.reshape(-1, KEYS).numpy()


def _sampled_weights(variant: str, drop_ratio: float, all_dropped: str, *, fused: bool) -> torch.Tensor:
    """(SAMPLES, 2, KEYS, KEYS) weight rows, read off the output with V = identity."""
    module = DropKeyAttention(
        2 * HEAD_DIM, 2, drop_ratio=drop_ratio, variant=variant, all_dropped=all_dropped,
        fused_attn=fused, generator=11,
    ).train()
    q, k, _ = _qk()
    q, k = q.expand(SAMPLES, -1, -1, -1), k.expand(SAMPLES, -1, -1, -1)
    v = torch.eye(KEYS, dtype=torch.float64).expand(SAMPLES, 2, KEYS, KEYS)
    out, _ = module.attend(q, k, v)
    return out


def _assert_within_standard_errors(samples: torch.Tensor, expected: np.ndarray) -> None:
    flat = samples.reshape(samples.shape[0], -1, KEYS).numpy()  # (M, rows, keys)
    mean = flat.mean(axis=0)
    se = flat.std(axis=0, ddof=1) / np.sqrt(flat.shape[0])
    deviation = np.abs(mean - expected)
    worst = np.unravel_index(np.argmax(deviation - SE_TOLERANCE * se), deviation.shape)
    assert np.all(deviation <= SE_TOLERANCE * se + 1e-6), (
        f"entry {worst}: |mean - theory| = {deviation[worst]:.3g} > 5 SE = {SE_TOLERANCE * se[worst]:.3g}"
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("all_dropped", functional.ALL_DROPPED_CONVENTIONS)
@pytest.mark.parametrize("variant", ["dropkey", "dropattention"])
def test_expected_attention_matches_theory(variant, all_dropped, fused):
    """E[w] = theory.expected_attention(p, r, all_dropped) within 5 SE.

    DropAttention shares one mask across the queries of a (batch, head), but each
    single row still sees independent Bernoulli key drops, so its marginal
    expectation is DropKey's. r = 0.5 with 4 keys makes all-dropped rows common
    (1/16), so the conventions differ by several SE and are really tested.
    """
    r = 0.5
    _, _, p = _qk()
    samples = _sampled_weights(variant, r, all_dropped, fused=fused)
    _assert_within_standard_errors(samples, theory.expected_attention(p, r, all_dropped=all_dropped))


def test_expected_attention_distinguishes_the_conventions():
    # power check: the zero convention's samples are > 5 SE away from the uniform theory
    _, _, p = _qk()
    samples = _sampled_weights("dropkey", 0.5, "zero", fused=True)
    with pytest.raises(AssertionError):
        _assert_within_standard_errors(samples, theory.expected_attention(p, 0.5, all_dropped="uniform"))


@pytest.mark.parametrize("fused", [True, False])
def test_post_softmax_dropout_is_unbiased(fused):
    """Attention dropout: E[w] = p (no first-moment smoothing) within 5 SE."""
    r = 0.3
    _, _, p = _qk()
    samples = _sampled_weights("dropout", r, "uniform", fused=fused)
    _assert_within_standard_errors(samples, theory.dropout_expected_attention(p, r))
    # and its variance is r / (1 - r) p^2 (checked loosely: within 5% relative)
    var = samples.reshape(SAMPLES, -1, KEYS).var(dim=0).numpy()
    np.testing.assert_allclose(var, theory.dropout_attention_variance(p, r), rtol=0.05)


def test_dropattention_mask_is_shared_by_all_queries():
    module = _module("dropattention", drop_ratio=0.5, all_dropped="zero", fused_attn=False).train()
    _, weights = module(_tokens(batch=8), return_weights=True)
    kept = weights > 0  # (B, H, N, N)
    assert torch.equal(kept, kept[:, :, :1, :].expand_as(kept))
    assert not torch.equal(kept[0, 0], kept[1, 0])  # but differs between batch elements


# --- structured variants: calibrated drop rate --------------------------------------------


@pytest.mark.parametrize("variant", ["dropkey", "dropkey_block", "dropkey_cross"])
def test_dropped_fraction_of_patch_keys_is_calibrated(variant):
    """Mean fraction of dropped patch keys = drop ratio within 5 SE (SE over masks)."""
    r = 0.25
    module = _module(variant, drop_ratio=r, generator=5, all_dropped="zero", fused_attn=False).train()
    _, weights = module(_tokens(batch=64), return_weights=True)  # (64, H, N, N)
    dropped = (weights[..., 1:] == 0).double().mean(dim=-1).reshape(-1)  # per row, patch keys
    se = dropped.std() / dropped.numel() ** 0.5
    assert abs(dropped.mean().item() - r) <= SE_TOLERANCE * se.item()


@pytest.mark.parametrize("variant", ["dropkey_block", "dropkey_cross"])
def test_structured_drops_are_spatially_clustered(variant):
    # a dropped patch's right-hand neighbour is dropped more often than r (DropKey: exactly r)
    r = 0.25
    module = _module(variant, drop_ratio=r, generator=9).train()
    keep = module.keep_mask((64, HEADS, TOKENS, TOKENS))
    dropped = ~keep[..., 1:].reshape(64, HEADS, TOKENS, *GRID)
    left, right = dropped[..., :-1], dropped[..., 1:]
    conditional = (left & right).sum() / left.sum()
    assert conditional.item() > r + 0.2


# --- Re-attention composed with DropKey ------------------------------------------------


@pytest.mark.parametrize("form", ["conv_bn", "layernorm"])
def test_reattention_mixes_after_the_masked_softmax(form):
    module = _module("dropkey", drop_ratio=0.4, reattention=form, all_dropped="zero").train()
    x = _tokens()
    module.set_generator(3)
    out, maps = module(x, return_weights=True)
    # by hand: the same mask, masked softmax, then the mixing, then @ v
    q, k, v = module.qkv(x).reshape(3, TOKENS, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    logits = (q * module.scale) @ k.transpose(-2, -1)
    keep = masks.dropkey_keep_mask(logits.shape, 0.4, generator=3)
    weights = functional.masked_softmax(logits, keep, all_dropped="zero")
    expected_maps = module.reattention(weights)
    torch.testing.assert_close(maps, expected_maps)
    expected = module.proj((expected_maps @ v).transpose(1, 2).reshape(3, TOKENS, DIM))
    torch.testing.assert_close(out, expected)
    assert module.uses_reference_path


def test_training_gradients_are_finite_for_every_variant_and_convention():
    for variant in REGULARISED:
        for convention in functional.ALL_DROPPED_CONVENTIONS:
            module = _module(variant, drop_ratio=0.9, all_dropped=convention).train()
            x = _tokens().requires_grad_()
            out = module(x)
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
            assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_set_drop_ratio_turns_the_regulariser_off():
    module = _module("dropkey", drop_ratio=0.5).train()
    assert module.regularising
    module.set_drop_ratio(0.0)
    assert not module.regularising


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dim=30, num_heads=4), "dim must be divisible by num_heads"),
        (dict(dim=0), "dim must be an integer >= 1"),
        (dict(num_heads=0), "num_heads must be an integer >= 1"),
        (dict(variant="dropblock"), "variant must be one of"),
        (dict(drop_ratio=1.0), r"drop_ratio must be in \[0, 1\)"),
        (dict(drop_ratio=-0.1), r"drop_ratio must be in \[0, 1\)"),
        (dict(drop_ratio=float("nan")), r"drop_ratio must be in \[0, 1\)"),
        (dict(drop_ratio="0.1"), "drop_ratio must be a real number"),
        (dict(variant="none", drop_ratio=0.1), "drop_ratio must be 0 for variant='none'"),
        (dict(all_dropped="nan"), "all_dropped must be one of"),
        (dict(backend="triton"), "backend must be one of"),
        (dict(variant="dropkey_block"), "needs grid"),
        (dict(variant="dropkey_cross", grid=(4,)), "grid must be a pair"),
        (dict(variant="dropkey_block", grid=(4, 0)), r"grid\[1\] must be an integer >= 1"),
        (dict(reattention="talking_heads"), "reattention must be one of"),
        (dict(reattention_init="zeros"), "reattention_init must be one of"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an integer >= 0"),
        (dict(block_side=0), "block_side must be an integer >= 1"),
        (dict(cross_arm=0), "cross_arm must be an integer >= 1"),
        (dict(proj_drop=1.0), r"proj_drop must be in \[0, 1\)"),
        (dict(generator="seed"), "generator must be a torch.Generator"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    arguments = dict(dim=DIM, num_heads=HEADS) | kwargs
    with pytest.raises(ValueError, match=message):
        DropKeyAttention(**arguments)


def test_grid_must_match_the_token_count():
    module = _module("dropkey_block", grid=(3, 3)).train()
    with pytest.raises(ValueError, match="expects 10 tokens"):
        module(_tokens())
