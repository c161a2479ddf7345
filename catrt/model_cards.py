"""Published facts about the models catrt knows by name, kept as data.

The transformer configs are copied from the public diffusers repositories so that MAC counts
can be made on the meta device without downloading anything.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from catrt.checks import path_is
from catrt.errors import PATH_ECHO_LIMIT, ConfigError, UnknownModelError, echo

Family = str  # a registered family's name (catrt.models.FAMILIES): "sd3", "pixart", "flux"
Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class ModelCard:
    """What catrt needs to know about a published model without loading it."""

    name: str
    hub_id: str | None  # None: shipped in this package, never downloaded
    family: Family
    transformer_config: dict[str, Any] = field(hash=False)
    text_tokens: int  # encoder tokens the transformer sees per prompt (SD3: 77 CLIP + 256 T5)
    vae_scale: int = 8  # pixels per latent cell
    default_steps: int = 28
    default_guidance: float = 7.0
    precision: Precision = "fp32"  # the dtype the model is published and usually run in on CUDA
    # Latent cells a side per image token: the transformer's patch size, or the pipeline's packing (FLUX: 2).
    cells_per_token: int | None = None
    # Latent cells a side of the default image where the transformer config has no sample_size (FLUX's pipeline: 128).
    sample_size: int | None = None
    # Tokens a side of the largest grid where the config's `pos_embed_max_size` is not that side (the adapter's
    # `max_grid_side`: AuraFlow's table holds pos_embed_max_size positions in all); None: read that key as the side.
    max_grid_side: int | None = None
    # The t0 `catrt generate` runs when --t0 is not given; None: CATConfig's (8), which a few-step model's
    # default_steps would not exceed (FLUX-schnell: 2 of its 4 steps).
    default_t0: int | None = None
    # Whether the hub asks a user to accept the model's license (and log in) before it downloads.
    gated: bool = True

    @property
    def default_size(self) -> int:
        """Height and width in pixels the model was trained at (sample_size latent cells)."""
        return int(self.sample_size or self.transformer_config["sample_size"]) * self.vae_scale

    @property
    def token_cells(self) -> int:
        """Latent cells a side per image token."""
        return int(self.cells_per_token or self.transformer_config["patch_size"])


_SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192,
}
_SD35_MEDIUM = {
    **_SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
_SD35_LARGE = {
    **_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}
_PIXART_SIGMA = {
    "sample_size": 128, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "attention_head_dim": 72, "num_attention_heads": 16, "cross_attention_dim": 1152,
    "caption_channels": 4096, "activation_fn": "gelu-approximate", "attention_bias": True,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000, "interpolation_scale": 2, "use_additional_conditions": False,
    "upcast_attention": False, "dropout": 0.0, "attention_type": "default",
}

_FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
_FLUX_SCHNELL = {**_FLUX_DEV, "guidance_embeds": False}

_REFERENCE = {  # catrt/reference: pixel space, 32x32 images, patch 2 -> 256 image tokens
    "sample_size": 32, "patch_size": 2, "in_channels": 3, "out_channels": 3, "num_layers": 4,
    "attention_head_dim": 24, "num_attention_heads": 4, "joint_attention_dim": 64,
    "caption_projection_dim": 96, "pooled_projection_dim": 64, "pos_embed_max_size": 32,
}

MODEL_CARDS: dict[str, ModelCard] = {
    card.name: card
    for card in (
        ModelCard(
            "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", _SD3_MEDIUM, 77 + 256, precision="fp16",
        ),
        ModelCard(
            "sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", _SD35_MEDIUM, 77 + 256, precision="bf16",
        ),
        ModelCard(
            "sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "sd3", _SD35_LARGE, 77 + 256, precision="bf16",
        ),
        ModelCard(
            "pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", _PIXART_SIGMA, 300,
            default_steps=20, default_guidance=4.5, precision="fp16", gated=False,
        ),
        ModelCard(
            "flux-dev", "black-forest-labs/FLUX.1-dev", "flux", _FLUX_DEV, 512, default_guidance=3.5, precision="bf16",
            cells_per_token=2, sample_size=128,
        ),
        ModelCard(
            "flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux", _FLUX_SCHNELL, 256, default_steps=4,
            default_guidance=0.0, precision="bf16", cells_per_token=2, sample_size=128, default_t0=2,
        ),
        ModelCard("reference", None, "sd3", _REFERENCE, 16, vae_scale=1, default_guidance=4.0),
    )
}


def default_precision(model: str, device_type: str) -> Precision:
    """The precision to run `model` in when none is asked for.

    On CUDA a published model runs in the dtype it is released and usually served in (SD3 and
    PixArt-Sigma fp16, SD3.5 and FLUX.1 bf16) and a local diffusers folder in the dtype its transformer was
    saved in (`saved_precision`: a folder saved from an fp16 SD3 runs fp16, not twice the memory in fp32); the
    reference and tiny models, a folder whose dtype cannot be read, and every other device run fp32, which is exact
    and runs everywhere.
    """
    if device_type != "cuda":
        return "fp32"
    card = MODEL_CARDS.get(model)
    if card is not None:
        return card.precision
    if not model or model in TINY_MODELS or not os.path.isdir(model):  # a name wins over a folder of that name
        return "fp32"
    return saved_precision(Path(model)) or "fp32"


_SAFETENSORS_PRECISIONS: dict[str, Precision] = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
#: Largest safetensors header read (headers are kilobytes to a few megabytes; a bigger one is not a header).
_MAX_HEADER_BYTES = 64 << 20


def saved_precision(folder: Path) -> Precision | None:
    """The precision most of a diffusers folder's transformer weights are saved in, from the safetensors headers
    (the dtype of each tensor, no weight read); None without readable safetensors files there.

    Where the folder holds the plain weight files (one, or shards) beside variants (`*.fp16.safetensors`), only the
    plain ones count: diffusers loads those unless asked for a variant. A header that is not one (a dtype that is no
    string, a negative dimension, nesting past the parser's depth) is no evidence, never an error."""
    counts: dict[Precision, int] = {}
    for path in _loaded_weight_files(folder / "transformer"):
        try:
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size <= _MAX_HEADER_BYTES else {}
        except (OSError, ValueError, RecursionError):
            continue
        for name, entry in header.items() if isinstance(header, dict) else ():
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            precision = _SAFETENSORS_PRECISIONS.get(dtype) if isinstance(dtype, str) else None
            shape = entry.get("shape") if precision is not None else None
            if name != "__metadata__" and isinstance(shape, list) and all(_is_dimension(d) for d in shape):
                counts[precision] = counts.get(precision, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None


#: diffusers' own name for a model's weights, one file or shards (`-00001-of-00002`), without a variant.
_PLAIN_WEIGHTS = re.compile(r"diffusion_pytorch_model(-[0-9]+-of-[0-9]+)?\.safetensors")


def _loaded_weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers loads from a model folder: the plain ones where there are any, else all."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [path for path in files if _PLAIN_WEIGHTS.fullmatch(path.name)]
    return plain or files


def _is_dimension(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def size_limits(card: ModelCard) -> tuple[int, int | None]:
    """(multiple, largest) pixel size the card's transformer takes; largest is None when unbounded.

    Each latent cell is `vae_scale` pixels and each token `token_cells` cells; SD3-layout models
    crop a fixed position table of `pos_embed_max_size` tokens a side, PixArt interpolates its own and
    FLUX rotates; `max_grid_side` states the side where the config does not (as the family's adapter does).
    """
    multiple = card.vae_scale * card.token_cells
    side = card.max_grid_side if card.max_grid_side is not None else card.transformer_config.get("pos_embed_max_size")
    return multiple, None if side is None else int(side) * multiple


def check_image_size(height: int, width: int, multiple: int, largest: int | None, model: str) -> None:
    """Refuse a size the model cannot take, naming the field and sizes that would work.

    Checked before loading where the limits are known, so a mistake costs no model load.
    """
    span = f"multiples of {multiple}" + ("" if largest is None else f" up to {largest}")
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple or (largest is not None and value > largest):
            below = max(multiple, value // multiple * multiple)
            suggestion = below if largest is None else min(below, largest)
            raise ConfigError(
                f"{name} {value} does not fit model {model}, which takes {span} pixels; "
                f"try {name} {suggestion}",
                field=name, value=value,
            )


#: The tiny random-weight pipelines catrt builds from configs, by name (catrt/tiny.py makes them; this light list
#: lets the CLI and the server check a name without importing torch, and a test keeps the two equal).
TINY_MODELS: tuple[str, ...] = ("tiny-sd3", "tiny-sd3.5", "tiny-pixart", "tiny-flux", "tiny-flux-schnell")


def check_model_source(name_or_path: str | os.PathLike) -> str:
    """`name_or_path` as a string when it is a catrt model name or a diffusers folder; refused otherwise.

    Names win over folders of the same name. Light (no torch): the server asks before it binds its port,
    so a mistyped name is one line, not a listening server that then fails to load.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UnknownModelError(
            f"a model is a catrt name or a diffusers folder path (str or os.PathLike), got {type(name_or_path).__name__}",
            field="model", value=type(name_or_path).__name__,
        )
    key = os.fspath(name_or_path)
    if not isinstance(key, str) or not key or (
        key not in MODEL_CARDS and key not in TINY_MODELS and not path_is(Path(key) / "model_index.json", "file")
    ):
        names = sorted({*MODEL_CARDS, *TINY_MODELS})
        raise UnknownModelError(
            f"unknown model {echo(key, PATH_ECHO_LIMIT)}: known names are {', '.join(names)}; "
            "a path must be an existing diffusers folder (one with model_index.json)",
            field="model", value=key,
        )
    return key
