"""Tests of dropkey.masks: shapes, exact drop rates, independence, calibration of Block/Cross, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stat_assertions import assert_within_standard_errors, sample_mean_and_standard_error

import dropkey.masks as masks
from dropkey import functional as fn
from dropkey.masks import (
    bernoulli_drop_mask,
    block_keep_mask,
    block_seed_rate,
    calibrated_seed_rate,
    coverage_counts,
    cross_keep_mask,
    cross_seed_rate,
    dropattention_keep_mask,
    dropkey_keep_mask,
)


def _assert_rate(fraction: float, expected: float, n: int) -> None:
    """A proportion over n independent flags within 5 binomial SE of ``expected``."""
    se = np.sqrt(expected * (1 - expected) / n)
    assert_within_standard_errors(fraction, expected, se, atol=1e-12, what="drop rate")


@pytest.mark.parametrize("r", [0.0, 0.001, 0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 0.999])
def test_dropkey_mask_rate_and_independence(r):
    """Empirical drop fraction within 5 SE of r (geometric and dense samplers); pairs drop w.p. r^2."""
    shape = (16, 4, 64, 65)
    keep = dropkey_keep_mask(shape, r, generator=1)
    assert keep.shape == shape and keep.dtype == torch.bool
    n = keep.numel()
    dropped = ~keep.view(-1)
    _assert_rate(float(dropped.float().mean()), r, n)
    # independence of neighbours (consecutive in memory, across row boundaries too)
    both = (dropped[:-1] & dropped[1:]).float().mean()
    _assert_rate(float(both), r * r, n - 1)
    # no drift: the last tenth has the same rate
    tail = dropped[-n // 10 :]
    _assert_rate(float(tail.float().mean()), r, tail.numel())


def test_geometric_sampler_across_chunks(monkeypatch):
    """With a tiny chunk the geometric sampler restarts many times; the rate stays r everywhere."""
    monkeypatch.setattr(masks, "_CHUNK", 50)
    monkeypatch.setattr(masks, "_MIN_CHUNK", 50)
    for r in (0.02, 0.1, 0.95):
        dropped = bernoulli_drop_mask((200_000,), r, generator=3)
        for part in dropped.chunk(4):
            _assert_rate(float(part.float().mean()), r, part.numel())


@pytest.mark.parametrize("r", [0.0, 0.01, 0.3, 0.97])
def test_stream_gives_the_same_flags_however_it_is_sliced(r):
    n = 50_000
    whole = bernoulli_drop_mask((n,), r, generator=13)
    stream = masks.BernoulliStream(n, r, torch.Generator().manual_seed(13))
    sizes = [1, 7, 8000, 0, 12345, n - 20353]
    parts = [stream.fill(torch.empty(size, dtype=torch.bool)) for size in sizes]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="asked for"):
        stream.fill(torch.empty(1, dtype=torch.bool))


def test_bit_packing_round_trips():
    values = torch.arange(256, dtype=torch.uint8)
    flags = masks.unpack_bits(values, torch.empty(2048, dtype=torch.bool))
    assert flags[8:16].tolist() == [True] + [False] * 7  # bit i of byte j = flags[8 j + i]
    assert torch.equal(masks.pack_bits(flags), values)
    random = torch.rand(8 * 1001, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(masks.unpack_bits(masks.pack_bits(random), torch.empty_like(random)), random)
    assert torch.equal(masks.pack_bits(random[8:]), masks.pack_bits(random)[1:])
    # unaligned: generic path
    assert torch.equal(masks.pack_bits(random[4:804]), masks.pack_bits(random[4:804].clone()))
    with pytest.raises(ValueError, match="multiple of 8"):
        masks.pack_bits(random[:7])


def test_masks_are_reproducible():
    shape = (2, 3, 10, 11)
    for r in (0.05, 0.4, 0.9):
        a = dropkey_keep_mask(shape, r, generator=5)
        assert torch.equal(a, dropkey_keep_mask(shape, r, generator=5))
        assert torch.equal(a, dropkey_keep_mask(shape, r, generator=torch.Generator().manual_seed(5)))
        assert not torch.equal(a, dropkey_keep_mask(shape, r, generator=6))
    grid = dict(grid=(3, 3), num_prefix_tokens=2)
    assert torch.equal(
        block_keep_mask((2, 4, 11), 0.3, generator=1, **grid), block_keep_mask((2, 4, 11), 0.3, generator=1, **grid)
    )
    assert torch.equal(
        cross_keep_mask((2, 4, 11), 0.3, generator=1, **grid), cross_keep_mask((2, 4, 11), 0.3, generator=1, **grid)
    )


def test_dropattention_mask_is_shared_across_queries():
    """Shape (..., 1, Nk); attention over kept keys = post-softmax column drop + renormalisation."""
    keep = dropattention_keep_mask((2, 3, 7, 5), 0.4, generator=2)
    assert keep.shape == (2, 3, 1, 5) and keep.dtype == torch.bool
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64),
    )
    v = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    w = fn.attention_from_keep_mask(q, k, v, keep, all_dropped="zero", backend="fused")
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) * keep
    renormalised = torch.where(keep.any(-1, keepdim=True), p / p.sum(-1, keepdim=True).clamp_min(1e-300), 0.0)
    torch.testing.assert_close(w, renormalised)
    dropped_columns = (w == 0).all(dim=-2)  # the same keys are absent for every query
    assert torch.equal(dropped_columns | ~keep.any(-1), ~keep[..., 0, :] | ~keep.any(-1))
    big = dropattention_keep_mask((64, 8, 3, 50), 0.3, generator=4)
    _assert_rate(float((~big).float().mean()), 0.3, big.numel())


# --------------------------------------------------------------------------- Block / Cross


def test_coverage_counts_at_the_border():
    block = coverage_counts((14, 14), "block", 3)
    assert block[0, 0] == 4 and block[0, 5] == 6 and block[5, 5] == 9
    cross = coverage_counts((14, 14), "cross", 1)
    assert cross[0, 0] == 3 and cross[0, 5] == 4 and cross[5, 5] == 5
    assert coverage_counts((1, 1), "block", 3)[0, 0] == 1


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (3, 5), (1, 1)])
@pytest.mark.parametrize("r", [0.05, 0.1, 0.5, 0.9])
def test_seed_rate_solves_the_calibration_equation(grid, r):
    for kind, size, rate in (("block", 3, block_seed_rate(r, grid)), ("cross", 1, cross_seed_rate(r, grid))):
        counts = coverage_counts(grid, kind, size)
        assert 0 < rate <= r
        assert abs(np.mean(1 - (1 - rate) ** counts) - r) < 1e-12
        assert rate == calibrated_seed_rate(r, grid, kind=kind, side=size, arm=size)
    assert block_seed_rate(0.0, grid) == 0.0


@pytest.mark.parametrize("kind", ["block", "cross"])
@pytest.mark.parametrize("grid,prefix,r", [((14, 14), 1, 0.1), ((4, 4), 1, 0.3), ((8, 8), 0, 0.2), ((3, 5), 2, 0.6)])
def test_structured_masks_shape_and_calibrated_rate(kind, grid, prefix, r):
    """Dropped fraction of patch keys within 5 SE of r (rows are independent: SE from row fractions); prefix at
    rate r."""
    nk = prefix + grid[0] * grid[1]
    shape = (64, 4, 16, nk)
    make = block_keep_mask if kind == "block" else cross_keep_mask
    keep = make(shape, r, grid=grid, num_prefix_tokens=prefix, generator=7)
    assert keep.shape == shape and keep.dtype == torch.bool
    rows = (~keep[..., prefix:]).float().reshape(-1, grid[0] * grid[1]).mean(dim=-1).double().numpy()
    mean, se = sample_mean_and_standard_error(rows)
    assert_within_standard_errors(mean, r, se, what="patch drop rate")
    if prefix:
        _assert_rate(float((~keep[..., :prefix]).float().mean()), r, keep[..., :prefix].numel())


def test_structured_masks_drop_the_documented_footprints():
    seeds = torch.zeros(1, 5, 6, dtype=torch.bool)
    seeds[0, 0, 0] = True  # corner: clipped window
    seeds[0, 3, 3] = True
    block = masks._dilate(seeds, "block", 3)[0].int()
    expected = torch.zeros(5, 6, dtype=torch.int32)
    expected[0:2, 0:2] = 1
    expected[2:5, 2:5] = 1
    assert torch.equal(block, expected)
    cross = masks._dilate(seeds, "cross", 1)[0].int()
    expected = torch.zeros(5, 6, dtype=torch.int32)
    expected[0, 0] = expected[0, 1] = expected[1, 0] = 1
    expected[3, 2:5] = 1
    expected[2:5, 3] = 1
    assert torch.equal(cross, expected)
    # whole masks: every dropped patch region is a union of such footprints (holes never appear alone in a block mask)
    keep = block_keep_mask((200, 50), 0.05, grid=(7, 7), num_prefix_tokens=1, generator=0)
    dropped_counts = (~keep[:, 1:]).sum(dim=-1)
    assert set(dropped_counts.unique().tolist()) - {0} and dropped_counts[dropped_counts > 0].min() >= 4


def test_structured_mask_validation():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        block_keep_mask((2, 10), 0.1, grid=(3, 3), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="grid"):
        block_keep_mask((2, 10), 0.1, grid=(3,))
    with pytest.raises(ValueError, match="side"):
        block_keep_mask((2, 10), 0.1, grid=(3, 3), side=0)
    with pytest.raises(ValueError, match="arm"):
        cross_keep_mask((2, 10), 0.1, grid=(3, 3), arm=-1)
    with pytest.raises(ValueError, match=r"drop_ratio.*\[0, 1\)"):
        cross_keep_mask((2, 10), 1.0, grid=(3, 3))
    with pytest.raises(ValueError, match="kind"):
        calibrated_seed_rate(0.1, (3, 3), kind="diamond")


@pytest.mark.parametrize("bad", [-0.5, 1.0, float("nan"), "x", None])
def test_mask_validation(bad):
    with pytest.raises(ValueError, match="drop_ratio"):
        dropkey_keep_mask((2, 2), bad)
    with pytest.raises(ValueError, match="drop_ratio"):
        dropattention_keep_mask((2, 2), bad)
    with pytest.raises(ValueError, match="drop_ratio"):
        block_seed_rate(bad, (3, 3))


def test_shape_and_generator_validation():
    with pytest.raises(ValueError, match="shape"):
        dropkey_keep_mask((4,), 0.1)
    with pytest.raises(ValueError, match="shape"):
        dropkey_keep_mask((2, -1), 0.1)
    with pytest.raises(ValueError, match="shape"):
        dropkey_keep_mask("ab", 0.1)
    with pytest.raises(ValueError, match="generator"):
        dropkey_keep_mask((2, 2), 0.1, generator=1.5)
    with pytest.raises(ValueError, match="generator"):
        dropkey_keep_mask((2, 2), 0.1, generator=torch.Generator(), device="meta")
    assert dropkey_keep_mask((0, 3), 0.5).shape == (0, 3)
    assert dropkey_keep_mask(torch.Size([2, 3]), 0.5, generator=0).shape == (2, 3)


@pytest.mark.gpu
def test_cuda_masks():
    keep = dropkey_keep_mask((8, 4, 64, 64), 0.1, generator=0, device="cuda")
    assert keep.is_cuda
    _assert_rate(float((~keep).float().mean()), 0.1, keep.numel())
    block = block_keep_mask((8, 4, 50), 0.1, grid=(7, 7), generator=0, device="cuda")
    assert block.is_cuda and block.shape == (8, 4, 50)


@pytest.mark.parametrize("r", [0.03, 0.1, 0.9])
def test_geometric_gaps_follow_the_geometric_law(r):
    """Gaps between successive rare entries (dropped for r <= 0.5, kept otherwise) are i.i.d.
    Geometric(p), p = min(r, 1 - r): a chi-square goodness-of-fit test over gap lengths (tail pooled
    so every expected count is >= 20), fixed seed, rejected only at p-value < 1e-6."""
    from scipy import stats

    p = min(r, 1.0 - r)
    dropped = bernoulli_drop_mask((2_000_000,), r, generator=21)
    rare = dropped if r <= 0.5 else ~dropped
    gaps = torch.diff(rare.nonzero().squeeze(1)).numpy()
    top = 1
    while len(gaps) * p * (1 - p) ** top >= 20:  # expected count of gap == top + 1
        top += 1
    observed = np.bincount(np.minimum(gaps, top + 1), minlength=top + 2)[1:]
    expected = len(gaps) * np.append(p * (1 - p) ** np.arange(top), (1 - p) ** top)
    assert stats.chisquare(observed, expected).pvalue > 1e-6


def test_geometric_stream_takes_one_draw_from_the_torch_generator():
    """The geometric sampler's numpy PCG64 is seeded by one torch.randint of 4 words: the torch
    generator advances by exactly that, so successive masks differ and a seed reproduces them."""
    g = torch.Generator().manual_seed(8)
    masks.BernoulliStream(10_000, 0.1, g)
    h = torch.Generator().manual_seed(8)
    torch.randint(0, 1 << 62, (4,), dtype=torch.int64, generator=h)
    assert torch.equal(g.get_state(), h.get_state())
    first, second = bernoulli_drop_mask((10_000,), 0.1, generator=g), bernoulli_drop_mask((10_000,), 0.1, generator=g)
    assert not torch.equal(first, second)
