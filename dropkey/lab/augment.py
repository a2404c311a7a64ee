"""Batched image augmentation in pure torch, reproducible with a ``torch.Generator``.

Every transform takes a batch (N, C, H, W) and an optional generator and returns a batch
of the same shape; with equal generator states the output is identical. Random draws
happen on the generator's device (CPU by default) and are moved to the batch's device,
so CPU and CUDA runs draw the same numbers.

- :class:`RandomCrop`      pad by ``padding`` (zeros, or ``"reflect"``) then take a random
                           ``size`` x ``size`` window per image (the CIFAR recipe: pad 4, crop 32);
- :class:`RandomHorizontalFlip`  mirror each image left-right with probability ``p``;
- :class:`Normalize`       (x - mean) / std per channel (no randomness);
- :func:`to_float`         uint8 [0, 255] -> float [0, 1];
- :class:`Compose`         apply in order, threading the generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from theory.checks import check_choice, check_int, check_real


def _check_batch(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    return x


def to_float(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class RandomCrop:
    """Pad each side by ``padding`` and crop a random ``size`` x ``size`` window per image."""

    def __init__(self, size: int, padding: int = 0, *, padding_mode: str = "constant") -> None:
        self.size, self.padding = check_int(size, "size", 1), check_int(padding, "padding", 0)
        self.padding_mode = check_choice(padding_mode, "padding_mode", ("constant", "reflect"))

    def offsets(self, n: int, height: int, width: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Top-left corners (rows, cols) in the padded image, each (n,) int64 on the generator's device."""
        device = generator.device if generator is not None else torch.device("cpu")
        max_top = height + 2 * self.padding - self.size
        max_left = width + 2 * self.padding - self.size
        if max_top < 0 or max_left < 0:
            padded = f"{height + 2 * self.padding}x{width + 2 * self.padding}"
            raise ValueError(f"crop size {self.size} exceeds the padded image {padded}")
        top = torch.randint(0, max_top + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, max_left + 1, (n,), generator=generator, device=device)
        return top, left

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = _check_batch(x)
        n, _, height, width = x.shape
        top, left = self.offsets(n, height, width, generator)
        p = self.padding
        if p:
            if self.padding_mode == "reflect" or x.dtype != torch.uint8:
                padded = F.pad(x.float() if x.dtype == torch.uint8 else x, (p, p, p, p), mode=self.padding_mode)
                padded = padded.to(x.dtype)
            else:
                padded = F.pad(x, (p, p, p, p), mode="constant", value=0)
        else:
            padded = x
        top, left = top.to(x.device), left.to(x.device)
        rows = top[:, None] + torch.arange(self.size, device=x.device)  # (n, size)
        cols = left[:, None] + torch.arange(self.size, device=x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # gather windows with advanced indexing: (n, size, size, C) -> (n, C, size, size)
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, padding_mode={self.padding_mode!r})"


class RandomHorizontalFlip:
    """Mirror each image left-right (last axis) with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = check_real(p, "p", 0.0, 1.0)

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Which images flip: bool (n,) on the generator's device."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(n, generator=generator, device=device) < self.p

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = _check_batch(x)
        flip = self.draw(x.shape[0], generator).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """(x - mean) / std per channel, on float input (uint8 is first scaled to [0, 1])."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std must have one entry per channel, got {mean} and {std}")
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be > 0 per channel, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = to_float(_check_batch(x))
        if x.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the batch has {x.shape[1]}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order, each drawing from the same generator."""

    def __init__(self, transforms: Sequence[object]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for transform in self.transforms:
            x = transform(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def standard_augmentation(image_size: int, *, crop_padding: int, flip: bool) -> Compose:
    """The usual small-image training augmentation: random crop with padding, then optional flip."""
    transforms: list[object] = []
    if crop_padding > 0:
        transforms.append(RandomCrop(image_size, crop_padding))
    if flip:
        transforms.append(RandomHorizontalFlip(0.5))
    return Compose(transforms)
