"""Batched augmentation: shapes, determinism with a generator, flip correctness, crop bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dropkey.lab import augment


def batch(n: int = 6, c: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_shapes_and_dtypes_are_kept():
    x = batch()
    for transform in (augment.RandomCrop(8, 2), augment.RandomHorizontalFlip(0.5),
                      augment.standard_augmentation(8, crop_padding=1, flip=True)):
        y = transform(x, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == torch.uint8
    assert augment.RandomCrop(5, 0)(x).shape == (6, 3, 5, 5)
    assert augment.Normalize((0.5,) * 3, (0.25,) * 3)(x).dtype == torch.float32


def test_same_seed_same_output_and_different_seed_differs():
    x = batch(32)
    t = augment.standard_augmentation(8, crop_padding=2, flip=True)
    a = t(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, t(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, t(x, torch.Generator().manual_seed(8)))


def test_flip_mirrors_exactly_the_drawn_images():
    x = batch(16)
    flip = augment.RandomHorizontalFlip(0.5)
    drawn = flip.draw(16, torch.Generator().manual_seed(3))
    y = flip(x, torch.Generator().manual_seed(3))
    assert 0 < drawn.sum() < 16
    for i in range(16):
        expected = x[i].flip(-1) if drawn[i] else x[i]
        assert torch.equal(y[i], expected)
    assert torch.equal(y[0, :, :, 0], (x[0, :, :, -1] if drawn[0] else x[0, :, :, 0]))
    assert torch.equal(augment.RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(augment.RandomHorizontalFlip(0.0)(x), x)


def test_crop_windows_lie_in_the_padded_image_and_match_it():
    x = batch(64)
    crop = augment.RandomCrop(8, 3)
    top, left = crop.offsets(64, 8, 8, torch.Generator().manual_seed(5))
    assert int(top.min()) >= 0 and int(top.max()) <= 6 and int(left.min()) >= 0 and int(left.max()) <= 6
    assert len(set(top.tolist())) > 3  # offsets actually vary
    y = crop(x, torch.Generator().manual_seed(5))
    padded = F.pad(x, (3, 3, 3, 3))
    for i in range(64):
        t, l_ = int(top[i]), int(left[i])
        assert torch.equal(y[i], padded[i, :, t : t + 8, l_ : l_ + 8])
    assert torch.equal(augment.RandomCrop(8, 0)(x), x)  # no padding, full size: identity


def test_reflect_padding_and_float_input():
    x = torch.rand(4, 1, 6, 6)
    y = augment.RandomCrop(6, 2, padding_mode="reflect")(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isin(y.flatten(), x.flatten()).all()  # reflect padding only repeats existing values


def test_normalize_per_channel():
    x = torch.full((2, 2, 3, 3), 255, dtype=torch.uint8)
    x[:, 1] = 0
    y = augment.Normalize((0.5, 0.25), (0.5, 0.25))(x)
    assert torch.allclose(y[:, 0], torch.ones(2, 3, 3)) and torch.allclose(y[:, 1], -torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        augment.Normalize((0.5,), (0.5,))(x)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: augment.RandomCrop(0), "size"),
        (lambda: augment.RandomCrop(4, -1), "padding"),
        (lambda: augment.RandomCrop(4, 1, padding_mode="wrap"), "padding_mode"),
        (lambda: augment.RandomHorizontalFlip(1.5), "p must"),
        (lambda: augment.Normalize((0.1,), (0.0,)), "std"),
        (lambda: augment.RandomCrop(20)(batch()), "exceeds"),
        (lambda: augment.RandomHorizontalFlip()(torch.zeros(3, 8, 8)), "N, C, H, W"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
