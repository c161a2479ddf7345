"""The model replicas' states as the ingress's router last heard them (`catrt serve --ray`).

Each model replica reports its state to Serve's controller (`ModelReplica.record_routing_stats`), which hands them to
every router of a handle to the model deployment: in the ingress, catrt's `ReadyFirstRouter`. `/health/ready` reads
them here, and the ingress tells its router here which replica refused a request. Its own module because Ray sends the router's class to each process by value (cloudpickle), with a copy of
each module global its methods read: a registry in `ray_app` was a different, empty one in the ingress. This module's
functions are sent by reference, so each process has one registry. Imports no Ray.
"""

from __future__ import annotations

import weakref
from typing import Any

_routers: weakref.WeakSet[Any] = weakref.WeakSet()  # this process's ReadyFirstRouters (the ingress's handle's)


def register(router: Any) -> None:
    """List `router` (a `ReadyFirstRouter` Ray has just made) for `replica_states`."""
    _routers.add(router)


def refused(app_name: str, replica: str) -> None:
    """Tell this process's router for application `app_name` that `replica` refused a request before anything ran
    (`ReadyFirstRouter.refused_by`)."""
    for router in list(_routers):
        if router.app_name == app_name:
            router.refused_by(replica)


def forget(router: Any) -> None:
    _routers.discard(router)


def replica_states(app_name: str) -> dict[str, dict[str, Any]] | None:
    """Each model replica Ray Serve routes to now, by id, with the routing stats it last reported (`{}` before its
    first), as this process's router for application `app_name` holds them; None before that router exists."""
    for router in list(_routers):
        if router.app_name == app_name:
            return {replica_id.unique_id: dict(replica.routing_stats)
                    for replica_id, replica in list(router.curr_replicas.items())}
    return None
