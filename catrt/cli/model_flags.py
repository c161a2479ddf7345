"""The flags several commands share about the model a run loads: which model, its size and schedule from its
card, the device and the precision; each checked before the model loads, the device without torch where it can be."""

from __future__ import annotations

import argparse
from typing import Any

from catrt.errors import ConfigError, echo
from catrt.model_cards import MODEL_CARDS, ModelCard, check_image_size, default_precision, size_limits

DEFAULT_MODEL = "reference"  # trained here, shipped in the package: recognisable images, no download

# The choices of catrt.build_config.PRECISIONS, spelled out here because that module imports torch;
# tests/test_cli.py checks they agree.
PRECISION_CHOICES: tuple[str, ...] = ("fp32", "fp16", "bf16")
# The torch device types `--device` may name.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")


def card_schedule(args: argparse.Namespace, card: ModelCard | None) -> tuple[int | None, int | None]:
    """The steps and t0 a model runs: --steps / --t0, else its card's (FLUX.1-schnell: 4 steps, t0 2; PixArt-Sigma:
    20 steps), as diffusers' pipeline defaults and the model's authors run it; None where neither sets one."""
    if card is None:
        return args.steps, args.t0
    return args.steps or card.default_steps, card.default_t0 if args.t0 is None else args.t0


def card_defaults(field: str, usual: int) -> str:
    """The published models whose card sets `field` (default_steps, default_t0) other than `usual`, as
    "20 for pixart-sigma, 4 for flux-schnell": read from the cards so the help cannot drift from them."""
    return ", ".join(
        f"{getattr(card, field)} for {name}" for name, card in MODEL_CARDS.items() if getattr(card, field) not in (None, usual)
    )


def card_size(card: ModelCard | None, height: int | None, width: int | None, model: str) -> None:
    """Refuse a size a known model cannot take, before loading it (None = the model's default)."""
    if card is not None:
        multiple, largest = size_limits(card)
        check_image_size(height or card.default_size, width or card.default_size, multiple, largest, model)


def check_device_name(name: str) -> None:
    """`--device` must name a device type catrt runs on (cpu, cuda, cuda:N, mps); checked without torch."""
    kind, separator, index = name.partition(":")
    if kind not in DEVICE_TYPES or (separator and not (index.isascii() and index.isdigit())):
        raise ConfigError(
            f"--device {echo(name)} is not a device catrt runs on; use cpu, cuda, cuda:N or mps", field="device", value=name,
        )


def torch_device(name: str) -> Any:
    """The torch device `--device` names, refused when this machine has none of that kind."""
    check_device_name(name)
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        raise ConfigError(
            f"--device {name}: this machine has no usable CUDA GPU{build}; use --device cpu", field="device", value=name,
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}", field="device", value=name,
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: this machine has no usable MPS device; use --device cpu", field="device", value=name)
    return device


def usual_precisions() -> str:
    """The published models' CUDA default dtypes, read from the model cards so the help cannot drift from them."""
    groups: dict[str, list[str]] = {}
    for name, card in MODEL_CARDS.items():
        if card.precision != "fp32":
            groups.setdefault(card.precision, []).append(name)
    return "; ".join(f"{', '.join(names)} {precision}" for precision, names in groups.items())


def run_precision(asked: str | None, model: str, device_type: str) -> str:
    """`--precision`, or the model's usual one on CUDA and fp32 elsewhere; fp16 is refused on the CPU."""
    precision = asked or default_precision(model, device_type)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "--precision fp16 needs a CUDA device (most fp16 matmuls do not run on the CPU); use fp32 or bf16 on the CPU",
            field="precision", value=precision,
        )
    return precision
