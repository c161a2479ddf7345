"""A small CNN that reads the caption attributes back from a 32 x 32 image.

It stands in for a CLIP score: the fraction of generated images whose shape, colour,
size, position and background match their caption measures how much a pruned pipeline
loses against the unpruned one. It is trained on augmented renders (noise, blur, colour
jitter) so that it also reads the reference model's imperfect samples.

    python -m catrt.reference.probe              # train and save weights/probe.safetensors
    python -m catrt.reference.probe --evaluate   # only report the shipped probe's accuracy (nothing written)
"""

from __future__ import annotations

from catrt.notices import quiet_known_notices  # stdlib only

if __name__ == "__main__":  # a command-line program: transformers' torchvision notices say nothing useful here
    quiet_known_notices()  # before the imports below, which import transformers

import logging
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from catrt import atomic_files
from catrt.errors import CatrtError, ConfigError
from catrt.reference import data
from catrt.reference.checksums import PROBE_CHECKSUM_FILE, verify_files, write_checksums
from catrt.reference.pipeline import ReferencePipeline, load_reference_pipeline
from catrt.reference.train import MAX_SAMPLES
from catrt.reference.writes import written

logger = logging.getLogger(__name__)

PROBE_FILE = Path(__file__).parent / "weights" / "probe.safetensors"
CLASSES: dict[str, tuple[str, ...]] = {
    "shape": data.SHAPES,
    "colour": tuple(data.COLOURS),
    "size": tuple(data.SIZES),
    "position": data.POSITIONS,
    "background": tuple(data.BACKGROUNDS),
}
ImageBatch = np.ndarray | torch.Tensor | Image.Image | Sequence[Image.Image | np.ndarray]


class Probe(nn.Module):
    """A stem and three stride-2 stages down to 4 x 4 (kept spatial: position matters), one head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, stride=2), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(names)) for name, names in CLASSES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, 32, 32) in [-1, 1] -> logits per attribute."""
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def _as_pixels(images: ImageBatch) -> torch.Tensor:
    """Any batch of 32 x 32 RGB images -> float (B, 3, 32, 32) in [-1, 1].

    Takes PIL images, uint8 (H, W, 3) arrays (the renders) and float ones in [0, 1] (diffusers' "np" output),
    singly, stacked (B, H, W, 3) or listed, and float (B, 3, H, W) tensors in [-1, 1] (the pipeline's "latent"
    output). Anything else is refused by name: the probe's 4 x 4 head would fail obscurely, or misread it.
    """
    if isinstance(images, torch.Tensor):
        given = tuple(images.shape)  # named as passed, before a single image gets its batch axis
        if images.ndim == 3:
            images = images[None]
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"the probe takes float (B, 3, H, W) tensors in [-1, 1], got {images.dtype} of shape "
                              f"{given}", field="images")
        pixels = images.float()
    else:
        arrays = [images] if isinstance(images, (np.ndarray, Image.Image)) else list(images)
        arrays = [np.asarray(a.convert("RGB")) if isinstance(a, Image.Image) else np.asarray(a) for a in arrays]
        batch = np.concatenate([a[None] if a.ndim == 3 else a for a in arrays]) if arrays else np.zeros((0, 32, 32, 3))
        if batch.ndim != 4 or batch.shape[-1] != 3:
            given = arrays[0].shape if len(arrays) == 1 else batch.shape  # one image is named as passed
            raise ConfigError(f"the probe takes (H, W, 3) RGB images, got an array of shape {given}", field="images")
        if batch.dtype == np.uint8:
            pixels = data.to_tensor(batch)
        elif np.issubdtype(batch.dtype, np.floating):
            pixels = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
        else:
            raise ConfigError(f"the probe takes uint8 images or floats in [0, 1], got {batch.dtype}", field="images")
    if tuple(pixels.shape[-2:]) != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise ConfigError(f"the probe reads {data.IMAGE_SIZE}x{data.IMAGE_SIZE} images, got {pixels.shape[-1]}x"
                          f"{pixels.shape[-2]} (width x height); generate or resize to {data.IMAGE_SIZE}x{data.IMAGE_SIZE}",
                          field="images")
    return pixels


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur, colour jitter and noise, the kinds of error a diffusion sample has."""
    b = pixels.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=gen)

    sigma = uniform(0.3, 1.2, 1, 1)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(-1, keepdim=True)  # (B, 1, 5)
    blurred = _separable_blur(pixels, kernel)
    use_blur = (torch.rand(b, generator=gen) < 0.5)[:, None, None, None]
    pixels = torch.where(use_blur, blurred, pixels)
    pixels = pixels * uniform(0.85, 1.15, 3, 1, 1) + uniform(-0.1, 0.1, 3, 1, 1)
    pixels = pixels + uniform(0.0, 0.15, 1, 1, 1) * torch.randn(pixels.shape, generator=gen)
    return pixels.clamp(-1, 1)


def _separable_blur(pixels: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur: kernel (B, 1, K) applied along rows then columns."""
    b, c, h, w = pixels.shape
    k = kernel.shape[-1]
    flat = pixels.reshape(1, b * c, h, w)
    weights = kernel.repeat_interleave(c, dim=0)  # (B*C, 1, K)
    flat = F.conv2d(F.pad(flat, (k // 2, k // 2, 0, 0), mode="replicate"), weights[:, :, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, k // 2, k // 2), mode="replicate"), weights[:, :, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _labels(samples: Sequence[data.Attributes]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([names.index(getattr(s, name)) for s in samples]) for name, names in CLASSES.items()}


def train_probe(steps: int = 2000, batch_size: int = 64, seed: int = 0, out: Path | None = PROBE_FILE) -> Probe:
    """Train on fresh augmented renders (a few minutes on one CPU thread); save if `out` is given."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    probe = Probe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        samples = [data.random_sample(rng) for _ in range(batch_size)]
        logits = probe(augment(data.to_tensor([s.image for s in samples]), gen))
        labels = _labels(samples)
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in CLASSES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            logger.info("probe step %d loss %.4f (%.0f s)", step + 1, loss.item(), time.perf_counter() - start)
    probe.eval()
    if out is not None:  # written beside, then renamed onto it: a kill mid-save never leaves half a probe
        tensors = {k: v.contiguous() for k, v in probe.state_dict().items()}
        elsewhere = "save the probe elsewhere (--out)"
        fix = f"free some space or {elsewhere}"
        # serialised here, written by Python: safetensors' own write failed (a full disk) as a SafetensorError traceback
        with written(out, fix, elsewhere):
            atomic_files.write_bytes(out, safetensors_bytes(tensors))
        with written(out.parent / PROBE_CHECKSUM_FILE, fix, elsewhere):
            write_checksums(out.parent, [out.name], PROBE_CHECKSUM_FILE)
    return probe


@lru_cache(maxsize=1)
def load_probe(path: Path = PROBE_FILE) -> Probe:
    """The shipped probe in eval mode (cached: loading is the slow part of a quick check), checked against the
    digest recorded beside it first."""
    verify_files(path.parent, [path.name], PROBE_CHECKSUM_FILE, retrain="python -m catrt.reference.probe")
    probe = Probe()
    probe.load_state_dict(load_file(path))
    return probe.eval()


@torch.no_grad()
def classify(images: ImageBatch, probe: Probe | None = None) -> dict[str, list[str]]:
    """Predicted attribute names per image, e.g. {"shape": ["circle", ...], ...}."""
    probe = probe or load_probe()
    logits = probe(_as_pixels(images))
    return {name: [CLASSES[name][i] for i in logits[name].argmax(-1).tolist()] for name in CLASSES}


def attribute_accuracy(
    images: ImageBatch, attrs: Sequence[data.Attributes], probe: Probe | None = None
) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the intended one, per attribute."""
    predicted = classify(images, probe)
    return {
        name: float(np.mean([p == getattr(a, name) for p, a in zip(predicted[name], attrs, strict=True)]))
        for name in CLASSES
    }


def reference_accuracy(
    pipe: ReferencePipeline, n: int = 64, seed: int = 1000, probe: Probe | None = None, **call_kwargs
) -> dict[str, float]:
    """Probe accuracy of `pipe`'s samples for `n` random captions (`call_kwargs` go to the pipeline)."""
    samples = data.generate(n, seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = pipe([s.caption for s in samples], generator=generator, output_type="latent", **call_kwargs).images
    return attribute_accuracy(pixels.float().cpu(), samples, probe)


def main(argv: list[str] | None = None) -> None:
    from catrt.checks import output_folder
    from catrt.cli import OneLineParser
    from catrt.errors import echo_path

    parser = OneLineParser(prog="python -m catrt.reference.probe", description="train the attribute probe and report its accuracy")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--out", type=Path, default=PROBE_FILE, help="the probe's safetensors file (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--reference-samples", type=int, default=64, help="also score this many reference samples")
    parser.add_argument("--evaluate", action="store_true",
                        help="do not train: report the accuracy of the probe at --out (default: the shipped one)")
    args = parser.parse_args(argv)
    for flag, value, least in (("--steps", args.steps, 1), ("--threads", args.threads, 1),
                               ("--reference-samples", args.reference_samples, 0)):
        if value < least:  # a step count of 0 failed in OneCycleLR, a thread count of 0 in torch, with tracebacks
            parser.error(f"{flag} must be an integer >= {least}, got {value}")
    if args.reference_samples > MAX_SAMPLES:  # all drawn in one pipeline call after the training, as training's --samples
        parser.error(f"--reference-samples must be at most {MAX_SAMPLES} (drawn in one pipeline call after the training), "
                     f"got {args.reference_samples}")
    if args.out.is_dir():  # training's save failed on it after minutes; --evaluate took it as a file in its parent
        parser.error(f"--out {echo_path(args.out)} is a folder; give the probe's file, e.g. {echo_path(args.out / PROBE_FILE.name)}")
    if args.evaluate:
        # the probe's own file, named: a missing file was refused for a digest record in its folder, with training's
        # retraining command
        if not args.out.is_file():
            missing = "does not exist" if not args.out.exists() else "is not a file"
            parser.error(f"--out {echo_path(args.out)} {missing}; give the probe's file to evaluate (default: the shipped "
                         f"one), or train one there first (python -m catrt.reference.probe --out {echo_path(args.out)})")
        torch.set_num_threads(args.threads)
        try:
            report_accuracy(load_probe(args.out), args.reference_samples)
        except CatrtError as error:  # a missing, damaged or edited probe (or reference weights): one line naming it
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        return
    try:  # checked now: an unwritable place failed the save after minutes of training
        output_folder(args.out.parent, f"--out {echo_path(args.out)}: its folder", "the probe's file", "out")
    except ConfigError as error:
        parser.error(str(error))
    for path in (args.out, args.out.parent / PROBE_CHECKSUM_FILE):  # replaced after the training
        refusal = atomic_files.file_refusal(path, "save the probe elsewhere (--out)")
        if refusal is not None:
            parser.error(f"--out {echo_path(args.out)}: {echo_path(path)} cannot be replaced: {refusal}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        probe = train_probe(steps=args.steps, out=args.out)
    except CatrtError as error:  # a file the disk refused (the earlier one kept): one line, exit 1 (no flag was wrong)
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    report_accuracy(probe, args.reference_samples)


def report_accuracy(probe: Probe, reference_samples: int) -> None:
    """Print the probe's accuracy per attribute on 1000 held-out renders and on `reference_samples` samples of the
    shipped reference model (its defaults: 28 steps, guidance 4)."""
    held_out = data.generate(1000, seed=987654)
    print("held-out renders:", attribute_accuracy(np.stack([s.image for s in held_out]), held_out, probe))
    if reference_samples:
        pipe = load_reference_pipeline()
        pipe.set_progress_bar_config(disable=True)
        accuracy = reference_accuracy(pipe, reference_samples, probe=probe)
        print("reference samples (pipeline defaults):", accuracy)


if __name__ == "__main__":
    main()
