"""The serve worker's deadlines, in-process with a stand-in model (no torch work, no HTTP).

Deterministic versions of what the server tests can only provoke by timing: a request that is past
its deadline when its batch is made never reaches the model, and a call whose every request has
been given up stops before its next step.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from catrt.errors import GenerationError, QueueFullError, RequestTimeoutError, ServiceUnavailableError
from catrt.serve.app import ImageService
from catrt.serve.config import ServeConfig
from catrt.serve.errors import REQUEST_ID_KEY, catrt_error_response
from catrt.serve.metrics import ServerMetrics
from catrt.serve.model import BatchOptions, Generation, Row
from catrt.serve.routing import Router
from catrt.serve.schemas import ImageGenerationRequest
from catrt.serve.timing import Abandoned
from catrt.serve.worker import Job, Worker

STEPS = 20
# The bound of each wait on another thread: only a hang reaches it, as each wait ends once its condition holds.
WAIT = 60.0


@dataclass
class _Spec:
    batch: int = 2
    default_guidance: float = 4.0
    size: str = "8x8"
    width: int = 8
    height: int = 8
    model: str = "stand-in"
    alpha: float = 0.3
    alphas: tuple[float, ...] = (0.3,)
    steps: int = STEPS
    t0: int = 4
    refresh_every: int = 0
    reuse_every: int = 0


@dataclass
class StandIn:
    """Records the prompts of every call; a prompt "hold" waits for `release`; every call has STEPS steps."""

    spec: _Spec = field(default_factory=_Spec)
    calls: list[list[str]] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    step_observer: object = None
    broken_device: Exception | None = None  # what `device_fault` reports
    after_step: Callable[[int], None] | None = None  # called with each step's index once it ran

    def device_fault(self) -> Exception | None:
        return self.broken_device

    def generate(self, rows: Sequence[Row], options: BatchOptions,
                 should_stop: Callable[[], bool] | None = None, alpha: float | None = None) -> Generation:
        prompts = [row.prompt for row in rows]
        self.calls.append(prompts)
        if "hold" in prompts:
            self.holding.set()
            self.release.wait(WAIT)
        if "oom" in prompts:  # as torch.cuda.OutOfMemoryError words it
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "fault" in prompts:
            raise RuntimeError("a bug's secret text")
        for step in range(STEPS):
            if should_stop is not None and should_stop():
                self.steps_run.append(step)
                raise Abandoned(f"before step {step + 1}")
            time.sleep(0.005)
            if self.after_step is not None:
                self.after_step(step)
        self.steps_run.append(STEPS)
        return Generation([prompt for prompt in prompts], {"encode": 0.0, "full_steps": 0.0, "pruned_steps": 0.0,
                                                             "decode": 0.0})


@pytest.fixture()
def model() -> Iterator[StandIn]:
    yield StandIn()


def _started(worker: Worker) -> None:
    """Start `worker` and wait until its model is loaded; a state other than loading on the way fails."""
    worker.start()
    deadline = time.monotonic() + WAIT
    while worker.state != "ready":
        assert time.monotonic() < deadline and worker.state == "loading", worker.state
        time.sleep(0.01)


@pytest.fixture()
def worker(model: StandIn) -> Iterator[Worker]:
    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=lambda state: exited.set())
    _started(worker)
    model.calls.clear()
    model.steps_run.clear()
    yield worker
    model.release.set()
    worker.drain()
    assert exited.wait(WAIT)


def _job(prompt: str, deadline: float = float("inf"), guidance: float = 4.0) -> Job:
    return Job([Row(prompt, 0)], BatchOptions(guidance, None), deadline=deadline, request_id=prompt)


def _result(future: Future) -> object:
    return future.result(timeout=WAIT)


def test_a_job_past_its_deadline_when_its_batch_is_made_never_reaches_the_model(worker: Worker, model: StandIn) -> None:
    holder = _job("hold")
    worker.submit(holder)
    assert model.holding.wait(WAIT)
    late = _job("late", deadline=time.perf_counter() + 0.05, guidance=2.0)
    worker.submit(late)
    time.sleep(0.1)  # its deadline passes while it waits; nobody cancelled it
    model.release.set()
    _result(holder.future)
    with pytest.raises(RequestTimeoutError):
        _result(late.future)
    assert all("late" not in prompts for prompts in model.calls), model.calls


def test_a_call_whose_jobs_are_all_given_up_stops_before_its_next_step(worker: Worker, model: StandIn,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's deadline passes during its call's third step (the worker's clock is moved by hand: with a real one, a
    loaded machine could make the batch after the deadline, and the call never ran)."""
    import catrt.serve.worker as worker_module

    now = [time.perf_counter()]
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    expiring = _job("expiring", deadline=now[0] + 1)

    def expire(step: int) -> None:
        if step == 2:
            now[0] = expiring.deadline

    model.after_step = expire
    worker.submit(expiring)
    with pytest.raises(RequestTimeoutError):
        _result(expiring.future)
    assert model.steps_run == [3]
    after = _job("after")
    worker.submit(after)
    assert _result(after.future).images == ["after"]  # the worker goes on serving


def test_out_of_memory_answers_503_naming_it_other_faults_500_and_the_worker_serves_on(worker: Worker, model: StandIn) -> None:
    """Out of memory is the load, not the request: a 503 (with Retry-After, as every 503) saying so, where it was the
    500 of any fault; a batch it fails is rerun request by request, so the request batched with it is answered."""
    oom, fault, after = _job("oom"), _job("fault", guidance=2.0), _job("after")
    for job in (oom, fault, after):
        worker.submit(job)
    with pytest.raises(ServiceUnavailableError, match=r"^the server ran out of memory for this request \(request id oom\); "
                                                      r"try again shortly, or with fewer images \(n\)$"):
        _result(oom.future)
    with pytest.raises(GenerationError) as failed:
        _result(fault.future)
    assert "secret" not in str(failed.value) and "request id fault" in str(failed.value)
    assert _result(after.future).images == ["after"]
    assert catrt_error_response(ServiceUnavailableError("x")).headers["retry-after"] == "5"
    assert worker.state == "ready"


def test_a_call_runs_on_while_one_of_its_jobs_is_still_wanted(worker: Worker, model: StandIn) -> None:
    holder = _job("hold")
    worker.submit(holder)
    assert model.holding.wait(WAIT)
    given_up, wanted = _job("given-up"), _job("wanted")
    worker.submit(given_up)
    worker.submit(wanted)  # same options: one call for both (both are queued before the worker is released)
    model.release.set()
    _result(holder.future)
    while not given_up.future.running() and not given_up.future.done():
        time.sleep(0.001)
    given_up.abandon()  # the route gives it up while its call runs
    assert _result(wanted.future).images == ["wanted"]
    assert model.calls[-1] == ["given-up", "wanted"] and model.steps_run[-1] == STEPS


class _SlowChecks:
    """The request checks of one stand-in size: each takes `seconds`, as tokenizing a long prompt can."""

    def __init__(self, spec: _Spec, seconds: float) -> None:
        self.spec, self.seconds, self.admitted = spec, seconds, 0
        self.began = float("inf")  # when the last check began (perf_counter seconds)

    def admit(self, body: ImageGenerationRequest) -> tuple[list[Row], BatchOptions]:
        self.admitted += 1
        self.began = time.perf_counter()
        time.sleep(self.seconds)
        return [Row(body.prompt, 0)], BatchOptions(4.0, None)

    def spec_for(self, options: BatchOptions) -> _Spec:
        return self.spec


class _Request:
    scope = {REQUEST_ID_KEY: "request"}

    async def is_disconnected(self) -> bool:
        return False


def test_the_timeout_and_queue_wait_count_the_request_checks(worker: Worker, model: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's deadline runs from its arrival, not from the end of its checks (which wait on one thread)."""
    service = ImageService(worker, ServerMetrics(), ServeConfig(model="reference", timeout=WAIT))
    service._rules = checks = _SlowChecks(model.spec, seconds=0.3)
    submitted: list[Job] = []
    submit = worker.submit
    monkeypatch.setattr(worker, "submit", lambda job: submitted.append(job) or submit(job))
    started = time.perf_counter()
    response = asyncio.run(service.generate(ImageGenerationRequest(prompt="a red sun"), _Request()))
    assert checks.admitted == 1 and started <= submitted[0].arrived <= checks.began  # arrival: before its checks
    assert submitted[0].deadline == submitted[0].arrived + WAIT
    assert response is not None and response.catrt.timings.queue_wait >= 0.3


class _LeftRequest(_Request):
    """A request whose client has left."""

    async def is_disconnected(self) -> bool:
        return True


def test_a_client_that_left_during_its_checks_never_reaches_the_queue(worker: Worker, model: StandIn,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a flood, requests wait for the one admission thread, and their clients time out and leave meanwhile: each
    was queued all the same, taking a place a waiting client could have had, and started on an idle worker before the
    disconnect poll gave it up."""
    metrics = ServerMetrics()
    service = ImageService(worker, metrics, ServeConfig(model="reference", timeout=5))
    service._rules = checks = _SlowChecks(model.spec, seconds=0.05)
    submitted: list[Job] = []
    monkeypatch.setattr(worker, "submit", submitted.append)
    assert asyncio.run(service.generate(ImageGenerationRequest(prompt="a red sun"), _LeftRequest())) is None
    assert checks.admitted == 1 and submitted == [] and model.calls == []
    assert metrics.cancelled.labels(reason="disconnect")._value.get() == 1


def _answer_json(phases: dict[str, float]) -> dict:
    """The images answer for a call with `phases`, as the route serializes it (FastAPI, its response model)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from catrt.serve.app import _response
    from catrt.serve.schemas import ImageGenerationResponse
    from catrt.serve.worker import JobResult

    app = FastAPI()

    @app.get("/answer", response_model=ImageGenerationResponse)
    def answer() -> ImageGenerationResponse:
        return _response(JobResult(["png"], phases, 0.01, 1, 0.3), _Spec(), [7], time.perf_counter())

    with TestClient(app) as client:
        return client.get("/answer").json()


def test_answers_time_reused_steps_only_for_a_schedule_that_reuses() -> None:
    """README: the timings are `queue_wait`, `encode`, `full_steps`, `pruned_steps`, `decode`, `total`, plus
    `reused_steps` when the schedule has `reuse_every` (the model's phases then have it)."""
    phases = {"encode": 0.1, "full_steps": 0.2, "pruned_steps": 0.3, "decode": 0.05}
    plain = _answer_json(phases)["catrt"]["timings"]
    assert set(plain) == {"queue_wait", "encode", "full_steps", "pruned_steps", "decode", "total"}
    reusing = _answer_json({**phases, "reused_steps": 0.04})["catrt"]["timings"]
    assert reusing["reused_steps"] == 0.04 and set(reusing) == set(plain) | {"reused_steps"}


def test_an_adaptive_worker_serves_a_pin_that_only_a_later_queued_size_serves() -> None:
    """Two builds with other alphas (64x64: 0.3, 0.5; 96x64: 0.5, 0.2) and the adaptive policy: a 96x64
    request pinning 0.2 queued behind a 64x64 one killed the worker (KeyError in the policy); every later
    request was a 503."""
    square = StandIn(_Spec(size="64x64", alpha=0.3, alphas=(0.3, 0.5)))
    wide = StandIn(_Spec(size="96x64", alpha=0.5, alphas=(0.5, 0.2)))
    exited = threading.Event()
    worker = Worker(lambda: Router([square, wide]), max_queue=8, metrics=ServerMetrics(),
                    on_exit=lambda state: exited.set(), alpha_policy="adaptive", latency_target=60.0)
    try:
        _started(worker)
        holder = Job([Row("hold", 0)], BatchOptions(4.0, None, "64x64"), request_id="hold")
        worker.submit(holder)
        assert square.holding.wait(WAIT)
        queued = Job([Row("square", 0)], BatchOptions(4.0, None, "64x64"), request_id="square")
        pinned = Job([Row("wide", 0)], BatchOptions(4.0, None, "96x64", alpha=0.2), request_id="wide")
        worker.submit(queued)
        worker.submit(pinned)
        square.release.set()
        assert _result(queued.future).alpha == 0.5  # light load: the 64x64 build's best alpha
        assert _result(pinned.future).alpha == 0.2 and wide.calls[-1] == ["wide"]
        assert worker.state == "ready"
    finally:
        square.release.set()
        worker.drain()
        assert exited.wait(WAIT)


def test_a_failing_alpha_policy_runs_the_call_at_its_pin_or_the_default_and_the_worker_goes_on(
    worker: Worker, model: StandIn, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(queue: object) -> float:
        raise RuntimeError("policy bug")

    monkeypatch.setattr(worker.choosers["8x8"], "choose", broken)
    with caplog.at_level("ERROR", logger="catrt.serve.worker"):
        plain = _job("plain")
        worker.submit(plain)
        assert _result(plain.future).alpha == 0.3
        pinned = Job([Row("pinned", 0)], BatchOptions(4.0, None, alpha=0.5), request_id="pinned")
        worker.submit(pinned)
        assert _result(pinned.future).alpha == 0.5
    assert worker.state == "ready"
    assert "the alpha policy failed" in caplog.text and "policy bug" in caplog.text


@dataclass
class _SlowWarmUp(StandIn):
    """A warm-up call of up to 1000 steps of 10 ms (a big model's), asking `should_stop` before each."""

    warming: threading.Event = field(default_factory=threading.Event)

    def generate(self, rows: Sequence[Row], options: BatchOptions,
                 should_stop: Callable[[], bool] | None = None, alpha: float | None = None) -> Generation:
        self.warming.set()
        for step in range(1000):
            if should_stop is not None and should_stop():
                self.steps_run.append(step)
                raise Abandoned(f"before step {step + 1}")
            time.sleep(0.01)
        self.steps_run.append(1000)
        return Generation(["warm"] * len(rows), {"encode": 0.0, "full_steps": 0.0, "pruned_steps": 0.0, "decode": 0.0})


def test_a_shutdown_during_warm_up_stops_it_before_its_next_step() -> None:
    """SIGTERM while loading waited for the whole warm-up (every alpha of every build) before exiting 0."""
    model = _SlowWarmUp(_Spec(alphas=(0.3, 0.5)))
    exits: list[str] = []
    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(),
                    on_exit=lambda state: exits.append(state) or exited.set())
    worker.start()
    assert model.warming.wait(WAIT)
    worker.drain()
    assert exited.wait(WAIT) and exits == ["stopped"]
    assert len(model.steps_run) == 1 and model.steps_run[0] < 1000  # the first alpha's warm-up stopped, no second
    assert worker.served is None and worker.error is None


def test_a_second_signal_exits_at_once_sigterm_as_well_as_ctrl_c() -> None:
    """The first SIGTERM drains; a second one forced nothing (uvicorn forces only on a second SIGINT), so the
    server still waited for the call in flight."""
    import signal

    import uvicorn

    from catrt.serve.server import DrainingServer

    drained: list[str] = []

    class _Loop:
        def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
            drained.append("drain")

    for sig in (signal.SIGTERM, signal.SIGINT):
        server = DrainingServer(uvicorn.Config(app=None), worker=None, address="http://127.0.0.1:0")
        server._loop = _Loop()
        server.handle_exit(sig, None)
        assert drained and not server.force_exit and not server.should_exit  # the first: drain, keep serving
        server.handle_exit(sig, None)
        assert server.force_exit and server.should_exit
        drained.clear()


def test_liveness_and_readiness_turn_503_once_the_worker_died(worker: Worker, model: StandIn,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead worker answers every request 503; a liveness probe that stayed 200 would never restart it."""
    from fastapi.testclient import TestClient

    from catrt.serve.app import build_app

    client = TestClient(build_app(worker, ServerMetrics(), ServeConfig(model="reference")))
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200

    def fault(*args: object) -> None:
        raise MemoryError("a fault outside any one call")

    monkeypatch.setattr(worker, "_run_batch", fault)
    job = _job("a")
    worker.submit(job)
    deadline = time.monotonic() + WAIT
    while worker.state != "dead":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    live, ready = client.get("/health/live"), client.get("/health/ready")
    assert (live.status_code, live.json()) == (503, {"status": "dead"})
    assert (ready.status_code, ready.json()["status"]) == (503, "dead")


class _Fatal(BaseException):
    """A fault no `except Exception` takes (as SystemExit or KeyboardInterrupt): it ends the worker thread."""


def test_the_call_a_worker_dies_under_is_answered_503_at_once_as_the_queued_ones(worker: Worker, model: StandIn,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The queued requests of a dying worker were answered 503, but those of the call it died under waited out their
    deadline (`--timeout`, a minute by default) for a 504 from a server that could no longer answer them."""

    def fatal(*args: object, **kwargs: object) -> None:
        model.holding.set()
        model.release.wait(WAIT)
        raise _Fatal("escaped the call")

    monkeypatch.setattr(model, "generate", fatal)
    in_flight, queued = _job("in-flight"), _job("queued", guidance=2.0)
    worker.submit(in_flight)
    assert model.holding.wait(WAIT)
    worker.submit(queued)
    model.release.set()
    for job in (in_flight, queued):
        with pytest.raises(ServiceUnavailableError, match="^the server's worker has stopped; see the server log$"):
            job.future.result(timeout=WAIT)  # its deadline is never: only the worker answers it
    assert worker.state == "dead"


def test_a_failure_that_leaves_the_device_unusable_ends_the_worker_so_liveness_fails(worker: Worker, model: StandIn) -> None:
    """After one of CUDA's sticky errors every later call fails: the worker answered each request 500 and stayed live,
    so no liveness probe restarted the process. Now the device is probed after a failure and the worker stops."""
    oom = _job("oom")
    model.broken_device = RuntimeError("CUDA error: an illegal memory access was encountered")
    worker.submit(oom)
    with pytest.raises(ServiceUnavailableError, match="ran out of memory"):
        _result(oom.future)  # running out of memory is the load: the device is not even asked
    assert worker.state == "ready"
    fault, queued = _job("fault"), _job("queued", guidance=2.0)
    worker.submit(fault)
    worker.submit(queued)
    for job in (fault, queued):
        with pytest.raises(ServiceUnavailableError, match="^the server's worker has stopped; see the server log$"):
            _result(job.future)
    assert worker.state == "dead" and "illegal memory access" in str(worker.error)


def test_an_engine_that_failed_to_run_on_a_faulted_device_ends_the_worker(worker: Worker, model: StandIn,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT engine's failed enqueue (an EngineRuntimeError, a CatrtError) was taken as an error catrt explains
    and the device never asked, though a faulted device is what makes an enqueue fail; an error that is the request's
    (a ConfigError) still leaves the worker serving."""
    from catrt.errors import ConfigError, EngineRuntimeError

    model.broken_device = RuntimeError("CUDA error: an illegal memory access was encountered")
    raised: list[Exception] = [ConfigError("a request catrt cannot run"), EngineRuntimeError("TensorRT failed to enqueue")]

    def failing(*args: object, **kwargs: object) -> None:
        raise raised.pop(0)

    monkeypatch.setattr(model, "generate", failing)
    refused = _job("refused")
    worker.submit(refused)
    with pytest.raises(ConfigError):
        _result(refused.future)
    assert worker.state == "ready"
    engine = _job("engine")
    worker.submit(engine)
    with pytest.raises(ServiceUnavailableError, match="^the server's worker has stopped; see the server log$"):
        _result(engine.future)
    assert worker.state == "dead" and "illegal memory access" in str(worker.error)


@pytest.mark.parametrize("error", ["EngineRuntimeError", "CorruptBundleError", "EngineMismatchError"])
def test_an_engine_failure_in_a_call_is_a_500_without_its_text_and_the_worker_serves_on(
    worker: Worker, model: StandIn, monkeypatch: pytest.MonkeyPatch, error: str,
) -> None:
    """A catrt error about the engine, not the request (a TensorRT enqueue that failed on a healthy device, a closed
    engine), was passed to the client as a 400 `invalid_request_error` carrying the engine's text (its folder); it is
    the server's fault: a 500 naming only the request id, as any other failure inside a generation."""
    import catrt.errors

    raised = getattr(catrt.errors, error)("the engine of /srv/secret/engines failed to enqueue", field="engine")

    def failing(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(model, "generate", failing)
    engine = _job("engine")
    worker.submit(engine)
    with pytest.raises(GenerationError) as failed:
        _result(engine.future)
    assert "secret" not in str(failed.value) and "request id engine" in str(failed.value)
    assert catrt_error_response(failed.value).status_code == 500
    assert worker.state == "ready"


def test_the_device_probe_reports_a_failing_device_but_not_one_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from catrt.serve.model import ServedModel

    served = SimpleNamespace(device=torch.device("cuda", 0))
    for message, reported in (("CUDA error: device-side assert triggered", True), ("CUDA out of memory. Tried", False)):
        def failing(*args: object, **kwargs: object) -> None:
            raise RuntimeError(message)

        monkeypatch.setattr(torch, "ones", failing)
        fault = ServedModel.device_fault(served)
        assert (fault is not None and str(fault) == message) if reported else fault is None
    monkeypatch.undo()
    assert ServedModel.device_fault(SimpleNamespace(device=torch.device("cpu"))) is None


def test_request_metrics_take_no_label_from_what_a_client_sends(worker: Worker) -> None:
    """A process serving for weeks must not grow a series per path, model name, field or method a client makes up:
    routes are labelled by their template ("unmatched" for none), statuses by their code."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from catrt.serve.app import build_app

    metrics = ServerMetrics()
    app = build_app(worker, metrics, ServeConfig(model="reference"))
    client = TestClient(app)
    for index in range(20):
        client.get(f"/made/up/{index}")
        client.get(f"/v1/models/model-{index}")
        client.request(f"VERB{index}", "/v1/images/generations")
        client.post("/v1/images/generations", json={"prompt": "a red sun", f"field_{index}": index, "user": f"user-{index}"})
        client.post(f"/v1/images/generations?size={index}x{index}", content=b"{")
    samples = [sample for family in text_string_to_metric_families(metrics.render().decode())
               if family.name in ("catrt_requests", "catrt_request_latency_seconds") for sample in family.samples]
    templates = {route.path for route in app.routes} | {"unmatched"}
    assert {sample.labels["route"] for sample in samples} <= templates
    statuses = {sample.labels["status"] for sample in samples if "status" in sample.labels}
    assert statuses and all(status.isdigit() and len(status) == 3 for status in statuses)
    assert len({tuple(sorted(sample.labels.items())) for sample in samples if sample.name == "catrt_requests_total"}) < 10


def test_alpha_chosen_labels_are_the_alphas_as_the_api_writes_them() -> None:
    """`:g` labelled both 0.3 and 0.3000004 (two served alphas, distinct at float32) "0.3": one series for two."""
    from prometheus_client import generate_latest

    alphas = (0.3, 0.3000004, 1.0)
    model = StandIn(_Spec(alpha=0.3, alphas=alphas))
    metrics = ServerMetrics()
    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=metrics, on_exit=lambda state: exited.set())
    try:
        _started(worker)
        for alpha in alphas:
            job = Job([Row(f"at {alpha}", 0)], BatchOptions(4.0, None, alpha=alpha), request_id=str(alpha))
            worker.submit(job)
            assert _result(job.future).alpha == alpha
    finally:
        worker.drain()
        assert exited.wait(WAIT)
    text = generate_latest(metrics.registry).decode()
    for alpha in alphas:
        assert f'catrt_alpha_chosen_total{{alpha="{json.dumps(alpha)}"}} 1.0' in text, text


def test_a_refused_pin_names_the_served_alphas_as_the_api_writes_them() -> None:
    """`:g` named 0.3 and 0.3000004 (two served alphas) "0.3, 0.3", so a client could not tell which to pin."""
    from catrt.errors import ConfigError
    from catrt.serve.routing import RoutedRules

    model = StandIn(_Spec(alpha=0.3, alphas=(0.3, 0.3000004, 1.0)))
    model.build = None  # an eager model as RequestRules reads it, with the call it was started for
    model.call_arguments = {"height": 8, "width": 8, "num_inference_steps": STEPS}
    model.reader = SimpleNamespace(check=lambda name, text: None)  # any prompt fits
    rules = RoutedRules(Router([model]), 100)
    with pytest.raises(ConfigError, match=r"this server serves alpha 0\.3, 0\.3000004, 1\.0; ") as caught:
        rules.admit(ImageGenerationRequest(prompt="a red circle", alpha=0.5))
    assert caught.value.field == "alpha"


def test_admission_takes_each_bound_it_states_and_refuses_one_past_it() -> None:
    """`RequestRules.admit` at the ends of its ranges: n from 1 to the batch (image i seeded seed + i), a prompt of
    exactly the character limit, guidance_scale from 0 to 100, the largest seed whose batch fits torch's generator;
    one past each is a ConfigError naming the field. The server tests reach these ends only in part (not the seed of
    each image, nor the character limit at its end)."""
    import math
    import re

    from catrt.errors import ConfigError
    from catrt.request_values import MAX_SEED
    from catrt.serve.validation import RequestRules

    model = StandIn()  # batch 2, an eager model as RequestRules reads it, with the call it was started for
    model.build = None
    model.call_arguments = {"height": 8, "width": 8, "num_inference_steps": STEPS}
    model.reader = SimpleNamespace(check=lambda name, text: None)  # any prompt fits
    model.runner = SimpleNamespace(spec=SimpleNamespace(refuse_unread_negative_prompt=lambda text, name: None))
    rules = RequestRules(model, max_prompt_chars=12)

    def admit(**fields: object) -> tuple[list[tuple[str, int]], float]:
        rows, options = rules.admit(ImageGenerationRequest(**{"prompt": "a red circle", **fields}))
        return [(row.prompt, row.seed) for row in rows], options.guidance_scale

    assert admit(seed=5) == ([("a red circle", 5)], 4.0)  # n absent: one image; guidance absent: the model's default
    assert admit(n=2, seed=5)[0] == [("a red circle", 5), ("a red circle", 6)]
    assert admit(n=2, seed=MAX_SEED - 1)[0] == [("a red circle", MAX_SEED - 1), ("a red circle", MAX_SEED)]
    assert admit(seed=0, guidance_scale=100.0)[1] == 100.0 and admit(seed=0, guidance_scale=0.0)[1] == 0.0
    assert admit(prompt="x" * 12, seed=0, negative_prompt="y" * 12)[0] == [("x" * 12, 0)]
    for fields, name, needle in (
        ({"n": 3}, "n", "n=3 is not served: this server makes 1 to 2 images"),
        ({"n": 0}, "n", "n=0 is not served"),
        ({"prompt": "x" * 13}, "prompt", "prompt is 13 characters; this server takes at most 12"),
        ({"negative_prompt": "y" * 13}, "negative_prompt", "negative_prompt is 13 characters; this server takes at most 12"),
        ({"guidance_scale": math.nextafter(100.0, 101.0)}, "guidance_scale", "this server takes at most 100"),
        ({"guidance_scale": -0.0001}, "guidance_scale", "guidance_scale must be a finite number >= 0"),
        ({"n": 2, "seed": MAX_SEED}, "seed", f"seed must be an integer in [0, {MAX_SEED - 1}], got {MAX_SEED}"),
        ({"size": "16x8"}, "size", "size=16x8 is not served"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)) as caught:
            admit(**{"seed": 0, **fields})
        assert caught.value.field == name, fields


def test_a_failed_load_logs_its_traceback_at_the_level_catrt_v_shows(caplog: pytest.LogCaptureFixture) -> None:
    """`could not load the model: ... (run with -v for the traceback)`: -v logs INFO, and the traceback was a DEBUG
    record, so -v never showed it."""
    def load() -> Router:
        raise RuntimeError("boom while loading")

    exited = threading.Event()
    worker = Worker(load, max_queue=8, metrics=ServerMetrics(), on_exit=lambda state: exited.set())
    with caplog.at_level("INFO", logger="catrt.serve.worker"):
        worker.start()
        assert exited.wait(WAIT)
    assert worker.state == "dead" and isinstance(worker.error, RuntimeError)
    records = [record for record in caplog.records if record.exc_info is not None]
    assert [record.getMessage() for record in records] == ["loading the model failed"]
    assert "boom while loading" in caplog.text and "Traceback" in caplog.text


@dataclass
class _CompilesOnFirstCall(StandIn):
    """Steps timed on `clock`: 2 full then 4 pruned, 1 s each, but an alpha's first call spends 100 s in its first
    full and its first pruned step (compiling, capturing graphs); reported to `step_observer` as a served model does."""

    clock: list[float] = field(default_factory=lambda: [0.0])
    warmed: set[float] = field(default_factory=set)

    def generate(self, rows: Sequence[Row], options: BatchOptions,
                 should_stop: Callable[[], bool] | None = None, alpha: float | None = None) -> Generation:
        if "hold" in [row.prompt for row in rows]:
            self.holding.set()
            self.release.wait(WAIT)
        first = alpha not in self.warmed
        self.warmed.add(alpha)
        phases = {"encode": 0.0, "full_steps": 0.0, "pruned_steps": 0.0, "decode": 0.0}
        for index, kind in enumerate(["full"] * 2 + ["pruned"] * 4):
            seconds = 100.0 if first and index in (0, 2) else 1.0
            self.clock[0] += seconds
            phases[f"{kind}_steps"] += seconds
            if self.step_observer is not None:
                self.step_observer(kind, seconds)
        return Generation([row.prompt for row in rows], phases)


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_a_full_queue_right_after_start_up_asks_to_wait_for_warm_calls_not_the_first_ones(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 429's Retry-After started from the warm-up's slowest call, an alpha's first (a compile build's: a minute
    of compiling), so a burst right after start-up was told to wait minutes for calls of seconds."""
    import catrt.serve.worker as worker_module

    model = _CompilesOnFirstCall(_Spec(alphas=(0.3, 0.5)))
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(perf_counter=lambda: model.clock[0]))
    metrics = ServerMetrics()
    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=4, metrics=metrics, on_exit=lambda state: exited.set(),
                    alpha_policy=policy, latency_target=10.0 if policy == "adaptive" else None)
    _started(worker)
    try:
        worker.submit(_job("hold"))
        assert model.holding.wait(WAIT)
        for index in range(4):
            worker.submit(_job(f"queued {index}"))
        with pytest.raises(QueueFullError) as full:
            worker.check_room()
        assert full.value.retry_after == 18  # (the call in flight + 4 queued / batch 2) x a warm call's 6 s
        counted = {sample.labels["kind"]: sample.value for sample in metrics.step_seconds.collect()[0].samples
                   if sample.name.endswith("_count")}
        calls = 2 if policy == "fixed" else 4  # a call per alpha, and with adaptive one more each to time it
        assert counted == {"full": 2 * calls, "pruned": 4 * calls}  # the steps still reach the metrics
    finally:
        model.release.set()
        worker.drain()
        assert exited.wait(WAIT)


def test_a_device_probe_that_hangs_is_a_fault_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe waits for the device; on a hung one it waited forever, holding the worker (every request a 504, the
    liveness probe 200): now a probe still running after its time is a fault, and the worker stops."""
    import torch

    from catrt.serve.model import ServedModel

    release = threading.Event()
    zeros = torch.zeros

    def hanging(*args: object, **kwargs: object) -> torch.Tensor:
        release.wait(WAIT)
        return zeros(1)

    monkeypatch.setattr(torch, "ones", hanging)
    try:
        fault = ServedModel.device_fault(SimpleNamespace(device=torch.device("cuda", 0)), timeout=0.2)
    finally:
        release.set()
    assert isinstance(fault, TimeoutError) and str(fault) == "the device did not finish a tiny computation within 0.2 s"


def test_a_worker_stuck_in_a_call_its_requests_gave_up_is_hung_until_the_call_returns(
    model: StandIn, caplog: pytest.LogCaptureFixture,
) -> None:
    """A step that never returned kept /health/live at 200 (the worker thread was alive), so nothing restarted the
    process while every request waited out its deadline for a 504. A call still going `hang_grace` seconds after
    its last request was given up is hung (a healthy one stops before its next step): liveness and readiness answer
    503 naming why, a new request 503 at once; all turn back once the call returns."""
    from fastapi.testclient import TestClient

    from catrt.serve.app import build_app

    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=lambda state: exited.set(),
                    hang_grace=0.1)
    _started(worker)
    client = TestClient(build_app(worker, ServerMetrics(), ServeConfig(model="reference")))
    try:
        held = _job("hold")
        worker.submit(held)
        assert model.holding.wait(WAIT)
        time.sleep(0.3)  # past the grace, but its request still waits for it: busy, not hung
        assert worker.condition() == ("ready", None) and client.get("/health/live").status_code == 200
        held.abandon()  # its client left (or it was answered 504)
        deadline = time.monotonic() + WAIT
        while worker.hang() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with caplog.at_level("ERROR", logger="catrt.serve.hang"):
            live, ready = client.get("/health/live"), client.get("/health/ready")
        assert live.status_code == 503 and live.json()["status"] == "hung"
        reason = live.json()["reason"]
        assert re.fullmatch(r"the worker is still in one model call \d+\.\d s after its last request was answered or "
                            r"given up, past --hang-grace 0\.1 s \(a call stops before its next denoising step\): a step "
                            r"or the device is stuck", reason), reason
        assert ready.status_code == 503 and ready.json()["status"] == "hung" and ready.json()["sizes"] == ["8x8"]
        logged = [record.getMessage() for record in caplog.records]  # once per call, however often it is asked
        assert len(logged) == 1 and logged[0].startswith("requests hold: the worker is still in one model call"), logged
        with pytest.raises(ServiceUnavailableError, match="^the server's worker is stuck in a model call; retry later$"):
            worker.submit(_job("behind"))
        model.release.set()  # the step returns: the call stops before its next one
        with pytest.raises(RequestTimeoutError):
            _result(held.future)
        assert worker.condition() == ("ready", None)
        assert client.get("/health/live").json() == {"status": "live"} and client.get("/health/ready").status_code == 200
        after = _job("after")
        worker.submit(after)
        assert _result(after.future).images == ["after"]
    finally:
        model.release.set()
        worker.drain()
        assert exited.wait(WAIT)


def test_a_drain_does_not_wait_for_a_hung_call(model: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lets the call in flight finish; a hung one never does, so the server waited for it until a second
    signal (or Kubernetes' SIGKILL a grace period after the SIGTERM its failed liveness probe brought). A call still
    wanted is waited for; once it is hung the server exits without it."""
    import uvicorn

    import catrt.serve.server as server_module

    monkeypatch.setattr(server_module, "HANG_POLL_SECONDS", 0.01, raising=False)
    exited = threading.Event()
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=lambda state: exited.set(),
                    hang_grace=0.1)
    _started(worker)
    held = _job("hold")
    worker.submit(held)
    assert model.holding.wait(WAIT)

    async def drained() -> server_module.DrainingServer:
        server = server_module.DrainingServer(uvicorn.Config(app=None), worker, address="http://127.0.0.1:0")
        server._loop = asyncio.get_running_loop()
        server._drain()
        await asyncio.sleep(0.3)  # past the grace, but its request still waits for the call
        assert not server.should_exit and worker.state == "draining"
        held.abandon()
        deadline = time.monotonic() + WAIT
        while not server.should_exit:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        return server

    try:
        asyncio.run(drained())
        assert worker.alive  # the hung call is left to the process's exit
    finally:
        model.release.set()
    assert exited.wait(WAIT)



class _Clock:
    """perf_counter for `catrt.serve.hang`, moved by hand: the verdicts below depend on no scheduler's timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    import catrt.serve.hang as hang_module

    clock = _Clock()
    monkeypatch.setattr(hang_module, "time", clock)
    return clock


def test_a_call_made_for_requests_given_up_long_ago_gets_its_grace_from_its_start(clock: _Clock) -> None:
    """A failed batch is rerun one request at a time, each rerun a fresh call that encodes its prompt before its first
    step sees nobody waits: the grace counted from its request's giving up (maybe minutes before, while the batch ran
    for another request) made that healthy call "hung" at once, failing liveness. It counts from the call's start."""
    from catrt.serve.hang import CallWatch

    watch = CallWatch(grace=5)
    left = _job("left")
    left.abandoned_at = clock.now - 100  # gave up while the failed batch ran
    with watch.running([left]):
        assert watch.hang() is None
        clock.now += 5
        assert watch.hang() is None
        clock.now += 0.1
        assert watch.hang() is not None  # past its grace from its start: hung
    assert watch.hang() is None


def test_a_batched_call_is_not_hung_while_one_of_its_requests_still_waits(clock: _Clock) -> None:
    """Two requests in one call, one given up long ago: the call is busy for the other, not hung, and its grace starts
    once that one too is given up (here its deadline)."""
    from catrt.serve.hang import CallWatch

    watch = CallWatch(grace=5)
    left, waiting = _job("left"), _job("waiting", deadline=clock.now + 100)
    left.abandoned_at = clock.now - 100
    with watch.running([left, waiting]):
        clock.now += 100
        assert watch.hang() is None  # past the grace from its start and from `left`, but `waiting` waited until now
        clock.now += 5
        assert watch.hang() is None
        clock.now += 0.1
        assert watch.hang() is not None


def test_an_idle_worker_is_stopped_and_its_thread_joined_before_the_interpreter_finalizes(model: StandIn) -> None:
    """A drained worker's daemon thread still ran when the interpreter finalized (a replica drained, then exited): the
    process could abort at exit ("terminate called without an active exception"). The exit hook ends it first."""
    from catrt.serve import worker as worker_module

    exits: list[str] = []
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=exits.append)
    _started(worker)
    worker_module._stop_idle_workers()
    assert not worker.alive and exits == ["stopped"]


def test_the_exit_hook_leaves_a_worker_in_a_call_or_loading_running(model: StandIn) -> None:
    """A call may take minutes or hang, and a load cannot be stopped: the process must stay free to exit without
    them, so the hook neither drains nor waits for such a worker."""
    from catrt.serve import worker as worker_module

    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=lambda state: None)
    _started(worker)
    held = _job("hold")
    worker.submit(held)
    assert model.holding.wait(WAIT)
    worker_module._stop_idle_workers()
    assert worker.alive and worker.state == "ready"
    model.release.set()
    assert _result(held.future).images == ["hold"]
    worker.drain()
    worker.join(WAIT)
    assert not worker.alive

    loading = threading.Event()
    slow = Worker(lambda: loading.wait(WAIT) and Router([model]), max_queue=8, metrics=ServerMetrics(),
                  on_exit=lambda state: None)
    slow.start()
    worker_module._stop_idle_workers()
    assert slow.alive and slow.state == "loading"
    loading.set()
    slow.drain()
    slow.join(WAIT)
    assert not slow.alive


def test_a_worker_ending_after_its_server_stopped_reports_to_no_closed_loop() -> None:
    """At exit catrt ends an idle worker whose server had already stopped (its event loop closed): reporting the
    exit there raised "Event loop is closed" on the worker thread, a traceback as the process exited."""
    import uvicorn

    from catrt.serve.server import DrainingServer

    server = DrainingServer(uvicorn.Config(app=None), worker=SimpleNamespace(served=object()),
                            address="http://127.0.0.1:0")
    server._loop = asyncio.new_event_loop()
    server._loop.close()
    server.worker_exited("stopped")
    assert not server.should_exit


def test_a_worker_ending_while_its_servers_loop_closes_reports_to_no_closed_loop() -> None:
    """The worker (a call that returned after the server exited without it, hung) ends while `asyncio.run` closes the
    server's loop: asked whether the loop was closed, it was not yet, and reporting the exit a moment later raised
    "Event loop is closed" on the worker thread. The loop here closes between the two."""
    import uvicorn

    from catrt.serve.server import DrainingServer

    class Closing(asyncio.SelectorEventLoop):
        """Closed, but open to `is_closed` while `seen_open`: what the worker thread saw just before the main thread
        closed the loop."""

        seen_open = True

        def is_closed(self) -> bool:
            return not self.seen_open and super().is_closed()

    server = DrainingServer(uvicorn.Config(app=None), worker=SimpleNamespace(served=object()),
                            address="http://127.0.0.1:0")
    server._loop = loop = Closing()
    loop.close()
    try:
        server.worker_exited("stopped")
    finally:
        loop.seen_open = False
    assert not server.should_exit


def test_the_exit_hook_sees_a_batch_taken_but_not_yet_started_as_a_call(model: StandIn,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker took its batch under the lock but marked it in flight only after, so the exit hook, asking in
    between, took a worker about to run a call for an idle one: it drained it and waited for the call."""
    exits: list[str] = []
    worker = Worker(lambda: Router([model]), max_queue=8, metrics=ServerMetrics(), on_exit=exits.append)
    taken, asked = threading.Event(), threading.Event()
    take = worker._next_batch

    def take_then_pause() -> tuple[list[Job], float] | None:
        batch = take()
        if batch is not None:
            taken.set()
            assert asked.wait(WAIT)  # the hook asks here, between the taking and the call
        return batch

    monkeypatch.setattr(worker, "_next_batch", take_then_pause)
    _started(worker)
    job = _job("a")
    worker.submit(job)
    assert taken.wait(WAIT)
    worker.stop_if_idle(0.1)
    asked.set()
    assert worker.state == "ready"  # left running, not drained
    assert _result(job.future).images == ["a"]
    worker.drain()
    worker.join(WAIT)
    assert not worker.alive and exits == ["stopped"]
