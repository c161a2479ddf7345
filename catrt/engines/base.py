"""The engine contract: two static-shape graphs ("full", "pruned") run on named tensors.

Every backend implements `load`, `run` and `describe`; the shared `full_forward` / `pruned_forward`
map the adapter's signature onto graph inputs, so any engine plugs into `CATRuntime` as `functions`.
The graph I/O (names, shapes, dtypes) comes from the bundle's manifest, written by the builder.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from catrt.errors import ConfigError
from catrt.models.base import Adapter, Context

logger = logging.getLogger(__name__)

GRAPHS: tuple[str, ...] = ("full", "pruned")
# Positional graph inputs, before the context tensors (named after the context's keys).
FULL_INPUTS: tuple[str, ...] = ("hidden_states", "timestep")
PRUNED_INPUTS: tuple[str, ...] = ("patches", "indices", "timestep", "kv_cache")
FULL_OUTPUTS: tuple[str, ...] = ("tokens", "kv")
PRUNED_OUTPUTS: tuple[str, ...] = ("tokens", "kv_rows")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, static shape and dtype (a `DTYPES` key)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class GraphSpec:
    """The I/O of one graph, in the graph's input and output order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs in graph order, cast to the graph's dtypes and contiguous; a shape the graph was
        not built for is a ConfigError naming the input, not an error deep in a backend."""
        prepared = {}
        for spec in self.inputs:
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise ConfigError(f"the engine needs input {spec.name!r}, which this call did not provide", field=spec.name)
            if tuple(tensor.shape) != spec.shape:
                raise ConfigError(
                    f"input {spec.name!r} has shape {tuple(tensor.shape)} but the engine was built for {spec.shape}; "
                    f"call it with the build's resolution, batch and text length or build another engine",
                    field=spec.name,
                    value=tuple(tensor.shape),
                )
            prepared[spec.name] = tensor.to(spec.torch_dtype).contiguous()
        return prepared

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
            tuple(TensorSpec.from_dict(s) for s in data["outputs"]),
        )


class Engine(ABC):
    """A backend running a build's two graphs on `device`.

    Subclasses say which package's version a bundle must match (`package`), which device fields
    must match the build machine's (`device_fields`), and where they can run.
    """

    name: ClassVar[str]
    package: ClassVar[str | None] = None
    device_fields: ClassVar[tuple[str, ...]] = ("kind",)
    #: Picked by `--backend auto` only on a GPU (on a CPU it is slower to build than it gains).
    gpu_only_in_auto: ClassVar[bool] = False

    def __init__(self, folder: Path, graphs: dict[str, GraphSpec], adapter: Adapter, device: torch.device) -> None:
        self.folder = folder
        self.graphs = graphs
        self.adapter = adapter
        self.device = device

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (a missing package or device), or None."""
        return None

    @classmethod
    def default_device(cls) -> torch.device:
        """The device a build for this backend targets on this machine."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @abstractmethod
    def load(self) -> None:
        """Make the graphs runnable (deserialize, compile, create sessions)."""

    @abstractmethod
    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run `graph` on prepared inputs (graph order, graph dtypes, on `device`); outputs by name."""

    def describe(self) -> dict[str, Any]:
        """What this engine was built for and runs on."""
        return {
            "backend": self.name,
            "device": str(self.device),
            "folder": str(self.folder),
            "graphs": {name: spec.to_dict() for name, spec in self.graphs.items()},
        }

    def full_forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, context: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's `full_forward`, run by this engine."""
        outputs = self._call("full", {"hidden_states": hidden_states, "timestep": timestep, **context})
        return outputs["tokens"], outputs["kv"]

    def pruned_forward(
        self,
        patches: torch.Tensor,
        indices: torch.Tensor,
        timestep: torch.Tensor,
        context: Context,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's `pruned_forward`, run by this engine."""
        inputs = {"patches": patches, "indices": indices, "timestep": timestep, "kv_cache": kv_cache, **context}
        outputs = self._call("pruned", inputs)
        return outputs["tokens"], outputs["kv_rows"]

    def _call(self, graph: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(graph, self.graphs[graph].prepare(tensors))


def split_inputs(graph: str, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], Context]:
    """Graph inputs -> (positional adapter arguments, context) for backends that call the adapter."""
    positional = FULL_INPUTS if graph == "full" else PRUNED_INPUTS
    context = {name: tensor for name, tensor in inputs.items() if name not in positional}
    return [inputs[name] for name in positional], context
