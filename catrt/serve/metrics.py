"""Prometheus metrics on the server's own registry (so tests and embedders never share globals).

GPU utilisation and memory come from NVML (nvidia-ml-py) and are exported only where a GPU exists;
on a CPU machine those series are absent, which is not an error. Only the GPUs this process may use
(`CUDA_VISIBLE_DEVICES`, as one server per GPU or a Ray replica with its GPUs is started) are exported, each
labelled with NVML's index, the number `nvidia-smi` shows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def alpha_label(alpha: float) -> str:
    """An alpha as its `catrt_alpha_chosen_total` label: the shortest text that reads back as that float, as the
    API's JSON writes it (`catrt.alpha`, the schema's alpha enum), and as a refused pin and the OpenAPI description
    name the served alphas. `:g` kept 6 digits, so two served alphas such as
    0.3 and 0.3000004 (distinct at float32) shared one series."""
    return repr(float(alpha))


class HttpMetrics:
    """The HTTP front's series: requests by route and status, and their latency. A Ray Serve ingress exports
    these and its replicas' model series (`ReplicaSnapshots`), never model series of its own, which would read 0."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "catrt_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "catrt_request_latency_seconds", "HTTP request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServerMetrics(HttpMetrics):
    """Every series the single server (and each Ray Serve model replica, in its own process) exports."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = Gauge("catrt_queue_depth", "requests waiting for the worker", registry=self.registry)
        self.images = Counter("catrt_images_generated", "images generated, by size", ["size"], registry=self.registry)
        self.batch_rows = Histogram(
            "catrt_batch_rows", "images per model call (before padding), by size", ["size"],
            buckets=(1, 2, 4, 8, 16, 32), registry=self.registry,
        )
        self.step_seconds = Histogram(
            "catrt_step_seconds", "transformer call time per denoising step, by kind (full, pruned) and size",
            ["kind", "size"], buckets=STEP_BUCKETS, registry=self.registry,
        )
        self.alpha_chosen = Counter(
            "catrt_alpha_chosen", "model calls by the alpha they ran at (pinned by a request or chosen by the policy)",
            ["alpha"], registry=self.registry,
        )
        self.cancelled = Counter(
            "catrt_requests_cancelled", "requests dropped before answering, by reason (disconnect, timeout)",
            ["reason"], registry=self.registry,
        )
        gpu = nvml_collector()
        if gpu is not None:
            self.registry.register(gpu)

    def watch_queue(self, depth: Callable[[], int], by_size: Callable[[], dict[str, int]] | None = None) -> None:
        """Read the queue depth, and per served size if `by_size` is given, at scrape time."""
        self.queue.set_function(depth)
        if by_size is not None:
            self.registry.register(QueueBySize(by_size))

    def observe_step(self, kind: str, seconds: float, size: str) -> None:
        self.step_seconds.labels(kind=kind, size=size).observe(seconds)


class ReplicaSnapshots(Collector):
    """Each Ray Serve model replica's series (its `ServerMetrics`: queue depth, images, batch rows, step seconds by
    kind, chosen alphas, cancellations, GPU) as the replica rendered them with its latest answer, under the single
    server's names with a `replica` label: the ingress cannot scrape the replicas, their answers bring them."""

    def __init__(self) -> None:
        self.latest: dict[str, str] = {}  # replica id -> its registry in the text format

    def update(self, replica: str, text: str) -> None:
        self.latest[replica] = text

    def forget(self, replica: str) -> None:
        """Leave a replica that is gone out of later scrapes."""
        self.latest.pop(replica, None)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica, text in list(self.latest.items()):
            try:  # parsed whole first: a replica's unreadable text never fails the ingress's scrape, nor half-merges
                families = list(text_string_to_metric_families(text))
            except ValueError as error:
                logger.warning("replica %s sent metrics that are not the text format (%s): its series are left out",
                               replica, error)
                continue
            for family in families:
                if not family.samples:  # a series the replica never set (its HTTP ones: replicas answer no HTTP)
                    continue
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        yield from merged.values()


class QueueBySize(Collector):
    """`catrt_queue_depth_by_size{size}`: requests waiting for each served size's build (several builds share one
    queue; `catrt_queue_depth` is its total)."""

    def __init__(self, by_size: Callable[[], dict[str, int]]) -> None:
        self.by_size = by_size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("catrt_queue_depth_by_size", "requests waiting for the worker, by size", labels=["size"])
        for size, depth in self.by_size().items():
            family.add_metric([size], depth)
        yield family


class NvmlCollector(Collector):
    """GPU utilisation (%) and memory (bytes) per device, read from NVML at scrape time.

    A reading NVML refuses (utilisation is "Not Supported" on a MIG instance; a GPU that fell off the
    bus is "GPU is lost") leaves that series out for that device: a scrape never fails on it, so
    the other series (requests, latency, queue) stay readable.
    """

    def __init__(self, pynvml: Any, count: int, devices: Sequence[int] | None = None) -> None:
        self.pynvml = pynvml
        self.devices = list(range(count)) if devices is None else list(devices)  # NVML indices to export
        self._refused: set[tuple[str, int]] = set()  # (reading, device) already logged

    def collect(self) -> Iterator[GaugeMetricFamily]:
        utilisation = GaugeMetricFamily("catrt_gpu_utilization_percent", "GPU utilisation", labels=["gpu"])
        used = GaugeMetricFamily("catrt_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("catrt_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        nvml = self.pynvml
        for index in self.devices:
            handle = self._read("handle", index, nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            rates = self._read("utilization", index, nvml.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                utilisation.add_metric([str(index)], rates.gpu)
            memory = self._read("memory", index, nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                used.add_metric([str(index)], memory.used)
                total.add_metric([str(index)], memory.total)
        yield from (family for family in (utilisation, used, total) if family.samples)

    def _read(self, reading: str, index: int, call: Callable[[Any], Any], argument: Any) -> Any:
        """`call(argument)`, or None (logged once per reading and device) where NVML refuses it."""
        try:
            return call(argument)
        except self.pynvml.NVMLError as error:
            if (reading, index) not in self._refused:
                self._refused.add((reading, index))
                logger.info("no GPU %s metric for GPU %d: NVML says %s", reading, index, error)
            return None


def nvml_collector() -> NvmlCollector | None:
    """A collector over the machine's GPUs, or None where nvidia-ml-py, the driver or a GPU is missing."""
    try:
        import pynvml
    except ImportError:
        logger.info("no GPU metrics: nvidia-ml-py is not installed")
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as error:
        logger.info("no GPU metrics: NVML unavailable (%s)", error)
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible_gpus(pynvml, count, visible)
    if count and not devices:
        logger.info("no GPU metrics: CUDA_VISIBLE_DEVICES=%r leaves this process no GPU", visible)
    return NvmlCollector(pynvml, count, devices) if devices else None


def visible_gpus(pynvml: Any, count: int, visible: str | None) -> list[int]:
    """NVML's indices of the GPUs `CUDA_VISIBLE_DEVICES` (`visible`) lets this process use, in its order: NVML numbers
    every GPU of the machine, so a server started on GPU 3 reported all eight. As CUDA reads the list: indices or
    `GPU-` UUIDs, up to the first entry naming no GPU (an empty list: none). Where an entry cannot be matched to one
    NVML GPU here (a MIG instance's `MIG-` UUID, a shortened UUID) every GPU is exported, as without the variable."""
    if visible is None:
        return list(range(count))
    devices: list[int] = []
    for entry in (part.strip() for part in visible.split(",")):
        if re.fullmatch(r"\d+", entry):
            index = int(entry)
        elif entry.startswith("GPU-"):
            try:
                index = pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(entry))
            except pynvml.NVMLError:
                return list(range(count))
        elif entry.startswith("MIG-"):
            return list(range(count))
        else:
            break
        if not 0 <= index < count or index in devices:
            break
        devices.append(index)
    return devices
