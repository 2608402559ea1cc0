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

    def sample(self, gen: torch.Generator) -> AugParams:
        """Draw a family and its parameters (CPU generator: the same draw on any device)."""
        family = self.families[int(torch.randint(len(self.families), (1,), generator=gen))]
        u = torch.rand(4, generator=gen).tolist()
        if family == "color":
            values = {"brightness": (u[0] - 0.5) * self.brightness, "saturation": u[1] * self.saturation,
                      "contrast": u[2] + self.contrast}
        elif family == "crop":
            values = {"dx": (u[0] * 2 - 1) * self.crop, "dy": (u[1] * 2 - 1) * self.crop}
        elif family == "cutout":
            values = {"cx": u[0], "cy": u[1], "size": self.cutout}
        elif family == "flip":
            values = {"flip": u[0] < self.flip}
        elif family == "scale":
            lo = 1.0 / self.scale
            values = {"sx": lo + u[0] * (self.scale - lo), "sy": lo + u[1] * (self.scale - lo)}
        else:
            values = {"angle": (u[0] * 2 - 1) * math.radians(self.rotate)}
        return AugParams(family, values)

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply one draw to images ``[B, C, H, W]``; differentiable in ``x``."""
        v = params.values
        if params.family == "color":
            x = x + v["brightness"]
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * v["saturation"] + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean) * v["contrast"] + mean
        if params.family == "flip":
            return x.flip(3) if v["flip"] else x
        if params.family == "cutout":
            H, W = x.shape[-2:]
            h, w = max(1, int(H * v["size"] + 0.5)), max(1, int(W * v["size"] + 0.5))
            top = int(v["cy"] * (H - h + 1))
            left = int(v["cx"] * (W - w + 1))
            mask = torch.ones(H, W, dtype=x.dtype, device=x.device)
            mask[top:top + h, left:left + w] = 0
            return x * mask
        if params.family == "crop":
            theta = [[1.0, 0.0, -2 * v["dx"]], [0.0, 1.0, -2 * v["dy"]]]
            return _affine(x, theta, padding="zeros")
        if params.family == "scale":
            theta = [[1 / v["sx"], 0.0, 0.0], [0.0, 1 / v["sy"], 0.0]]
            return _affine(x, theta, padding="zeros")
        c, s = math.cos(v["angle"]), math.sin(v["angle"])
        return _affine(x, [[c, -s, 0.0], [s, c, 0.0]], padding="zeros")

    def __call__(self, real: torch.Tensor, syn: torch.Tensor, gen: torch.Generator):
        params = self.sample(gen)
        return self.apply(real, params), self.apply(syn, params)


def _affine(x, theta, padding):
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode=padding, align_corners=False)
