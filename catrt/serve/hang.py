"""Is the worker hung? A model call still running well after every request of it was given up.

A call stops before its next denoising step once nobody waits for it (each request answered 504 at its deadline, or
its client gone), so one still running `grace` seconds after that is stuck in one step, its text encoding or its
decode: a hung device, a deadlock. The process would then answer every request 504 while its liveness probe said
200, and only a restart ends it. `CallWatch` is told which call runs (`running`) and says why it is hung (`hang`),
read from any thread. The grace counts from the later of the call's start and its last job given up: a call made for
jobs already given up (a failed batch rerun one request at a time) has its text encoding to run before its first step
looks, and is no more hung for it than a fresh call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catrt.serve.worker import Job

logger = logging.getLogger(__name__)


class CallWatch:
    """The jobs of the model call running now, and `grace`: seconds it may go on after its last job was given up."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._calling: tuple[Sequence[Job], float] = ((), 0.0)  # the call's jobs and its start, swapped as one
        self._logged: Sequence[Job] | None = None  # the call whose hang was logged

    @contextlib.contextmanager
    def running(self, jobs: Sequence[Job]) -> Iterator[None]:
        """Around one model call for `jobs` (on the worker thread)."""
        self._calling = (jobs, time.perf_counter())
        try:
            yield
        finally:
            self._calling = ((), 0.0)

    def hang(self) -> str | None:
        """Why the call running now counts as hung, else None (no call, or one within its grace). Logged once per call,
        naming its requests."""
        calling, started = self._calling
        if not calling:
            return None
        past = time.perf_counter() - max(started, *(job.given_up_at for job in calling))
        if past <= self.grace:
            return None
        reason = (f"the worker is still in one model call {past:.1f} s after its last request was answered or given up, "
                  f"past --hang-grace {self.grace:g} s (a call stops before its next denoising step): a step or the "
                  f"device is stuck")
        if self._logged is not calling:
            self._logged = calling
            logger.error("requests %s: %s", ",".join(job.request_id for job in calling), reason)
        return reason
