"""What a build records of its GPU (`describe_device`), with a stand-in `pynvml` and torch's CUDA calls stood in:
this machine has no GPU."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pynvml
import pytest
import torch

from catrt.provenance import describe_device

# NVML numbers every GPU of the machine (PCI order); their names, capabilities and UUIDs.
MACHINE = [("NVIDIA A100-SXM4-80GB", (8, 0), "GPU-aaaaaaaa-0000-0000-0000-000000000000"),
           ("NVIDIA GeForce RTX 4090", (8, 9), "GPU-bbbbbbbb-0000-0000-0000-000000000000")]


class FakeNvml:
    NVMLError = pynvml.NVMLError

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index, (_, _, known) in enumerate(MACHINE):
            if known == uuid:
                return index
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return MACHINE[handle][0]

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return MACHINE[handle][1]


def visible(monkeypatch: pytest.MonkeyPatch, uuids: list[str]) -> None:
    """torch sees the GPUs of `uuids` (torch's spelling: no "GPU-"), as under CUDA_VISIBLE_DEVICES."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=uuids[index]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: pytest.fail("NVML knows this GPU"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_the_gpu_recorded_is_torchs_under_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """CUDA_VISIBLE_DEVICES=1: torch's GPU 0 is the RTX 4090, NVML's GPU 0 the A100; the build recorded the A100's
    name and compute capability 8.0, so its engine passed the device check on an A100 it was not built for."""
    visible(monkeypatch, ["bbbbbbbb-0000-0000-0000-000000000000"])
    assert describe_device(torch.device(device)) == {
        "kind": "cuda", "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}


def test_a_gpu_nvml_finds_no_uuid_of_is_read_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MIG instance's UUID is none of NVML's GPUs': its GPU is NVML's of torch's index, as before."""
    visible(monkeypatch, ["cccccccc-0000-0000-0000-000000000000", "dddddddd-0000-0000-0000-000000000000"])
    assert describe_device(torch.device("cuda:1")) == {
        "kind": "cuda", "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}


def test_a_cpu_records_the_cpu_without_asking_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked CUDA"))
    assert describe_device(torch.device("cpu")) == {"kind": "cpu"}


def test_apples_gpu_is_recorded_as_mps_not_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`describe_device` wrote {"kind": "cpu"} for every device but CUDA: a bundle made on MPS said it was made on the
    CPU, and a CPU machine's load check passed it (no Mac here: torch names the device without having one)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked CUDA"))
    assert describe_device(torch.device("mps")) == {"kind": "mps"}
    assert describe_device(torch.device("mps:0")) == {"kind": "mps"}
