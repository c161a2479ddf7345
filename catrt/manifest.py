"""`manifest.json`: what a bundle was built for, from what, on what, and the digest of every file.

The builder writes it last; loading reads it first and checks the files and the machine against it
before any backend sees a byte, so a bad bundle is a named error instead of a backend crash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catrt.errors import CorruptBundleError, EngineMismatchError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
VERSIONED_PACKAGES: tuple[str, ...] = ("catrt", "torch", "diffusers", "onnx", "onnxruntime", "tensorrt")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """Everything `catrt.load` checks; `build` and `graphs` are the config dicts that rebuild them."""

    build: dict[str, Any]
    model: dict[str, Any]  # {"name", "pipeline_class", "transformer_class", "transformer_config", "transformer_sha256"}
    num_tokens: int
    k: int
    graphs: dict[str, Any]
    versions: dict[str, str]
    device: dict[str, Any]  # {"kind": "cpu"} or {"kind": "cuda", "name", "compute_capability"}
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size"}
    total_size: int
    verification: dict[str, Any]
    exporters: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(**data)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a bundle folder; a missing or unreadable one is a CorruptBundleError."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise CorruptBundleError(
            f"{path} is missing: {folder} is not a catrt engine folder (build one with `catrt build`)",
            field=MANIFEST_FILE,
        )
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise CorruptBundleError(f"{path} is not a valid catrt manifest: {error}", field=MANIFEST_FILE) from error


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest itself."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": file_digest(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every recorded file exists with its recorded size and sha256; raises naming the first bad one."""
    for name, record in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptBundleError(f"engine file {name} is missing from {folder}; rebuild the engine", field=name)
        if path.stat().st_size != record["size"] or file_digest(path) != record["sha256"]:
            raise CorruptBundleError(
                f"engine file {name} in {folder} does not match its manifest sha256 (corrupt or modified); "
                f"rebuild the engine",
                field=name,
            )


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a bundle depends on (absent packages are left out)."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device a bundle is built for: the GPU's name and compute capability via NVML, or the CPU."""
    if device.type != "cuda":
        return {"kind": "cpu"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    name, capability = _nvml_device(index) or (
        torch.cuda.get_device_name(index),
        "{}.{}".format(*torch.cuda.get_device_capability(index)),
    )
    return {"kind": "cuda", "name": name, "compute_capability": capability}


def _nvml_device(index: int) -> tuple[str, str] | None:
    """(name, "major.minor") from NVML, or None where nvidia-ml-py or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    except pynvml.NVMLError as error:
        logger.info("NVML unavailable (%s); asking torch for the GPU's name", error)
        return None
    return (name if isinstance(name, str) else name.decode()), f"{major}.{minor}"


def check_environment(manifest: Manifest, package: str | None, device: dict[str, Any], device_fields: tuple[str, ...]) -> None:
    """The catrt and backend versions and the device match the build's; raises naming the field."""
    installed = package_versions()
    for name in ("catrt", package):
        if name is None:
            continue
        expected, found = manifest.versions.get(name), installed.get(name)
        if expected != found:
            raise EngineMismatchError(
                f"engine built with {name} {expected} but {name} {found} is installed; rebuild the engine "
                f"or install {name}=={expected}",
                field=f"versions.{name}",
                value={"expected": expected, "found": found},
            )
    for name in device_fields:
        expected, found = manifest.device.get(name), device.get(name)
        if expected != found:
            raise EngineMismatchError(
                f"engine built for device {name} {expected!r} but this machine has {found!r}; rebuild it here",
                field=f"device.{name}",
                value={"expected": expected, "found": found},
            )


def transformer_config(module: nn.Module) -> dict[str, Any]:
    """A transformer's config as JSON data (what a weightless stand-in is built from, and compared)."""
    return json.loads(json.dumps({key: value for key, value in module.config.items() if not key.startswith("_")}, default=list))


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), independent of its device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
