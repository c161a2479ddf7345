"""Is the worker hung? A model call still running well after every request of it was given up.

A call stops before its next denoising step once nobody waits for it (each request answered 504 at its deadline, or
its client gone), so one still running `grace` seconds after that is stuck in one step, its text encoding or its
decode: a hung device, a deadlock. The process would then answer every request 504 while its liveness probe said
200, and only a restart ends it. `CallWatch` is told which call runs (`running`) and says why it is hung (`hang`),
read from any thread.
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
        self._calling: Sequence[Job] = ()
        self._logged: Sequence[Job] | None = None  # the call whose hang was logged

    @contextlib.contextmanager
    def running(self, jobs: Sequence[Job]) -> Iterator[None]:
        """Around one model call for `jobs` (on the worker thread)."""
        self._calling = jobs
        try:
            yield
        finally:
            self._calling = ()

    def hang(self) -> str | None:
        """Why the call running now counts as hung, else None (no call, or one within its grace). Logged once per call,
        naming its requests."""
        calling = self._calling
        if not calling:
            return None
        past = time.perf_counter() - max(job.given_up_at for job in calling)
        if past <= self.grace:
            return None
        reason = (f"the worker is still in one model call {past:.1f} s after its last request was answered or given up, "
                  f"past --hang-grace {self.grace:g} s (a call stops before its next denoising step): a step or the "
                  f"device is stuck")
        if self._logged is not calling:
            self._logged = calling
            logger.error("requests %s: %s", ",".join(job.request_id for job in calling), reason)
        return reason
