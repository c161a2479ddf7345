"""GPU series of `/metrics` (NVML), with a stand-in `pynvml` module: this machine has no GPU.

The stand-in answers as NVML does on a MIG instance (utilisation "Not Supported") and for a GPU that
fell off the bus ("GPU is lost"); a scrape must still answer with every other series.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from catrt.serve.metrics import HttpMetrics, NvmlCollector, ReplicaSnapshots, ServerMetrics, nvml_collector

GIB = 1 << 30


class FakeNvml:
    """GPU i: `refuse[i]` names the readings NVML refuses for it ("handle", "utilization", "memory")."""

    NVMLError = pynvml.NVMLError

    def __init__(self, refuse: dict[int, set[str]], count: int = 2, init_error: int | None = None) -> None:
        self.refuse, self.count, self.init_error = refuse, count, init_error

    def _check(self, index: int, reading: str) -> None:
        if reading in self.refuse.get(index, set()):
            code = pynvml.NVML_ERROR_GPU_IS_LOST if reading == "handle" else pynvml.NVML_ERROR_NOT_SUPPORTED
            raise pynvml.NVMLError(code)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check(index, "handle")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index in range(self.count):
            if uuid == f"GPU-{index:04d}":
                return index
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self._check(handle, "utilization")
        return SimpleNamespace(gpu=40 + handle, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self._check(handle, "memory")
        return SimpleNamespace(used=(handle + 1) * GIB, total=80 * GIB, free=0)


def _scrape(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, visible: str | None = None) -> dict[str, dict[str, float]]:
    """{series: {gpu label: value}} of the GPU series in a rendered scrape of a fresh ServerMetrics, started with
    CUDA_VISIBLE_DEVICES = `visible` (None: unset)."""
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    text = ServerMetrics().render().decode()
    assert "catrt_queue_depth" in text  # the server's own series are all there
    series: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("catrt_gpu_"):
                series.setdefault(sample.name, {})[sample.labels["gpu"]] = sample.value
    return series


def test_gpu_series_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _scrape(FakeNvml({}), monkeypatch) == {
        "catrt_gpu_utilization_percent": {"0": 40.0, "1": 41.0},
        "catrt_gpu_memory_used_bytes": {"0": 1.0 * GIB, "1": 2.0 * GIB},
        "catrt_gpu_memory_total_bytes": {"0": 80.0 * GIB, "1": 80.0 * GIB},
    }


@pytest.mark.parametrize(("visible", "gpus"), [
    ("1", ["1"]),
    ("1,0", ["0", "1"]),
    (" 2 , 0", ["0", "2"]),
    ("GPU-0002", ["2"]),
    ("GPU-0001,0", ["0", "1"]),
    ("0,7,1", ["0"]),  # as CUDA reads it: the list ends at the first entry that names no GPU
    ("0,0,1", ["0"]),
    ("-1", []),
    ("", []),
    ("MIG-4f2e", ["0", "1", "2"]),  # a MIG instance's UUID is not one NVML GPU: every GPU, as without the variable
    ("GPU-not-here", ["0", "1", "2"]),
], ids=["index", "two", "spaces", "uuid", "uuid-and-index", "stops-at-unknown-index", "stops-at-repeat", "negative",
        "empty", "mig", "unknown-uuid"])
def test_gpu_series_cover_the_gpus_cuda_visible_devices_leaves_this_process(
    monkeypatch: pytest.MonkeyPatch, visible: str, gpus: list[str]
) -> None:
    """One server per GPU (CUDA_VISIBLE_DEVICES=3) or a Ray replica given its GPUs exports those, labelled with NVML's
    (nvidia-smi's) index: it exported every GPU of the machine, each server the same eight."""
    series = _scrape(FakeNvml({}, count=3), monkeypatch, visible)
    assert sorted(series.get("catrt_gpu_memory_total_bytes", {})) == gpus
    if gpus:
        assert series["catrt_gpu_memory_used_bytes"] == {gpu: (int(gpu) + 1) * GIB for gpu in gpus}


def test_a_reading_nvml_refuses_leaves_out_that_series_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MIG instance has no utilisation; a lost GPU no handle: the scrape answers with the rest."""
    assert _scrape(FakeNvml({0: {"utilization"}, 1: {"handle"}}), monkeypatch) == {
        "catrt_gpu_memory_used_bytes": {"0": 1.0 * GIB},
        "catrt_gpu_memory_total_bytes": {"0": 80.0 * GIB},
    }
    assert _scrape(FakeNvml({0: {"memory"}, 1: {"memory"}}), monkeypatch) == {
        "catrt_gpu_utilization_percent": {"0": 40.0, "1": 41.0},
    }


def test_no_gpu_series_without_nvml_or_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _scrape(FakeNvml({}, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), monkeypatch) == {}
    assert _scrape(FakeNvml({}, count=0), monkeypatch) == {}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert nvml_collector() is None


def test_a_refused_reading_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    collector = NvmlCollector(FakeNvml({0: {"utilization"}}, count=1), 1)
    with caplog.at_level("INFO", logger="catrt.serve.metrics"):
        for _ in range(3):
            list(collector.collect())
    assert [record.getMessage() for record in caplog.records] == [
        "no GPU utilization metric for GPU 0: NVML says Not Supported"
    ]


def test_a_replica_whose_metrics_text_is_unreadable_leaves_out_its_series_only(caplog: pytest.LogCaptureFixture) -> None:
    """The ingress's /metrics merges each replica's text (`ReplicaSnapshots`): one replica's unreadable text failed
    the whole scrape; now that replica's series are left out (logged) and every other series is exported."""
    metrics, snapshots = HttpMetrics(), ReplicaSnapshots()
    metrics.registry.register(snapshots)
    good = ServerMetrics()
    good.queue.set(3)
    snapshots.update("good", good.render().decode())
    snapshots.update("bad", "# TYPE catrt_queue_depth gauge\ncatrt_queue_depth not-a-number\n")
    with caplog.at_level("WARNING", logger="catrt.serve.metrics"):
        text = metrics.render().decode()
    depths = {sample.labels["replica"]: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == "catrt_queue_depth"}
    assert depths == {"good": 3.0}
    assert "replica bad sent metrics that are not the text format" in caplog.text
