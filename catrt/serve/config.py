"""`ServeConfig`: what `catrt serve` serves, how it queues and what it lets in, validated when made.

Imports nothing heavy: the CLI builds its parser from these defaults without loading torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dataclasses import replace

from catrt.checks import MAX_BATCH, MAX_KEPT_ALPHAS, alike_alphas, integer, number, repeated, require
from catrt.config import CATConfig, shared_k
from catrt.errors import ConfigError
from catrt.serve.alpha_policy import ALPHA_POLICIES

PRECISION_CHOICES: tuple[str, ...] = ("fp32", "fp16", "bf16")
MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """One server.

    Args:
        engines: built engine folders (`catrt build`; paths or strings) of one model, one per served size (a single
            folder may be given alone); what each serves comes from its manifest.
        model: instead of `engines`, a model name or diffusers folder run eagerly with `cat`.
        height, width: the size the eager model serves; None = the model's default size.
        steps, batch: the step count and images per call of the eager model (a build fixes its own).
        cat: the pruning settings of the eager model; with `engines` left at `CATConfig()` (a build fixes its
            schedule and runs catrt's default selection settings, so another value is refused, not ignored).
        alphas: the eager model's alphas, in order (cat.alpha, if not left at its default, must be the first;
            left at it, it becomes the first); () = cat.alpha alone. A build serves its own alphas.
        alpha_policy: "fixed" runs every call at the first alpha (unless a request pins another);
            "adaptive" picks, before each call, the largest alpha that keeps the queued requests
            within `latency_target` (catrt/serve/alpha_policy.py).
        latency_target: seconds from arrival to answer the adaptive policy aims for.
        device: torch device of the eager model.
        precision: fp32, fp16 or bf16 for the eager model; None = fp32 on the CPU, the model's
            usual dtype on CUDA. A build fixes its own.
        host, port: where to listen; the port is bound before the model loads (0 = any free port).
        max_queue: requests that may wait for the worker; one more answers 429.
        timeout: seconds a request may take from arrival to answer (queue wait included); then 504.
        hang_grace: seconds the worker may stay in a model call after every request of that call was answered
            (504 at `timeout`) or left: a healthy call stops before its next denoising step, so this covers one step,
            the text encoding or the decode. Past it the worker counts as hung (a step or the device is stuck):
            `/health/live` and `/health/ready` answer 503 and new requests 503, until the call returns; under Ray
            Serve the replica fails its health check and is replaced.
        max_body_bytes: a larger request body answers 413 before it is read or parsed.
        max_prompt_chars: a longer prompt (or negative prompt) answers 400 before it is tokenized.
        read_timeout: seconds a request may take to arrive whole, from its first byte (or from the
            connection opening); a connection still sending after that is closed (answered 408 first when
            its request's headers came whole), as is one whose client takes none of its waiting answer for that long.
        keep_alive: seconds an idle connection stays open between requests.
        api_key: if set, `/v1/*` needs `Authorization: Bearer <api_key>`; never written out.
        bundle_key_file: a file holding the key an engine bundle was signed with (`catrt build
            --sign-key-file`): an unsigned or otherwise signed bundle is refused. None =
            `$CATRT_BUNDLE_KEY` if set (as `catrt.load` reads it). Read when the server starts.
        metrics_auth: `/metrics` needs the key too (otherwise it stays open, like `/health/*`).
    """

    engines: tuple[str, ...] | None = None
    model: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 28
    batch: int = 1
    cat: CATConfig = field(default_factory=CATConfig)
    alphas: tuple[float, ...] = ()
    alpha_policy: str = "fixed"
    latency_target: float | None = None
    device: str = "cpu"
    precision: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16
    timeout: float = 60.0
    hang_grace: float = 60.0
    max_body_bytes: int = MIB
    max_prompt_chars: int = 4000
    read_timeout: float = 10.0
    keep_alive: float = 5.0
    api_key: str | None = field(default=None, repr=False)
    metrics_auth: bool = False
    bundle_key_file: str | None = None

    def __post_init__(self) -> None:
        if self.engines is not None:  # one folder (`build_engines` returns a Path), or several; kept as strings
            folders = (self.engines,) if isinstance(self.engines, (str, os.PathLike)) else self.engines
            if not isinstance(folders, (list, tuple)) or not all(isinstance(each, (str, os.PathLike)) for each in folders):
                raise ConfigError("--engines takes engine folder paths (catrt build)", field="engines", value=self.engines)
            object.__setattr__(self, "engines", tuple(map(os.fspath, folders)))
        if self.engines is not None and not self.engines:
            raise ConfigError("--engines needs at least one engine folder", field="engines", value=self.engines)
        if self.engines is not None and any(not str(folder).strip() for folder in self.engines):  # an unset variable: '.'
            raise ConfigError("--engines names an empty folder path; give engines/<build-name> folders (catrt build)",
                              field="engines", value=self.engines)
        if self.engines is not None and len(set(self.engines)) != len(self.engines):
            twice = repeated(self.engines)
            raise ConfigError(f"--engines names {', '.join(twice)} more than once", field="engines", value=twice)
        if self.engines is not None:
            _check_distinct_folders(self.engines)
        if (self.engines is None) == (self.model is None):
            raise ConfigError("give exactly one of --engines DIR or --model NAME", field="engines", value=self.engines)
        if self.model is not None:
            for name in ("height", "width"):
                if getattr(self, name) is not None:
                    _check_positive(name, getattr(self, name))
            _check_positive("steps", self.steps)
            require("ServeConfig", "batch", self.batch, integer(self.batch) and 1 <= self.batch <= MAX_BATCH,
                    f"an integer from 1 to {MAX_BATCH}")
            self.cat.check_steps(self.steps)
        if self.cat.reuse_threshold:
            raise ConfigError(
                "reuse_threshold is a benchmark baseline that decides each step on the host; the server runs static "
                "schedules (its step timings follow the plan): use reuse_every",
                field="reuse_threshold", value=self.cat.reuse_threshold,
            )
        if self.engines is not None and self.cat != CATConfig():
            raise ConfigError(
                "ServeConfig.cat sets the pruning of an eager model (model=...); engines serve their builds' schedules "
                "with catrt's default selection settings: leave cat at CATConfig() or serve the model eagerly",
                field="cat",
            )
        self._check_alphas()
        if self.precision is not None and self.precision not in PRECISION_CHOICES:
            raise ConfigError(
                f"ServeConfig.precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}",
                field="precision", value=self.precision,
            )
        if self.precision == "fp16" and self.device.split(":")[0] == "cpu":
            raise ConfigError(
                "--precision fp16 needs a CUDA device (most fp16 matmuls do not run on the CPU); use fp32 or bf16 "
                "on the CPU",
                field="precision", value=self.precision,
            )
        if self.engines is not None and self.precision is not None:
            raise ConfigError(
                "--precision is fixed by the build with --engines; drop it or build an engine with that precision",
                field="precision", value=self.precision,
            )
        require("ServeConfig", "port", self.port, integer(self.port) and 0 <= self.port <= 65535, "in [0, 65535]")
        for name in ("max_queue", "max_body_bytes", "max_prompt_chars"):
            _check_positive(name, getattr(self, name))
        for name in ("timeout", "hang_grace", "read_timeout", "keep_alive"):
            _check_seconds(name, getattr(self, name))
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("the API key must be a non-empty string", field="api_key")
        if self.bundle_key_file is not None and self.engines is None:
            raise ConfigError(
                "--bundle-key-file checks an engine bundle's signature: use it with --engines", field="bundle_key_file"
            )
        if self.metrics_auth and self.api_key is None:
            raise ConfigError(
                "--metrics-auth needs an API key (--api-key-file or CATRT_API_KEY)", field="metrics_auth"
            )

    @property
    def served_alphas(self) -> tuple[float, ...]:
        """The eager model's alphas: `alphas`, or `cat.alpha` alone."""
        return self.alphas or (self.cat.alpha,)

    def _check_alphas(self) -> None:
        object.__setattr__(self, "alphas", tuple(self.alphas))  # a list read back from JSON
        if self.alphas:
            if self.engines is not None:
                raise ConfigError("--alpha cannot be used with --engines: a build serves its own alphas", field="alpha")
            for alpha in self.alphas:
                replace(self.cat, alpha=alpha)  # each in (0, 1], naming alpha
            if self.cat.alpha == CATConfig().alpha:  # cat's alpha left at its default: the first of alphas is the default
                object.__setattr__(self, "cat", replace(self.cat, alpha=self.alphas[0]))
            if self.alphas[0] != self.cat.alpha:
                raise ConfigError(f"ServeConfig.cat.alpha {self.cat.alpha} must be the first of alphas {list(self.alphas)}",
                                  field="alpha", value=self.cat.alpha)
            if len(set(self.alphas)) != len(self.alphas):
                raise ConfigError(f"--alpha lists an alpha twice: {list(self.alphas)}", field="alpha", value=list(self.alphas))
            if len(self.alphas) > MAX_KEPT_ALPHAS:
                raise ConfigError(
                    f"--alpha lists {len(self.alphas)} alphas; a server serves at most {MAX_KEPT_ALPHAS} (catrt keeps the "
                    f"pruned graphs of {MAX_KEPT_ALPHAS} alphas per shape, so a call at another would remake one at every "
                    f"call): drop {len(self.alphas) - MAX_KEPT_ALPHAS}", field="alpha", value=list(self.alphas),
                )
            if (alike := alike_alphas(self.alphas)) is not None:
                raise ConfigError(f"--alpha lists {alike[0]!r} and {alike[1]!r}, one alpha at float32 precision: drop one",
                                  field="alpha", value=list(self.alphas))
        if self.alpha_policy not in ALPHA_POLICIES:
            raise ConfigError(f"--alpha-policy must be one of {', '.join(ALPHA_POLICIES)}, got {self.alpha_policy!r}",
                              field="alpha_policy", value=self.alpha_policy)
        if self.latency_target is not None:
            _check_seconds("latency_target", self.latency_target)
        if self.alpha_policy == "adaptive" and self.latency_target is None:
            raise ConfigError("--alpha-policy adaptive needs --latency-target SECONDS", field="latency_target")
        if self.alpha_policy == "fixed" and self.latency_target is not None:
            raise ConfigError("--latency-target is what --alpha-policy adaptive aims for; add --alpha-policy adaptive or "
                              "drop --latency-target", field="latency_target", value=self.latency_target)
        if self.alpha_policy == "adaptive" and self.model is not None and len(self.served_alphas) < 2:
            raise ConfigError("--alpha-policy adaptive needs at least two alphas to choose from: pass several, e.g. "
                              "--alpha 0.5 0.3 0.2", field="alpha", value=list(self.served_alphas))

    def to_dict(self) -> dict[str, Any]:
        """Every field but the API key, which is a secret and is never written out."""
        data = asdict(self)
        data["cat"] = self.cat.to_dict()
        data.pop("api_key")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        check_known_fields(cls, data, "serve")
        values = dict(data)
        values["cat"] = CATConfig.from_dict(values.get("cat", {}))
        return cls(**values)


def check_known_fields(cls: type, data: Any, where: str) -> None:
    """`data` (a KubeRay builder's args, a replica's settings) must be a mapping of `cls`'s fields: a misspelt
    one is refused by name, never a TypeError or silently left at its default."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}", field=where)
    unknown = sorted(str(name) for name in set(data) - {item.name for item in fields(cls)})
    if unknown:
        raise ConfigError(
            f"{where} has no setting {', '.join(unknown)}; the settings are {', '.join(item.name for item in fields(cls))}",
            field=f"{where}.{unknown[0]}", value=unknown,
        )


def _check_distinct_folders(folders: tuple[str, ...]) -> None:
    """Two spellings of one folder (`DIR` and `DIR/`, `./DIR`, a link to it) are one build named twice, not two
    builds of one size."""
    seen: dict[str, str] = {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise ConfigError(f"--engines names one folder twice, as {seen[real]} and {folder}; give it once",
                              field="engines", value=[seen[real], folder])
        seen[real] = folder


def _check_positive(name: str, value: Any) -> None:
    require("ServeConfig", name, value, integer(value) and value >= 1, "a positive integer")


def _check_seconds(name: str, value: Any) -> None:
    require("ServeConfig", name, value, number(value) and value > 0, "> 0 seconds")


@dataclass(frozen=True)
class FleetConfig:
    """`catrt serve --ray`: how many model replicas Ray Serve runs, and on which cluster.

    Args:
        replicas: a fixed number of model replicas; None = 1, or none when autoscaling (so
            `FleetConfig(min_replicas=1, max_replicas=4)` and a KubeRay `fleet: {min_replicas: 1, max_replicas: 4}`
            autoscale without a `replicas: null`).
        min_replicas, max_replicas: Ray Serve autoscales between these on ongoing requests
            (both or neither; not with `replicas`), adding a replica above min(2, max_queue / 2)
            requests per replica (`ray_app.scaling_target`).
        address: a Ray cluster to join ("auto", "ray://host:10001", ...); None starts a local one.
    """

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        autoscaled = (self.min_replicas, self.max_replicas)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("give both --min-replicas and --max-replicas to autoscale, or neither",
                              field="min_replicas" if self.min_replicas is None else "max_replicas")
        if self.min_replicas is not None and self.replicas is not None:
            raise ConfigError("--replicas fixes the replica count; drop it to autoscale with --min-replicas/--max-replicas",
                              field="replicas", value=self.replicas)
        if self.min_replicas is None and self.replicas is None:
            object.__setattr__(self, "replicas", 1)
        if self.replicas is not None:
            _check_positive("replicas", self.replicas)
        else:
            _check_positive("min_replicas", self.min_replicas)
            _check_positive("max_replicas", self.max_replicas)
            if self.min_replicas > self.max_replicas:
                raise ConfigError(f"--min-replicas {self.min_replicas} is over --max-replicas {self.max_replicas}",
                                  field="min_replicas", value=autoscaled)


def check_distinct_ks(alphas: tuple[float, ...], height: int, width: int, multiple: int) -> None:
    """Refuse eager alphas that select the same k at the served size (`multiple`: pixels per token side): they would
    run the same pruned steps under two names (one image, two alpha labels in the metrics, and an adaptive policy
    choosing between equal costs)."""
    num_tokens = (height // multiple) * (width // multiple)  # catrt.tokens.Grid's count, without importing torch
    if (shared := shared_k(alphas, num_tokens)) is not None:
        other, alpha, k = shared
        raise ConfigError(
            f"--alpha {other!r} and {alpha!r} both select k = {k} of the {num_tokens} image tokens at {width}x{height}, "
            f"so they would run the same pruned steps: drop one",
            field="alpha", value=list(alphas),
        )
