"""What a build writes into its engine folder, per backend (a dict registry, as `ENGINES`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from catrt.build_config import BuildConfig
from catrt.export.tensorrt import build_plans


#: (ONNX export folder, engine staging folder, build, the graph names) -> engine files in the staging folder.
WriteEngine = Callable[[Path, Path, BuildConfig, Iterable[str]], None]


def _nothing(onnx_dir: Path, engine_dir: Path, build: BuildConfig, graphs: Iterable[str]) -> None:
    """PyTorch backends run the pipeline's own weights; their bundle is the manifest alone."""


def _copy_onnx(onnx_dir: Path, engine_dir: Path, build: BuildConfig, graphs: Iterable[str]) -> None:
    """ONNX Runtime's engine files are the exported graphs and their shared weights."""
    for path in sorted(onnx_dir.iterdir()):
        shutil.copy2(path, engine_dir / path.name)


@dataclass(frozen=True)
class BackendBuild:
    """Whether a backend needs the ONNX export, and how it turns it into engine files."""

    needs_onnx: bool
    write_engine: WriteEngine


BACKEND_BUILDS: dict[str, BackendBuild] = {
    "eager": BackendBuild(needs_onnx=False, write_engine=_nothing),
    "compile": BackendBuild(needs_onnx=False, write_engine=_nothing),
    "onnxruntime": BackendBuild(needs_onnx=True, write_engine=_copy_onnx),
    "tensorrt": BackendBuild(needs_onnx=True, write_engine=build_plans),
}
