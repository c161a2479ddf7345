"""`ServeConfig`: what `catrt serve` serves and how it queues, validated when made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from catrt.config import CATConfig
from catrt.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """One server.

    Args:
        engines: a built engine folder (`catrt build`); what it serves comes from its manifest.
        model: instead of `engines`, a model name or diffusers folder run eagerly with `cat`.
        height, width, steps, batch: what the eager model serves (ignored with `engines`).
        cat: the pruning settings of the eager model (ignored with `engines`).
        device: torch device of the eager model.
        host, port: where to listen.
        max_queue: requests that may wait for the worker; one more answers 429.
        timeout: seconds a request may take from arrival to answer (queue wait included); then 504.
    """

    engines: str | None = None
    model: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 28
    batch: int = 1
    cat: CATConfig = field(default_factory=CATConfig)
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if (self.engines is None) == (self.model is None):
            raise ConfigError("give exactly one of --engines DIR or --model NAME", field="engines", value=self.engines)
        if self.model is not None:
            for name in ("height", "width"):
                _check_positive(name, getattr(self, name), "--model needs an explicit image size")
            _check_positive("steps", self.steps, "")
            _check_positive("batch", self.batch, "")
            self.cat.check_steps(self.steps)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port must be in [0, 65535], got {self.port!r}", field="port", value=self.port)
        _check_positive("max_queue", self.max_queue, "")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not (
            math.isfinite(self.timeout) and self.timeout > 0
        ):
            raise ConfigError(f"ServeConfig.timeout must be > 0 seconds, got {self.timeout!r}", field="timeout")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cat"] = self.cat.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        values = dict(data)
        values["cat"] = CATConfig.from_dict(values.get("cat", {}))
        return cls(**values)


def _check_positive(name: str, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = f" ({reason})" if reason else ""
        raise ConfigError(f"ServeConfig.{name} must be a positive integer{hint}, got {value!r}", field=name, value=value)
