"""The model replicas' states as the ingress's router last heard them (`catrt serve --ray`).

Each model replica reports its state to Serve's controller (`ModelReplica.record_routing_stats`), which hands them to
every router of a handle to the model deployment: in the ingress, catrt's `ReadyFirstRouter`. `/health/ready` reads
them here, the ingress's admission counts the replicas that can take requests here (`routable`), and the ingress
tells its router here which replica refused a request. Its own module because Ray sends
the router's class to each process by value (cloudpickle), with a copy of each module global its methods read: a
registry in `ray_app` was a different, empty one in the ingress. This module's functions are sent by reference, so
each process has one registry. Imports no Ray.
"""

from __future__ import annotations

import weakref
from typing import Any

# application name -> the latest ReadyFirstRouter Ray made in this process for its model deployment (the ingress's
# handle's; a router of a fleet deployed again in one process, as tests do, replaces the last one's)
_routers: dict[str, weakref.ref[Any]] = {}


def register(router: Any) -> None:
    """List `router` (a `ReadyFirstRouter` Ray has just made) for `replica_states` and `refused`."""
    _routers[router.app_name] = weakref.ref(router)


def _router(app_name: str) -> Any | None:
    listed = _routers.get(app_name)
    return None if listed is None else listed()


def refused(app_name: str, replica: str) -> None:
    """Tell this process's router for application `app_name` that `replica` refused a request before anything ran
    (`ReadyFirstRouter.refused_by`)."""
    router = _router(app_name)
    if router is not None:
        router.refused_by(replica)


def forget(router: Any) -> None:
    """Unlist `router` (its fleet is gone from this process)."""
    if _router(router.app_name) is router:
        del _routers[router.app_name]


def replica_states(app_name: str) -> dict[str, dict[str, Any]] | None:
    """Each model replica Ray Serve routes to now, by id, with the routing stats it last reported (`{}` before its
    first), as this process's router for application `app_name` holds them; None before that router exists."""
    router = _router(app_name)
    if router is None:
        return None
    replicas = list(router.curr_replicas.items())  # Ray replaces the mapping from its router's thread; read it once
    return {replica_id.unique_id: dict(replica.routing_stats) for replica_id, replica in replicas}


def routable(app_name: str) -> int | None:
    """How many model replicas can take requests now, as this process's router for application `app_name` last heard:
    those it routes to whose latest state is ready or not yet reported (just started); a hung or stopping one refuses
    requests. None until that router has heard which replicas run (`ReadyFirstRouter.listed`)."""
    router = _router(app_name)
    if router is None or not router.listed:
        return None
    replicas = list(router.curr_replicas.values())  # Ray replaces the mapping from its router's thread; read it once
    return sum(1 for replica in replicas if replica.routing_stats.get("status", "ready") == "ready")
