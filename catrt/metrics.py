"""Image quality metrics and their statistics: what `catrt compare` and bench/ report.

PSNR and SSIM (scikit-image) compare an image with the unpruned image of the same seed on the 8-bit
pixels a user gets; CLIP score (transformers' CLIP) rates an image against its prompt; intervals are
Student t intervals of a mean (scipy). Pure functions over numpy arrays, except `ClipScorer`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, echo

BENCH_EXTRA = 'install the bench extra: pip install -e ".[bench]"'
#: The smallest image side SSIM scores (its window is odd and at least 3 pixels).
SSIM_MIN_SIDE = 3


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (H, W, C); inf when they are identical."""
    from skimage.metrics import mean_squared_error

    mse = mean_squared_error(reference.astype(np.float64), image.astype(np.float64))
    return math.inf if mse == 0 else float(10 * math.log10(255.0**2 / mse))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM of two uint8 images (H, W, C) over the channels (7x7 windows, shrunk for tiny images)."""
    from skimage.metrics import structural_similarity

    side = min(image.shape[:2])
    window = min(7, side if side % 2 else side - 1)
    if window < SSIM_MIN_SIDE:
        raise ConfigError(f"SSIM needs images of at least 3x3 pixels, got {image.shape[1]}x{image.shape[0]}", field="size")
    return float(structural_similarity(reference, image, channel_axis=-1, data_range=255, win_size=window))


def check_ssim_side(flag: str, pixels: int | None) -> None:
    """Refuse an image side SSIM cannot score before any image is made (None: the model's default size)."""
    if pixels is not None and pixels < SSIM_MIN_SIDE:
        raise ConfigError(f"{flag} {pixels}: SSIM needs images of at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels; give "
                          f"{flag} {SSIM_MIN_SIDE} or more", field=flag.lstrip("-"), value=pixels)


def require_skimage() -> None:
    """scikit-image is in the bench extra: say so in one line when it is missing."""
    try:
        import skimage.metrics  # noqa: F401
    except ImportError:
        raise CatrtError(f"image metrics need scikit-image; {BENCH_EXTRA}", field="scikit-image") from None


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval (Student t over n values); half_width is nan for n < 2."""

    mean: float
    half_width: float
    n: int

    def format(self, digits: int = 2) -> str:
        if math.isinf(self.mean) or math.isnan(self.mean):
            return f"{self.mean}"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values: list[float] | np.ndarray) -> Interval:
    """Mean and 95% t interval; a mean over values containing inf is that inf, with no interval."""
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, 0)
    mean = float(data.mean()) if np.isfinite(data).all() else float(np.nanmean(data))
    if data.size < 2 or not np.isfinite(data).all():
        return Interval(mean, math.nan, int(data.size))
    spread = float(data.std(ddof=1)) / math.sqrt(data.size)
    return Interval(mean, float(stats.t.ppf(0.975, data.size - 1)) * spread, int(data.size))


def psnr_split(values: list[float] | np.ndarray) -> tuple[int, Interval]:
    """(how many images equal their reference, the mean over the others): one identical image made a mean PSNR inf,
    read as 'identical' for a rule that differs on most images. The mean is inf only where every image is identical."""
    identical = sum(math.isinf(value) for value in values)
    if identical == len(values):
        return identical, mean_interval(values)
    return identical, mean_interval([value for value in values if not math.isinf(value)])


def psnr_cell(values: list[float] | np.ndarray, interval: bool = True) -> str:
    """A PSNR mean for a table (2 decimals, with its interval or the mean alone): where only some images are
    identical, `inf (k of n identical; the other m: ...)`, so the cell neither hides them nor reads as identical."""
    identical, others = psnr_split(values)
    mean = others.format(2) if interval or not math.isfinite(others.mean) else f"{others.mean:.2f}"
    if identical in (0, len(values)):
        return mean
    return f"inf ({identical} of {len(values)} identical; the other {others.n}: {mean})"


def paired_difference(a: list[float], b: list[float]) -> Interval | None:
    """Mean of a - b over paired samples with its 95% interval; None where either side has an inf."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    return mean_interval(x - y)


class ClipScorer:
    """CLIP score of an image and its prompt: 100 * max(cosine of the image and text embeddings, 0).

    Loads a CLIPModel and its processor with transformers from a local folder (or, online, a hub name).
    """

    def __init__(self, name_or_path: str | os.PathLike, device: Any = "cpu") -> None:
        import torch
        from transformers import AutoConfig, CLIPModel, CLIPProcessor

        try:
            kind = AutoConfig.from_pretrained(name_or_path).model_type
            if kind != "clip":  # refused here: transformers would warn, then load a mismatched model or fail obscurely
                raise ValueError(f"its config is a {kind!r} model, not 'clip'")
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--clip {echo(os.fspath(name_or_path), PATH_ECHO_LIMIT)} could not be loaded as a CLIP model and processor "
                f"({' '.join(str(error).split())[:200]}); give a folder saved with CLIPModel/CLIPProcessor.save_pretrained "
                "or, with hub access, a hub name such as openai/clip-vit-base-patch32",
                field="clip", value=os.fspath(name_or_path),
            ) from None
        self.device = device
        self._torch = torch

    def score(self, image: Any, prompt: str) -> float:
        """The score of one PIL image against its prompt (the text truncated to CLIP's length)."""
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt", padding=True, truncation=True)
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        with self._torch.no_grad():
            out = self.model(**inputs)
        image_embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return float(100 * (image_embeds * text_embeds).sum(-1).clamp_min(0)[0])
