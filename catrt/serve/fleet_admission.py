"""How many requests the ingress of `catrt serve --ray` has in flight to the model replicas, and which it refuses.

The fleet's stated capacity is each live replica's --max-queue requests plus --max-queue waiting in the ingress for
a free replica; one more is a 429. Ray's own bound (`max_queued_requests` on the model deployment) counted every
request still being routed as waiting, and on a loaded machine its probes of the replicas' queue lengths lag, so a
burst well below capacity got 429s (about 2% of requests with 6 clients against 2 replicas of --max-queue 4). The
ingress counts instead: a request is in flight from its admission until its answer, timeout, failure or cancellation.
Imports no Ray.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from catrt.errors import QueueFullError


class FleetAdmission:
    """Admits a request while fewer than `capacity()` are in flight: (`replicas()` + 1) x `max_queue`, with
    `replicas()` the model replicas that can take requests now (the fleet grows and shrinks: replaced, autoscaled)."""

    def __init__(self, max_queue: int, replicas: Callable[[], int]) -> None:
        self.max_queue = max_queue
        self._replicas = replicas
        self._lock = threading.Lock()  # the ingress answers on one event loop; /metrics may read from another thread
        self.in_flight = 0

    def capacity(self) -> int:
        """Requests the fleet takes at once: --max-queue at each replica that can take requests, --max-queue more
        waiting for one of them."""
        return (self._replicas() + 1) * self.max_queue

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one place for the request's whole stay (every call to a replica it takes), given back however it ends;
        a QueueFullError (429, `Retry-After: 1`) where none is free."""
        with self._lock:
            if self.in_flight >= self.capacity():
                raise QueueFullError(
                    f"every model replica is busy and {self.max_queue} requests wait; retry later", retry_after=1
                )
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
