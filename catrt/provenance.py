"""Provenance: what a build records of where it was made, and how this machine differs from that record.

A bundle's manifest (`catrt.manifest`) holds the transformer's config and a digest of its weights, the versions of
the packages it depends on and the device it was built for; at load, `environment_problems` names each version
or device field this machine does not match, before any backend runs.

torch is imported inside the two functions that read a device or a module, not at module level: `catrt.manifest`
re-exports these names, and a tool that only reads, signs or checks a manifest (`catrt.signing`) must not pay for torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from typing import TYPE_CHECKING, Any

from catrt import __version__
from catrt.errors import CatrtError, EngineMismatchError, echo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from catrt.manifest import Manifest

logger = logging.getLogger(__name__)

VERSIONED_PACKAGES: tuple[str, ...] = ("catrt", "torch", "diffusers", "onnx", "onnxruntime", "tensorrt")
# Other distributions that install a package's module under the same import name: onnxruntime's GPU build is the
# `onnxruntime-gpu` distribution, and TensorRT's wheels for one CUDA major (`pip install tensorrt-cu12`) have no
# `tensorrt` distribution at all. Recorded under the import name, so a bundle built with one loads with the other.
_OTHER_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime-gpu",),
    "tensorrt": ("tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a bundle depends on (absent packages are left out).

    catrt's own is the running code's `__version__`, not its install metadata: run from a checkout on PYTHONPATH (as
    on the lent GPU machine) catrt has none, so a build recorded no catrt version and an installed catrt of the same
    version refused the bundle."""
    versions = {"catrt": __version__}
    for package in VERSIONED_PACKAGES:
        if package == "catrt":
            continue
        for distribution in (package, *_OTHER_DISTRIBUTIONS.get(package, ())):
            try:
                versions[package] = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
            break
    return versions


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device a bundle is built for: a CUDA GPU's name and compute capability via NVML, or the device's kind (cpu;
    mps, Apple's GPU, was recorded as cpu, so a bundle said it ran where it did not)."""
    if device.type != "cuda":
        return {"kind": device.type}
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    name, capability = _nvml_device(index, None if uuid is None else str(uuid)) or (
        torch.cuda.get_device_name(index),
        "{}.{}".format(*torch.cuda.get_device_capability(index)),
    )
    return {"kind": "cuda", "name": name, "compute_capability": capability}


def _nvml_device(index: int, uuid: str | None) -> tuple[str, str] | None:
    """(name, "major.minor") from NVML of the GPU torch numbers `index`, or None where nvidia-ml-py or the driver is
    missing. Found by torch's UUID of it: NVML numbers every GPU of the machine in PCI order, torch the visible ones
    (CUDA_VISIBLE_DEVICES=1: torch's GPU 0 is NVML's 1), so NVML's GPU `index` may be another model. By index where
    NVML knows no GPU of that UUID (a MIG instance's), as before."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle_by_uuid(pynvml, uuid)
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    except pynvml.NVMLError as error:
        logger.info("NVML unavailable (%s); asking torch for the GPU's name", error)
        return None
    return (name if isinstance(name, str) else name.decode()), f"{major}.{minor}"


def _nvml_handle_by_uuid(pynvml: Any, uuid: str | None) -> Any:
    """NVML's handle of the GPU of `uuid` as torch writes it (hex groups; NVML's own are "GPU-" and the same), or None."""
    if not uuid:
        return None
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except pynvml.NVMLError:
        return None


def environment_problems(
    manifest: Manifest, package: str | None, device: dict[str, Any], device_fields: tuple[str, ...]
) -> list[CatrtError]:
    """Each way the catrt and backend versions and the device differ from the build's, naming the field."""
    problems: list[CatrtError] = []
    installed = package_versions()
    for name in ("catrt", package):
        if name is None:
            continue
        expected, found = manifest.versions.get(name), installed.get(name)
        if expected != found:
            problems.append(EngineMismatchError(
                f"engine built with {name} {expected} but {name} {found} is installed; rebuild the engine "
                f"or install {name}=={expected}",
                field=f"versions.{name}",
                value={"expected": expected, "found": found},
            ))
    for name in device_fields:
        expected, found = manifest.device.get(name), device.get(name)
        if expected != found:
            problems.append(EngineMismatchError(
                f"engine built for device {name} {echo(expected)} but this machine has {echo(found)}; rebuild it here",
                field=f"device.{name}",
                value={"expected": expected, "found": found},
            ))
    return problems


def transformer_config(module: nn.Module) -> dict[str, Any]:
    """A transformer's config as JSON data (what a weightless stand-in is built from, and compared)."""
    return json.loads(json.dumps({key: value for key, value in module.config.items() if not key.startswith("_")}, default=list))


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), independent of its device."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
