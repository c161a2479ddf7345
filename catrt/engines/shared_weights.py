"""One copy of an ONNX bundle's weights for all its ONNX Runtime sessions.

Each session would otherwise read `weights.bin` into its own memory. Here the file is memory-mapped
once, read only, and every distinct tensor in it becomes one OrtValue that each session using it
receives through `SessionOptions.add_initializer` (ONNX Runtime then uses that memory as is). Where
each graph's initializers lie is in the bundle's `initializers.json`, written by the export, so no
onnx import is needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


WEIGHTS_FILE = "weights.bin"
INITIALIZERS_FILE = "initializers.json"
#: initializers.json element type -> numpy dtype name (ONNX's names for them).
NUMPY_DTYPES: dict[str, str] = {"float": "float32", "float16": "float16", "double": "float64", "int64": "int64", "int32": "int32"}


class SharedInitializers:
    """The OrtValues of a bundle's shared weights, made once and kept alive as long as the sessions."""

    def __init__(self, folder: Path) -> None:
        self.table: dict[str, list[dict[str, Any]]] = json.loads((folder / INITIALIZERS_FILE).read_text())
        self.data = np.memmap(folder / WEIGHTS_FILE, dtype=np.uint8, mode="r")
        self.values: dict[int, Any] = {}  # offset -> OrtValue

    def add_to(self, options: Any, graph_path: Path) -> None:
        """Hand `options` (the session of `graph_path`) every shared initializer its graph names."""
        import onnxruntime

        for record in self.table.get(graph_path.stem, []):
            offset = record["offset"]
            if offset not in self.values:
                dtype = np.dtype(NUMPY_DTYPES[record["dtype"]])
                array = self.data[offset : offset + record["length"]].view(dtype).reshape(record["shape"])
                self.values[offset] = onnxruntime.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(record["name"], self.values[offset])
