"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

One family is sampled per step (color, crop, cutout, flip, scale, rotate) and its
parameters are drawn once and applied to *both* the real and the synthetic batch
(the siamese part), every transform differentiable with respect to the images.
Defaults follow the DSA reference settings: brightness 1.0, saturation 2.0, contrast
0.5, crop 0.125, cutout 0.5, flip 0.5, scale 1.2, rotate 15 degrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class AugParams:
    """One sampled augmentation: its family and scalar parameters (shared by both batches)."""

    family: str
    values: dict = field(default_factory=dict)


class DSA:
    """Siamese augmentation: ``real, syn = dsa(real, syn, generator)`` applies one sampled draw to both.

    Args:
        strategy: families separated by ``_`` (default all six).
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", brightness: float = 1.0,
                 saturation: float = 2.0, contrast: float = 0.5, crop: float = 0.125, cutout: float = 0.5,
                 flip: float = 0.5, scale: float = 1.2, rotate: float = 15.0):
        self.families = tuple(f for f in strategy.split("_") if f)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"strategy must name families among {FAMILIES}, got {strategy!r}")
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self.crop, self.cutout, self.flip, self.scale, self.rotate = crop, cutout, flip, scale, rotate

    def _values(self, family: str, u: torch.Tensor) -> dict:
        """``family``'s parameters from uniforms ``u [4, n]``: one per image, or n = 1 for a shared draw."""
        if family == "color":
            return {"brightness": (u[0] - 0.5) * self.brightness, "saturation": u[1] * self.saturation,
                    "contrast": u[2] + self.contrast}
        if family == "crop":
            return {"dx": (u[0] * 2 - 1) * self.crop, "dy": (u[1] * 2 - 1) * self.crop}
        if family == "cutout":
            return {"cx": u[0], "cy": u[1], "size": torch.full_like(u[0], self.cutout)}
        if family == "flip":
            return {"flip": u[0] < self.flip}
        if family == "scale":
            lo = 1.0 / self.scale
            return {"sx": lo + u[0] * (self.scale - lo), "sy": lo + u[1] * (self.scale - lo)}
        return {"angle": (u[0] * 2 - 1) * math.radians(self.rotate)}

    def _family(self, gen: torch.Generator) -> str:
        return self.families[int(torch.randint(len(self.families), (1,), generator=gen))]

    def sample(self, gen: torch.Generator) -> AugParams:
        """Draw a family and its parameters (CPU generator: the same draw on any device)."""
        family = self._family(gen)
        u = torch.rand(4, 1, generator=gen).double()
        values = self._values(family, u)
        return AugParams(family, {k: bool(v) if v.dtype == torch.bool else float(v) for k, v in values.items()})

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply one draw to images ``[B, C, H, W]``; differentiable in ``x``."""
        values = {k: torch.tensor([v], dtype=torch.bool if isinstance(v, bool) else torch.float64)
                  for k, v in params.values.items()}
        return _transform(x, params.family, values)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training-time augmentation of one batch, as the DSA reference trains evaluation models:
        one family for the batch, its parameters drawn per image (``gen`` a CPU generator)."""
        family = self._family(gen)
        values = self._values(family, torch.rand(4, x.shape[0], generator=gen, dtype=torch.float64))
        return _transform(x, family, values)

    def __call__(self, real: torch.Tensor, syn: torch.Tensor, gen: torch.Generator):
        params = self.sample(gen)
        return self.apply(real, params), self.apply(syn, params)


def _column(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-image (or shared, length-1) parameter as ``[B or 1, 1, 1, 1]`` in ``x``'s dtype and device."""
    return v.to(dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)


def _transform(x: torch.Tensor, family: str, v: dict) -> torch.Tensor:
    """Apply ``family`` with parameters ``v`` (tensors of length B, one per image, or 1, shared)."""
    if family == "color":
        x = x + _column(v["brightness"], x)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * _column(v["saturation"], x) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * _column(v["contrast"], x) + mean
    if family == "flip":
        return torch.where(v["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    if family == "cutout":
        H, W = x.shape[-2:]
        size = float(v["size"][0])
        h, w = max(1, int(H * size + 0.5)), max(1, int(W * size + 0.5))
        top = (v["cy"] * (H - h + 1)).long().to(x.device).view(-1, 1, 1)
        left = (v["cx"] * (W - w + 1)).long().to(x.device).view(-1, 1, 1)
        rows = torch.arange(H, device=x.device).view(1, H, 1)
        cols = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        return x * (~inside).unsqueeze(1).to(x.dtype)
    if family == "crop":
        one, zero = torch.ones_like(v["dx"]), torch.zeros_like(v["dx"])
        theta = [[one, zero, -2 * v["dx"]], [zero, one, -2 * v["dy"]]]
    elif family == "scale":
        zero = torch.zeros_like(v["sx"])
        theta = [[1 / v["sx"], zero, zero], [zero, 1 / v["sy"], zero]]
    else:
        c, s, zero = torch.cos(v["angle"]), torch.sin(v["angle"]), torch.zeros_like(v["angle"])
        theta = [[c, -s, zero], [s, c, zero]]
    return _affine(x, torch.stack([torch.stack(row, -1) for row in theta], -2))


def _affine(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """``x`` resampled through the affine maps ``theta [B or 1, 2, 3]`` (normalized coordinates)."""
    t = theta.to(dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode=padding, align_corners=False)


class DCAugment:
    """The DC reference's augmentation of evaluation models' training batches (its MNIST setting).

    Each image gets one op drawn from ``strategy`` (families among crop, scale, rotate, noise):
    ``crop`` shifts it by up to ``crop`` pixels, ``scale`` stretches each axis by a factor in
    ``[1 - scale, 1 + scale]``, ``rotate`` turns it by up to ``rotate`` degrees (borders filled
    with the batch's channel means, as the reference pads), ``noise`` adds Gaussian noise of std
    ``noise``. All ops run as one batched resampling (the reference loops over images).
    """

    OPS = ("crop", "scale", "rotate", "noise")

    def __init__(self, strategy: str = "crop_scale_rotate", crop: int = 4, scale: float = 0.2,
                 rotate: float = 45.0, noise: float = 0.001):
        self.ops = tuple(f for f in strategy.split("_") if f)
        if not self.ops or any(f not in self.OPS for f in self.ops):
            raise ValueError(f"strategy must name ops among {self.OPS}, got {strategy!r}")
        self.crop, self.scale, self.rotate, self.noise = crop, scale, rotate, noise

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One batch ``[B, C, H, W]`` augmented, one op per image (``gen`` a CPU generator)."""
        B, _, H, W = x.shape
        op = torch.tensor([self.OPS.index(f) for f in self.ops])[torch.randint(len(self.ops), (B,), generator=gen)]
        u = torch.rand(3, B, generator=gen, dtype=torch.float64)
        theta = torch.zeros(B, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        crop = op == 0  # a whole-pixel shift in [-crop, crop]: 2 k / W in normalized coordinates
        shift = torch.floor(u[:2] * (2 * self.crop + 1)) - self.crop
        theta[crop, 0, 2], theta[crop, 1, 2] = 2 * shift[0, crop] / W, 2 * shift[1, crop] / H
        scale = op == 1
        factor = 1 - self.scale + 2 * self.scale * u[:2]
        theta[scale, 0, 0], theta[scale, 1, 1] = 1 / factor[0, scale], 1 / factor[1, scale]
        rot = op == 2
        angle = (u[2] * 2 - 1) * math.radians(self.rotate)
        theta[rot, 0, 0], theta[rot, 0, 1] = torch.cos(angle[rot]), -torch.sin(angle[rot])
        theta[rot, 1, 0], theta[rot, 1, 1] = torch.sin(angle[rot]), torch.cos(angle[rot])
        fill = x.mean(dim=(0, 2, 3), keepdim=True)
        out = _affine(x - fill, theta) + fill
        noisy = (op == 3).to(x.device)
        if bool(noisy.any()):
            noise = torch.randn(x.shape, generator=gen).to(dtype=x.dtype, device=x.device) * self.noise
            out = out + noise * noisy.view(-1, 1, 1, 1).to(x.dtype)
        return out
