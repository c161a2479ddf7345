"""Procedural captioned images: a tiny text-to-image world whose ground truth is known.

Every image shows one shape of one colour and size in one of nine named places on a
plain background, so a generated image can be checked against its caption exactly
(see `catrt.reference.probe`). Everything is deterministic from a seed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from catrt.checks import require


IMAGE_SIZE = 32
SUPERSAMPLE = 4  # sub-pixels per pixel side: cheap anti-aliasing

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": COLOURS["blue"],
}
SIZES: dict[str, float] = {"small": 3.5, "large": 6.5}  # shape "radius" in pixels
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
_CELL_CENTRES = (6.0, 16.0, 26.0)  # pixel coordinate of each grid row/column centre
_JITTER = 1.0  # max pixels a shape moves off its cell centre


@dataclass(frozen=True)
class Attributes:
    """The five facts a caption states about an image."""

    shape: str
    colour: str
    size: str
    position: str
    background: str


@dataclass(frozen=True)
class Sample(Attributes):
    """One rendered image (uint8, H x W x 3) with its attributes and caption."""

    caption: str = ""
    image: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]


def grid_cell(position: str) -> tuple[int, int]:
    """(row, column) of a named position on the 3 x 3 grid."""
    index = POSITIONS.index(position)
    return index // 3, index % 3


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Uniform attributes; the background is never the shape's colour."""
    colour = str(rng.choice(list(COLOURS)))
    backgrounds = [name for name in BACKGROUNDS if name != colour]
    return Attributes(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(backgrounds)),
    )


def make_caption(attrs: Attributes) -> str:
    """E.g. "a small red circle in the top left on a blue background"."""
    place = "the center" if attrs.position == "center" else f"the {attrs.position}"
    return f"a {attrs.size} {attrs.colour} {attrs.shape} in {place} on a {attrs.background} background"


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean coverage of a shape centred at the origin (dx, dy offsets, y down)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if shape == "diamond":
        return ax + ay <= 1.2 * r
    if shape == "cross":
        arm = 0.35 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "triangle":  # apex up, base 0.75 r below the centre
        depth = dy + r
        return (depth >= 0) & (dy <= 0.75 * r) & (ax <= depth / 1.75)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    attrs: Attributes, size: int = IMAGE_SIZE, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Anti-aliased H x W x 3 uint8 image; `offset` (dx, dy) in pixels nudges the shape."""
    scale = size / IMAGE_SIZE
    row, col = grid_cell(attrs.position)
    cx = (_CELL_CENTRES[col] + offset[0]) * scale
    cy = (_CELL_CENTRES[row] + offset[1]) * scale
    coords = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    fine = _shape_mask(attrs.shape, dx, dy, SIZES[attrs.size] * scale).astype(np.float32)
    cover = fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = np.array(COLOURS[attrs.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[attrs.background], dtype=np.float32)
    return np.rint(cover * fg + (1.0 - cover) * bg).astype(np.uint8)


def random_sample(rng: np.random.Generator) -> Sample:
    """One random sample; the shape is jittered off its cell centre so no two look identical."""
    attrs = sample_attributes(rng)
    offset = tuple(float(v) for v in rng.uniform(-_JITTER, _JITTER, size=2))
    return Sample(**vars(attrs), caption=make_caption(attrs), image=render(attrs, offset=offset))


def generate(n: int, seed: int) -> list[Sample]:
    """`n` samples, identical for identical seeds. A count or seed that is no whole number >= 0 is a ConfigError
    naming it (numpy would return no samples for n = -1, or fail on a float deep in its seeding)."""
    for name, value in (("n", n), ("seed", seed)):
        require("generate", name, value, isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
                and value >= 0, "an integer >= 0")
    rng = np.random.default_rng(seed)
    return [random_sample(rng) for _ in range(n)]


def to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the model's pixel space."""
    array = np.stack(list(images)) if isinstance(images, list) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    scaled = (pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
