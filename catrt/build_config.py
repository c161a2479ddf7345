"""`BuildConfig`: what one engine build serves, validated when made and stored in its manifest.

Graphs have static shapes, so a build is tied to one resolution, batch and text length; the step
count and t0 fix the schedule the bundle is verified for, `reuse_every` (a schedule, static like t0)
which steps it skips, and each of its alphas one pruned graph with k = ceil(alpha * N) baked in.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch

from catrt.checks import ALPHA_REL_TOL, MAX_BATCH, MAX_STEPS, alike_alphas, integer, require
from catrt.config import CATConfig, config_from_dict, plain_numbers
from catrt.errors import ConfigError, echo

Precision = Literal["fp32", "fp16", "bf16"]
Backend = Literal["auto", "eager", "compile", "onnxruntime", "tensorrt"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS: tuple[str, ...] = ("auto", "eager", "compile", "onnxruntime", "tensorrt")
#: The CATConfig fields a build fixes: a run of the bundle must use the build's values (alpha: one of its alphas).
FIXED_CAT_FIELDS: tuple[str, ...] = ("alpha", "t0", "reuse_every")
DEFAULT_ALPHAS: tuple[float, ...] = (0.3,)


def check_static_schedule(config: CATConfig) -> CATConfig:
    """Refuse what an engine cannot run: `reuse_threshold` decides each step on the host (a bench baseline)."""
    if config.reuse_threshold:
        raise ConfigError(
            f"reuse_threshold={config.reuse_threshold} decides each step on the host from the first block's output, "
            "which engines do not compute; engines run a static schedule: build one with --reuse-every instead",
            field="reuse_threshold", value=config.reuse_threshold,
        )
    return config


@dataclass(frozen=True)
class BuildConfig:
    """One engine build.

    Args:
        model: a catrt model name or a local diffusers folder, loaded with `load_pipeline`.
        height, width: image size in pixels; None = the model's default, fixed when the build runs.
        batch: prompts per call; with guidance the graphs take 2 * batch rows.
        steps, t0: the CAT schedule served.
        alphas: the alphas served, in order; the first is the default of a call. Each has its own
            pruned graph (k = ceil(alpha * N) baked in), so no two may select the same k. One number is
            one alpha: `alphas=0.3` (or `alpha=0.3`, the single-alpha keyword) is `alphas=(0.3,)`.
        reuse_every: CATConfig.reuse_every of the schedule served (0 = no reused steps).
        precision: weights and activations; fp16 / bf16 need a CUDA device.
        backend: the engine kind; "auto" is resolved to a concrete backend before building.
        max_sequence_length: the pipeline's text length (static in the graphs); None = its default.
    """

    model: str
    height: int | None = None
    width: int | None = None
    batch: int = 1
    steps: int = 28
    t0: int = 8
    alphas: tuple[float, ...] = field(default=DEFAULT_ALPHAS)
    reuse_every: int = 0
    precision: Precision = "fp32"
    backend: Backend = "auto"
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)  # numpy counts (np.int64(6) steps) as Python's, as CATConfig takes them
        if isinstance(self.alphas, numbers.Real) and not isinstance(self.alphas, bool):
            object.__setattr__(self, "alphas", (self.alphas,))  # one alpha, as `catrt build --alpha 0.3` gives it
        _check_alphas(self.alphas)
        # a list read back from JSON; numpy alphas as the decimals they print, as CATConfig reads them
        object.__setattr__(self, "alphas", tuple(CATConfig(alpha=alpha).alpha for alpha in self.alphas))
        require("BuildConfig", "model", self.model, isinstance(self.model, str) and bool(self.model), "a model name or folder")
        for name in ("height", "width", "max_sequence_length"):
            value = getattr(self, name)
            require("BuildConfig", name, value, value is None or (integer(value) and value >= 1), "a positive integer or None")
        require("BuildConfig", "batch", self.batch, integer(self.batch) and 1 <= self.batch <= MAX_BATCH,
                f"an integer from 1 to {MAX_BATCH}")
        _check_choice("precision", self.precision, tuple(PRECISIONS))
        _check_choice("backend", self.backend, BACKENDS)
        require("BuildConfig", "steps", self.steps, integer(self.steps) and 1 <= self.steps <= MAX_STEPS,
                f"an integer from 1 to {MAX_STEPS}")
        for each in self.alphas:
            self.cat_config(alpha=each).check_steps(self.steps)  # also validates alpha, t0 and reuse_every

    @property
    def alpha(self) -> float:
        """The default alpha of a call: the first built one."""
        return self.alphas[0]

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def cat_config(self, **overrides: Any) -> CATConfig:
        """The pruning settings this build serves (alpha: the first built one unless overridden).

        Fields other than `FIXED_CAT_FIELDS` (alpha, t0, reuse_every) may be overridden; alpha may be any
        built one, the other fixed fields only the build's own value, else it is a ConfigError naming the field.
        """
        alpha = self.built_alpha(overrides.pop("alpha", self.alphas[0]))
        fixed = {name: getattr(self, name) for name in FIXED_CAT_FIELDS if name != "alpha"}
        for name, value in overrides.items():
            if name in fixed and value != fixed[name]:
                raise ConfigError(
                    f"this engine was built for {name}={fixed[name]}, the config asks for {name}={value}; "
                    f"build an engine with that value",
                    field=name, value=value,
                )
        return check_static_schedule(CATConfig(**{**overrides, **fixed, "alpha": alpha}))

    def built_alpha(self, alpha: Any) -> float:
        """The built alpha `alpha` names, equal to float32 precision (numpy's float32 0.3 is the built 0.3);
        a ConfigError naming the built ones unless it is one of them."""
        real = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
        if real:
            for built in self.alphas:
                if math.isclose(float(alpha), built, rel_tol=ALPHA_REL_TOL):
                    return built
        # A number as written; anything else quoted and shortened, so the string "0.3" never reads as the built 0.3.
        shown = alpha if real else echo(alpha)
        raise ConfigError(
            f"this engine was built for alpha in {format_alphas(self.alphas)}, not alpha={shown}; use one of "
            f"those or build an engine with that alpha (catrt build --alpha ...)",
            field="alpha", value=alpha,
        )

    def num_selected(self, num_tokens: int, alpha: float | None = None) -> int:
        """k of `alpha` (default: the first built alpha)."""
        return self.cat_config(alpha=self.alphas[0] if alpha is None else alpha).num_selected(num_tokens)

    def resolved(self, **values: Any) -> BuildConfig:
        """A copy with values fixed at build time (the concrete backend, the default resolution)."""
        return replace(self, **values)

    def call_arguments(self) -> dict[str, Any]:
        """Pipeline call arguments whose values the graphs' static shapes depend on."""
        arguments: dict[str, Any] = {"height": self.height, "width": self.width, "num_inference_steps": self.steps}
        if self.max_sequence_length is not None:
            arguments["max_sequence_length"] = self.max_sequence_length
        return arguments

    def build_name(self) -> str:
        """Folder name, e.g. `tiny-sd3-96x64-b1-s12-t4-a0.30-fp32-onnxruntime` (never parsed back).

        The size is WxH, width first, as OpenAI's `size` and everywhere else in catrt. Several alphas
        are joined by `_` in built order (`-a0.20_0.30_0.50`); an alpha with more than two decimals shows them
        all (`-a0.301`). A non-zero `reuse_every` adds `-r{N}` after the alphas (`...-a0.30-r2-...`).
        """
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1]).strip("-.") or "model"
        reuse = f"-r{self.reuse_every}" if self.reuse_every else ""
        text = "" if self.max_sequence_length is None else f"-l{self.max_sequence_length}"
        return (
            f"{model}-{self.width}x{self.height}-b{self.batch}-s{self.steps}-t{self.t0}-a{'_'.join(map(_alpha_label, self.alphas))}"
            f"{reuse}{text}-{self.precision}-{self.backend}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        return config_from_dict(cls, data)


def _single_alpha_keyword(init: Callable[..., None]) -> Callable[..., None]:
    """`BuildConfig(model, alpha=0.3)`: a single-alpha build named as `catrt build --alpha` and `CATConfig` name it (and
    as BuildConfig did before it served several). Taken as `alphas=(0.3,)`; given with `alphas` it is refused, naming
    both, rather than one silently winning."""
    unset = object()

    @functools.wraps(init)
    def __init__(self: BuildConfig, *args: Any, alpha: Any = unset, **kwargs: Any) -> None:
        if alpha is not unset:
            if "alphas" in kwargs or len(args) > _ALPHAS_POSITION:
                raise ConfigError(
                    "BuildConfig takes alpha (one alpha) or alphas (several), not both; give alphas=(...) alone",
                    field="alpha", value=alpha,
                )
            if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
                raise ConfigError(
                    f"BuildConfig.alpha must be one alpha in (0, 1] (alphas=(...) takes several), got {echo(alpha)}",
                    field="alpha", value=alpha,
                )
            kwargs["alphas"] = (CATConfig(alpha=alpha).alpha,)  # its range refused naming alpha
        init(self, *args, **kwargs)

    return __init__


#: Where `alphas` is among the positional arguments (after model, height, width, batch, steps, t0).
_ALPHAS_POSITION = [f.name for f in fields(BuildConfig)].index("alphas")
BuildConfig.__init__ = _single_alpha_keyword(BuildConfig.__init__)  # type: ignore[method-assign]


def _alpha_label(alpha: float) -> str:
    """An alpha in a build name: two decimals (0.30) where they are exact, else every digit it has (0.301), so two
    builds of other alphas never share a name (the second would replace the first)."""
    short = f"{alpha:.2f}"
    return short if float(short) == alpha else repr(float(alpha))


def format_alphas(alphas: tuple[float, ...]) -> str:
    """"0.2, 0.3, 0.5": alphas as messages and `catrt inspect` show them."""
    return ", ".join(f"{alpha:g}" for alpha in alphas)


def _check_alphas(alphas: Any) -> None:
    """A non-empty sequence of distinct alphas (each value is checked by CATConfig)."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, (tuple, list)) or not alphas:
        raise ConfigError(f"BuildConfig.alphas must be a non-empty list of alphas, got {echo(alphas)}", field="alphas", value=alphas)
    for alpha in alphas:
        try:
            CATConfig(alpha=alpha)  # in (0, 1]
        except ConfigError as error:
            raise ConfigError(f"BuildConfig.alphas: {error}", field="alphas", value=alpha) from None
    if len(set(alphas)) != len(alphas):
        raise ConfigError(f"BuildConfig.alphas lists an alpha twice: {list(alphas)}", field="alphas", value=list(alphas))
    if (alike := alike_alphas(alphas)) is not None:  # `built_alpha` would name both as the first
        raise ConfigError(
            f"BuildConfig.alphas lists {alike[0]!r} and {alike[1]!r}, one alpha at float32 precision (a call's alpha "
            f"names either): drop one", field="alphas", value=list(alphas),
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require("BuildConfig", name, value, value in choices, f"one of {', '.join(choices)}")

