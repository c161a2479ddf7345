"""Store the weights of several ONNX graphs once, in one external-data file.

The exporters embed every weight in each graph (and may name the same tensor differently), so two
graphs of one transformer would hold it twice. Initializers are deduplicated by content: each
distinct tensor is written once to `weights.bin` and every graph points at its offset.
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


def save_with_shared_weights(models: dict[str, onnx.ModelProto], folder: Path) -> dict[str, int]:
    """Write `<name>.onnx` per model plus one `weights.bin`; checks each saved graph by path.

    Returns the byte counts {"stored": weights.bin size, "referenced": sum over graphs}.
    """
    offsets: dict[bytes, tuple[int, int]] = {}
    referenced = 0
    table: dict[str, list[dict[str, object]]] = {name: [] for name in models}
    with open(folder / WEIGHTS_FILE, "wb") as data:
        for graph, model in models.items():
            for tensor in model.graph.initializer:
                raw = _raw_bytes(tensor)
                if len(raw) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(bytes([tensor.data_type]) + repr(list(tensor.dims)).encode() + raw).digest()
                if key not in offsets:
                    data.write(b"\0" * (-data.tell() % ALIGNMENT))
                    offsets[key] = (data.tell(), len(raw))
                    data.write(raw)
                referenced += len(raw)
                offset, length = offsets[key]
                table[graph].append(
                    {"name": tensor.name, "offset": offset, "length": length, "shape": list(tensor.dims),
                     "dtype": onnx.TensorProto.DataType.Name(tensor.data_type).lower()}
                )
                set_external_data(tensor, location=WEIGHTS_FILE, offset=offset, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
        stored = data.tell()
    (folder / INITIALIZERS_FILE).write_text(json.dumps(table, indent=1) + "\n")
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
    logger.info("weights: %d bytes referenced by the graphs, %d stored", referenced, stored)
    return {"stored": stored, "referenced": referenced}


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's little-endian bytes, whether the exporter used raw_data or typed fields."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    normalized = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
    tensor.CopyFrom(normalized)
    return tensor.raw_data
