"""One copy of an ONNX bundle's weights for all its ONNX Runtime sessions.

Each session would otherwise read `weights.bin` into its own memory. Here the file is read once into memory of
this process, hashed as it is read and checked against the sha256 and size of the manifest `catrt.load` checked
(`catrt.engines.verified_file`; this read is the file's sha256 check at load, `catrt.file_checks.VERIFIED_AS_READ`),
and every distinct tensor in it becomes one OrtValue that each session using it
receives through `SessionOptions.add_initializer` (ONNX Runtime then uses that memory as is). So the sessions run on
exactly the bytes the manifest's digest covers: a `weights.bin` written in place after the bundle's check is refused
naming it, and one written later changes nothing. (It was memory-mapped: ONNX Runtime read the file's pages as it ran,
unchecked, for as long as the engine lived.) ONNX Runtime still reads from the file itself, by path, the weights its
graph optimizations fold while the sessions are made: `loaded` refuses them unless the file is still the one read
here, unwritten.
Where each graph's initializers lie is in the bundle's `initializers.json`, written by the export and read the
same way, so no onnx import is needed at run time.

ONNX Runtime uses a shared initializer as it is only where it already lies on the device its session
planned for it, and otherwise loads a copy of its own per session (logging a warning). So for the CUDA
provider the floating-point weights are copied to the GPU once, here, and shared from there; integer
initializers (shape and index constants, which CUDA kernels read on the host) stay in host memory, copied out of the
file's bytes so that those are let go once the sessions are made (`loaded`).
`add_initializer` takes only memory the caller owns ("Buffer containing the initializer must be owned by
the user"), so the GPU copy is a torch tensor handed to ONNX Runtime through DLPack
(`OrtValue.from_dlpack`, in ONNX Runtime's inference builds since 1.21), not `ortvalue_from_numpy(..., "cuda")`,
whose value ONNX Runtime allocates and owns, and which `add_initializer` refuses. An ONNX Runtime without
`from_dlpack` shares the host weights only: each CUDA session then loads its own GPU copy from `weights.bin` itself
(a warning says so), checked unchanged by `loaded` as the folded weights are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catrt.engines.verified_file import VerifiedFile, verified_bytes
from catrt.file_checks import VERIFIED_AS_READ

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
INITIALIZERS_FILE = "initializers.json"
#: initializers.json element type -> numpy dtype name (ONNX's names for them).
NUMPY_DTYPES: dict[str, str] = {"float": "float32", "float16": "float16", "double": "float64", "int64": "int64", "int32": "int32"}


class SharedInitializers:
    """The OrtValues of a bundle's shared weights, made once and kept alive as long as the sessions."""

    def __init__(
        self, folder: Path, device: torch.device | None = None, files: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """`files`: the checked manifest's records, which the files are verified against as read (None: a build's own
        staging, read unchecked)."""
        records = files or {}
        self.table: dict[str, list[dict[str, Any]]] = json.loads(
            verified_bytes(folder / INITIALIZERS_FILE, records.get(INITIALIZERS_FILE))
        )
        # `catrt.load` checked all of weights.bin but its sha256 (VERIFIED_AS_READ): this read, before any session, does.
        first_check = WEIGHTS_FILE in VERIFIED_AS_READ["onnxruntime"]
        with VerifiedFile(folder / WEIGHTS_FILE, records.get(WEIGHTS_FILE), first_check) as weights:
            self.data: np.ndarray | None = np.frombuffer(weights.whole(), dtype=np.uint8)
            weights.finish()
        #: weights.bin as read here, to tell whether it changed while ONNX Runtime read it itself (None: not checked).
        self.weights_file = weights if files is not None else None
        self.device = device if device is not None else torch.device("cpu")
        #: (offset, dtype, shape) -> OrtValue (None: not shared): one value per tensor as the graphs read it. Keyed by
        #: offset alone, a graph reading those bytes as another dtype or shape (each graph's own placement is what
        #: integrity checks) got the value made for the first graph.
        self.values: dict[tuple[int, str, tuple[int, ...]], Any] = {}
        self.from_dlpack = _from_dlpack() if self.device.type == "cuda" else None

    def add_to(self, options: Any, graph_path: Path) -> None:
        """Hand `options` (the session of `graph_path`) every shared initializer its graph names."""
        import onnxruntime

        for record in self.table.get(graph_path.stem, []):
            offset = record["offset"]
            key = (offset, record["dtype"], tuple(record["shape"]))
            if key not in self.values:
                assert self.data is not None, "every session is made before `loaded`"
                dtype = np.dtype(NUMPY_DTYPES[record["dtype"]])
                array = self.data[offset : offset + record["length"]].view(dtype).reshape(record["shape"])
                self.values[key] = self._ort_value(onnxruntime, array)
            if self.values[key] is not None:
                options.add_initializer(record["name"], self.values[key])

    def loaded(self) -> None:
        """Every session is made: refuse them if weights.bin was written since it was read here (ONNX Runtime's graph
        optimizations read the weights they fold from the file themselves, while the sessions are made), then let go of
        the file's bytes (on the CPU the values are views of them and keep them)."""
        if self.weights_file is not None:
            self.weights_file.check_unchanged("ONNX Runtime")
        self.data = None

    def _ort_value(self, onnxruntime: Any, array: np.ndarray) -> Any:
        """`array` as an OrtValue where the sessions will read it: weights on the GPU for the CUDA provider
        (None where this ONNX Runtime cannot take a GPU tensor it does not own: the sessions read `weights.bin`)."""
        if self.device.type != "cuda":
            return onnxruntime.OrtValue.ortvalue_from_numpy(array)
        if not np.issubdtype(array.dtype, np.floating):
            return onnxruntime.OrtValue.ortvalue_from_numpy(array.copy())
        if self.from_dlpack is None:
            return None
        tensor, capsule = to_device(array, self.device)
        return onnxruntime.OrtValue(self.from_dlpack(capsule), tensor)


def _from_dlpack() -> Any:
    """ONNX Runtime's `OrtValue.from_dlpack` (an OrtValue over memory its caller owns), or None with a warning."""
    import onnxruntime
    from onnxruntime.capi import _pybind_state

    from_dlpack = getattr(_pybind_state.OrtValue, "from_dlpack", None)
    if from_dlpack is None:
        logger.warning(
            "onnxruntime %s has no OrtValue.from_dlpack (1.21 and later have it), so the weights cannot be shared on the "
            "GPU: each CUDA session loads its own copy", onnxruntime.__version__,
        )
    return from_dlpack


def to_device(array: np.ndarray, device: torch.device) -> tuple[torch.Tensor, Any]:
    """A copy of `array` on `device`, owned by torch (`torch.tensor` copies: the memory map is read only), and its DLPack
    capsule. A copy from pageable host memory has finished when it returns, so ONNX Runtime's streams read it whole;
    torch exports a GPU tensor only from its own device (`__dlpack__` refuses one on another than the current)."""
    with torch.cuda.device(device):
        tensor = torch.tensor(array, device=device)
        return tensor, tensor.__dlpack__()
