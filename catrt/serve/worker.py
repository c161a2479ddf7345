"""One thread owns the device: a bounded FIFO of requests, batched by compatible settings.

Requests are `Job`s carrying a `concurrent.futures.Future` and a deadline; a job whose future is
cancelled while it waits (client gone, timeout), or whose deadline has passed when its batch is
made, is dropped before it runs. A call in flight whose jobs have all been given up (answered 504,
client gone) is abandoned before its next step. The head of the queue always runs next, with later
jobs of the same `BatchOptions` (size included: each size is its own build) added until that
build's batch is full, so no request waits behind jobs that arrived after it. A request that pins an
alpha has it in its options, so it batches only with requests pinning the same alpha; the alpha of
any other call is the policy's (`catrt.serve.alpha_policy.AlphaChooser`, one per build), asked with the
whole queue before the call is taken.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

from catrt.errors import (
    CatrtError,
    ConfigError,
    EngineRuntimeError,
    GenerationError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from catrt.scheduler import plan
from catrt.serve.alpha_policy import AlphaChooser, AlphaPolicy, Queued, StepTimeTracker, check_choice
from catrt.serve.errors import internal_error_message
from catrt.serve.hang import CallWatch
from catrt.serve.metrics import ServerMetrics, alpha_label
from catrt.serve.model import BatchOptions, Generation, Row, StepObserver, out_of_memory
from catrt.serve.timing import Abandoned

if TYPE_CHECKING:
    from catrt.serve.routing import Router

logger = logging.getLogger(__name__)

EXIT_JOIN_SECONDS = 5.0  # at interpreter exit: how long an idle worker's thread is given to end

WorkerState = Literal["loading", "ready", "draining", "stopped", "dead"]
WARMUP_PROMPT = "warm-up"


class DeviceFault(RuntimeError):
    """The served model's device fails any work since a call failed: the worker stops (see `Worker._check_device`)."""


@dataclass(frozen=True)
class JobResult:
    """A job's images (base64 PNG), the phases of the call that made them, its wait and batch, and the
    alpha the call ran at."""

    images: list[str]
    phases: dict[str, float]
    queue_wait: float
    batch_rows: int
    alpha: float


@dataclass
class Job:
    """One request: `rows` images sharing `options`, wanted by `deadline` (perf_counter seconds).

    Answered through `future`. `abandon` marks it given up by the route (timed out, client gone):
    it is dropped if still queued, and its call is stopped if no other job waits for it.
    """

    rows: list[Row]
    options: BatchOptions
    deadline: float = math.inf
    request_id: str = "-"
    arrived: float = field(default_factory=time.perf_counter)
    future: Future[JobResult] = field(default_factory=Future)
    abandoned: bool = False
    abandoned_at: float = math.inf  # perf_counter seconds

    def abandon(self) -> None:
        self.abandoned_at = min(self.abandoned_at, time.perf_counter())
        self.abandoned = True
        self.future.cancel()  # succeeds only while queued

    def given_up(self, now: float) -> bool:
        return self.abandoned or now >= self.deadline

    @property
    def given_up_at(self) -> float:
        """When the route gave it up or its deadline passed, whichever came first (perf_counter seconds)."""
        return min(self.deadline, self.abandoned_at)


class Worker:
    """Loads the served builds on its own thread, warms each up at each served alpha, then serves the
    queue until drained.

    `alpha_policy` and `latency_target`: how each call's alpha is chosen (see `AlphaChooser`). `hang_grace`: seconds a
    model call may go on after every one of its requests was given up (see `hang`).
    """

    def __init__(
        self,
        load: Callable[[], Router],
        max_queue: int,
        metrics: ServerMetrics,
        on_exit: Callable[[WorkerState], None],
        alpha_policy: AlphaPolicy = "fixed",
        latency_target: float | None = None,
        hang_grace: float = math.inf,
    ) -> None:
        self._load = load
        self.watch = CallWatch(hang_grace)
        self.alpha_policy = alpha_policy
        self.latency_target = latency_target
        self.choosers: dict[str, AlphaChooser] = {}  # per served size
        self.max_queue = max_queue
        self.metrics = metrics
        self._on_exit = on_exit
        self.state: WorkerState = "loading"
        self.served: Router | None = None
        self.error: BaseException | None = None
        self._queue: deque[Job] = deque()
        self._in_flight: list[Job] = []  # the call being served: answered 503 should the worker die under it
        self._lock = threading.Condition()
        self._batch_seconds = 1.0
        self._thread = threading.Thread(target=self._run, name="catrt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()
        _started.add(self)

    def stop_if_idle(self, timeout: float) -> None:
        """Drain, then join the thread, unless it is loading or in a model call: those may take minutes (or hang),
        and a process must be free to exit without them (the thread is a daemon for that). An idle worker left running
        met the interpreter's finalization still tearing down its thread, which has run torch: the process could
        abort at exit ("terminate called without an active exception")."""
        with self._lock:
            busy = bool(self._in_flight) or (self.served is None and self.state in ("loading", "draining"))
        if busy or not self.alive:
            return
        self.drain()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Requests waiting (cancelled ones excluded)."""
        with self._lock:
            self._drop_cancelled()
            return len(self._queue)

    def depth_by_size(self) -> dict[str, int]:
        """Requests waiting per served size ("WxH"; every size, 0 included), once the builds are loaded."""
        with self._lock:
            served = self.served
            if served is None:
                return {}
            self._drop_cancelled()
            depths = dict.fromkeys(served.sizes, 0)
            for job in self._queue:
                depths[served.for_options(job.options).spec.size] += 1
            return depths

    def hang(self) -> str | None:
        """Why the worker counts as hung (`CallWatch.hang`), else None. Only served calls are judged: loading and
        warm-up may compile graphs for minutes (a startup probe on /health/ready covers them)."""
        return self.watch.hang()

    def condition(self) -> tuple[str, str | None]:
        """The state the health routes report, and why where it is "hung" (`hang`, only while a call runs)."""
        reason = self.hang()
        return ("hung", reason) if reason is not None else (self.state, None)

    def liveness_fault(self) -> dict[str, str] | None:
        """The body of a 503 liveness answer, None while the worker can serve: it died, or it is hung (`hang`)."""
        status, reason = self.condition()
        if status == "hung":
            return {"status": status, "reason": reason}
        return {"status": "dead"} if status == "dead" else None

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise: 503 while not ready, 429 when `max_queue` requests already wait."""
        with self._lock:
            self._check_room()
            self._queue.append(job)
            self._lock.notify()

    def check_room(self) -> None:
        """Raise as `submit` would for a job submitted now: a request the queue cannot take is refused
        before its (costly) checks."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        if self.state != "ready":
            raise ServiceUnavailableError(f"the server is {self.state}; retry later")
        if self.hang() is not None:  # queued behind a stuck call, it could only wait out its deadline
            raise ServiceUnavailableError("the server's worker is stuck in a model call; retry later")
        self._drop_cancelled()
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(
                f"the request queue is full ({self.max_queue} waiting); retry later",
                retry_after=self._retry_after(),
            )

    def drain(self) -> None:
        """Stop taking requests, answer the queued ones 503; the call in flight finishes."""
        with self._lock:
            if self.state in ("loading", "ready"):
                self.state = "draining"
            self._fail_queued(ServiceUnavailableError("the server is shutting down"))
            self._lock.notify()

    def _retry_after(self) -> int:
        served = self.served
        batches = 1 + len(self._queue) / (served.max_batch if served else 1)
        return max(1, math.ceil(batches * self._batch_seconds))

    def _drop_cancelled(self) -> None:
        self._queue = deque(job for job in self._queue if not job.future.cancelled())

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _fail_in_flight(self, error: Exception) -> None:
        """Answer the jobs of the call the worker died under that have no answer yet: else each would wait out its
        deadline (a 504 a minute later, for a server that can no longer answer it)."""
        for job in self._in_flight:
            if not job.future.done():
                job.future.set_exception(error)
        self._in_flight = []

    def _run(self) -> None:
        try:
            if self._start_serving():
                while (batch := self._next_batch()) is not None:
                    self._run_batch(*batch)
                    self._in_flight = []
            self.state = "stopped"
        except BaseException as error:  # noqa: BLE001 - a dead worker must be reported, whatever killed it
            if self.served is None:
                # A failed load is reported once, as one line, by `run_server`'s caller; the traceback
                # is for -v, which logs INFO (a DEBUG record never showed).
                logger.info("loading the model failed", exc_info=error)
            else:
                logger.exception("the worker died")
            self.error = error
            with self._lock:
                self.state = "dead"
                stopped = ServiceUnavailableError("the server's worker has stopped; see the server log")
                self._fail_queued(stopped)
                self._fail_in_flight(stopped)
        finally:
            self._on_exit(self.state)

    def _start_serving(self) -> bool:
        """Load and warm up every build; False if a shutdown came first: the warm-up stops before its next
        step (no request waits for it, and a warm-up of many steps, alphas or builds must not hold a SIGTERM
        for minutes)."""
        router = self._load()
        try:
            self._warm_up(router)
        except Abandoned:
            if not self._shutting_down():
                raise
            logger.info("shutting down before the warm-up finished")
            return False
        return True

    def _shutting_down(self) -> bool:
        return self.state == "draining"

    def _warm_up(self, router: Router) -> None:
        seconds = []  # each warm-up call's time as a warm call takes it: the 429's Retry-After starts from the slowest
        choosers = {}
        for model in router.models.values():
            spec = model.spec
            check_choice(self.alpha_policy, spec.alphas, f"{spec.model} at {spec.size}")
            observe = partial(self.metrics.observe_step, size=spec.size)
            model.step_observer = recorded = _RecordedSteps(observe)
            kinds = plan(spec.steps, spec.t0, spec.refresh_every, spec.reuse_every)
            tracker = StepTimeTracker(kinds.count("full"), kinds.count("pruned"))
            choosers[spec.size] = AlphaChooser(self.alpha_policy, self.latency_target, spec.alphas, spec.batch, tracker)
            options = BatchOptions(guidance_scale=spec.default_guidance, negative_prompt=None, size=spec.size)
            rows = [Row(WARMUP_PROMPT, 0)] * spec.batch
            for alpha in spec.alphas:  # every alpha's buffers (compiled graphs, caches) made before serving
                started, recorded.steps = time.perf_counter(), []
                phases = model.generate(rows, options, self._shutting_down, alpha=alpha).phases
                took = time.perf_counter() - started
                logger.info("warm-up of %s at alpha %g took %.2f s", spec.size, alpha, took)
                seconds.append(_warm_seconds(took, phases, recorded.steps))
            if self.alpha_policy == "adaptive":  # then the step times, measured warm (a first call pays one-off costs)
                for alpha in spec.alphas:
                    tracker.observe(alpha, model.generate(rows, options, self._shutting_down, alpha=alpha).phases)
            model.step_observer = observe
        self._batch_seconds = max(seconds)
        self.choosers = choosers
        with self._lock:
            self.served = router
            if self.state == "loading":
                self.state = "ready"

    def _next_batch(self) -> tuple[list[Job], float] | None:
        """The head job plus compatible followers, marked running and in flight, and their alpha; None once draining
        and empty. In flight under the lock, as taken: `stop_if_idle` (the exit hook) must not see the worker idle
        between the two."""
        with self._lock:
            while True:
                self._drop_cancelled()
                if self._queue:
                    batch = self._take_batch()
                    self._in_flight = batch[0]
                    return batch
                if self.state != "ready":
                    return None
                self._lock.wait()

    def _take_batch(self) -> tuple[list[Job], float]:
        """Expired jobs are answered 504 and skipped here, so no step runs for a request past its deadline.

        The alpha is chosen from the queue as it stands, this call's jobs included."""
        now = time.perf_counter()
        for job in [job for job in self._queue if job.given_up(now)]:
            self._queue.remove(job)
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestTimeoutError("no answer within the server's timeout"))
            logger.info("request %s dropped before its batch: past its deadline", job.request_id)
        if not self._queue:
            return [], self.served.default.spec.alpha
        model = self.served.for_options(self._queue[0].options)
        head = self._queue[0]
        # The head's build decides; jobs queued for other sizes count as if they ran at its step times.
        try:
            alpha = self.choosers[model.spec.size].choose([
                Queued(now - job.arrived, len(job.rows), job.options, job.options.alpha) for job in self._queue
            ])
        except Exception:  # noqa: BLE001 - a policy fault must not stop the one worker: run at the pin or the default
            logger.exception("the alpha policy failed; this call runs at the pinned or default alpha")
            alpha = model.spec.alpha if head.options.alpha is None else head.options.alpha
        capacity = model.spec.batch
        jobs, rows = [], 0
        for job in list(self._queue):
            if job.options == head.options and rows + len(job.rows) <= capacity:
                self._queue.remove(job)
                if job.future.set_running_or_notify_cancel():
                    jobs.append(job)
                    rows += len(job.rows)
        return jobs, alpha

    def _run_batch(self, jobs: list[Job], alpha: float) -> None:
        if not jobs:
            return
        try:
            self._serve(jobs, alpha)
        except Abandoned as stop:
            logger.info("requests %s given up; call stopped (%s)", ",".join(job.request_id for job in jobs), stop)
            for job in jobs:
                job.future.set_exception(RequestTimeoutError("the request was given up"))
        except Exception as error:  # noqa: BLE001 - one bad call must not stop the server
            self._check_device(jobs, error)
            if len(jobs) == 1:
                logger.error("request %s: generation failed", jobs[0].request_id, exc_info=error)
                jobs[0].future.set_exception(_as_generation_error(error, jobs[0].request_id))
                return
            # Rerun the batch's requests one by one, so only the one that fails sees the error.
            logger.warning("a batch of %d requests failed (%s); rerunning them one by one", len(jobs), error)
            for job in jobs:
                self._run_batch([job], alpha)

    def _check_device(self, jobs: list[Job], error: Exception) -> None:
        """Raise `DeviceFault`, ending the worker, if the call's failure left its device unusable: CUDA's sticky errors
        (an illegal memory access, a device-side assert) fail every later call of the process, which answered each
        request 500 while its liveness probe said 200, so nothing restarted it. An error catrt explains or running out
        of memory is the request's or the load's, never the device's; but an engine that failed to run (TensorRT's
        failed enqueue, an `EngineRuntimeError`) may have failed on a faulted device, so that one is probed too."""
        explained = isinstance(error, CatrtError) and not isinstance(error, EngineRuntimeError)
        if explained or out_of_memory(error):
            return
        fault = self.served.for_options(jobs[0].options).device_fault()
        if fault is not None:
            raise DeviceFault(
                f"the device fails since request {jobs[0].request_id}'s call failed ({type(fault).__name__}: "
                f"{next(iter(str(fault).splitlines()), '')}); the worker stops so the process is restarted"
            ) from error

    def _serve(self, jobs: list[Job], alpha: float) -> None:
        started = time.perf_counter()
        rows = [row for job in jobs for row in job.rows]
        model = self.served.for_options(jobs[0].options)
        with self.watch.running(jobs):
            generation = model.generate(
                rows, jobs[0].options, lambda: all(job.given_up(time.perf_counter()) for job in jobs), alpha=alpha
            )
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
        self.choosers[model.spec.size].tracker.observe(alpha, generation.phases)
        self.metrics.images.labels(size=model.spec.size).inc(len(rows))
        self.metrics.batch_rows.labels(size=model.spec.size).observe(len(rows))
        self.metrics.alpha_chosen.labels(alpha=alpha_label(alpha)).inc()
        self._answer(jobs, generation, started, alpha)

    def _answer(self, jobs: list[Job], generation: Generation, started: float, alpha: float) -> None:
        offset = 0
        batch_rows = sum(len(job.rows) for job in jobs)
        for job in jobs:
            images = generation.images[offset : offset + len(job.rows)]
            offset += len(job.rows)
            job.future.set_result(JobResult(images, generation.phases, started - job.arrived, batch_rows, alpha))


class _RecordedSteps:
    """A step observer that passes each step on to `observe` and keeps the steps of the call in progress."""

    def __init__(self, observe: StepObserver) -> None:
        self.observe = observe
        self.steps: list[tuple[str, float]] = []

    def __call__(self, kind: str, seconds: float) -> None:
        self.steps.append((kind, seconds))
        self.observe(kind, seconds)


def _warm_seconds(took: float, phases: dict[str, float], steps: list[tuple[str, float]]) -> float:
    """A first call's time as a warm call would take it: the first step of each kind (full, pruned) compiles or
    captures its graphs, which can take a minute where a warm call takes a second, so each step of a kind counts
    at that kind's last step's time, plus the call's time outside the steps. `took` where no step was timed."""
    if not steps:
        return took
    last = dict(steps)  # each kind's last step
    outside = sum(seconds for phase, seconds in phases.items() if not phase.endswith("_steps"))
    return outside + sum(last[kind] for kind, _ in steps)


#: The catrt errors a model call raises about its request (a field it set, its deadline, the server's load): answered
#: as they are. Any other, a catrt error about the engine or bundle (a failed TensorRT enqueue, a closed engine)
#: included, is the server's fault: a 500 naming only the request id (its text may name the server's folders).
REQUEST_ERRORS = (ConfigError, RequestTimeoutError, ServiceUnavailableError, QueueFullError)


def _as_generation_error(error: Exception, request_id: str) -> Exception:
    """Errors about the request (`REQUEST_ERRORS`: a ConfigError naming a field) pass through; anything else is a
    500 that names the request id the log has, never the exception's text."""
    if isinstance(error, REQUEST_ERRORS):
        return error
    if out_of_memory(error):
        _release_cached_memory()
        return ServiceUnavailableError(
            f"the server ran out of memory for this request (request id {request_id}); try again shortly, or with fewer "
            f"images (n)"
        )
    return GenerationError(internal_error_message(request_id))


def _release_cached_memory() -> None:
    """Give back the blocks PyTorch's CUDA allocator keeps, so the next call has what this one freed."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_started: weakref.WeakSet[Worker] = weakref.WeakSet()  # the workers whose thread may still run


@atexit.register
def _stop_idle_workers() -> None:
    """atexit callbacks run before the interpreter finalizes, while a daemon thread can still end normally."""
    for worker in list(_started):
        worker.stop_if_idle(EXIT_JOIN_SECONDS)
