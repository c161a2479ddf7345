"""Store the weights of several ONNX graphs once, in one external-data file.

The exporters embed every weight in each graph (and may name the same tensor differently), so two
graphs of one transformer would hold it twice. Initializers are deduplicated by content: each
distinct tensor is written once to `weights.bin` and every graph points at its offset, graph by graph as they
are exported (`SharedWeights.move_out`), so an export never holds more than one graph's weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
#: Per graph, where each external initializer lies in `weights.bin` (read at load without onnx).
INITIALIZERS_FILE = "initializers.json"
INLINE_BYTES = 1024  # smaller tensors stay inside the graph, as onnx's own converter does
ALIGNMENT = 64  # offsets aligned for memory-mapped loading


class SharedWeights:
    """`weights.bin` as it is written: each graph's weights are moved into it as soon as the graph is exported
    (`move_out`), so an export holds one graph's weights in memory at a time, not one copy per graph (the context, the
    full and every alpha's pruned graph: 4 copies of a 16 GB transformer for a two-alpha build)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.referenced = 0
        self.table: dict[str, list[dict[str, object]]] = {}
        self.data = open(folder / WEIGHTS_FILE, "wb")

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.data.close()

    def move_out(self, graph: str, model: onnx.ModelProto) -> None:
        """Point `model`'s weights of at least INLINE_BYTES at `weights.bin`, each distinct tensor written once."""
        records = self.table.setdefault(graph, [])
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor)
            if len(raw) < INLINE_BYTES:
                continue
            key = hashlib.sha256(bytes([tensor.data_type]) + repr(list(tensor.dims)).encode() + raw).digest()
            if key not in self.offsets:
                self.data.write(b"\0" * (-self.data.tell() % ALIGNMENT))
                self.offsets[key] = (self.data.tell(), len(raw))
                self.data.write(raw)
            self.referenced += len(raw)
            offset, length = self.offsets[key]
            records.append(
                {"name": tensor.name, "offset": offset, "length": length, "shape": list(tensor.dims),
                 "dtype": onnx.TensorProto.DataType.Name(tensor.data_type).lower()}
            )
            set_external_data(tensor, location=WEIGHTS_FILE, offset=offset, length=length)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL

    def save(self, models: dict[str, onnx.ModelProto]) -> dict[str, int]:
        """`initializers.json` and each `<name>.onnx` (weights moved out), checked by path; the byte counts."""
        self.data.close()
        (self.folder / INITIALIZERS_FILE).write_text(json.dumps(self.table, indent=1) + "\n")
        for name, model in models.items():
            path = self.folder / f"{name}.onnx"
            onnx.save_model(model, str(path))
            onnx.checker.check_model(str(path))
        stored = (self.folder / WEIGHTS_FILE).stat().st_size
        logger.info("weights: %d bytes referenced by the graphs, %d stored", self.referenced, stored)
        return {"stored": stored, "referenced": self.referenced}


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's little-endian bytes, whether the exporter used raw_data or typed fields."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    normalized = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
    tensor.CopyFrom(normalized)
    return tensor.raw_data
