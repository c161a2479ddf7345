"""What `catrt serve --ray` checks before it starts or joins a Ray cluster, and how Ray's start-up
errors read.

Starting Ray takes seconds and its errors are tracebacks (a port in use surfaces from inside Ray
Serve's proxy actor; an unreachable `--ray-address` makes Ray retry for minutes), so the user
mistakes are refused here first, in one line each: the installed Ray must be one catrt runs on, a
local cluster's HTTP port must be free on this machine (its proxy binds it here), and a cluster to
join must answer at its address. Once Ray has started, a local cluster must have a device for each
replica (a joined one is only warned about: its autoscaler may add them).
Imports no Ray.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from importlib import metadata

from catrt.errors import ConfigError
from catrt.serve.config import FleetConfig, ServeConfig
from catrt.serve.server import listening_socket

CLIENT_PREFIX = "ray://"
LOCAL = "local"  # ray.init's name for "start a new local cluster" (None joins $RAY_ADDRESS or a `ray start` cluster)
# Addresses ray.init resolves itself: "auto" (a cluster started on this machine, or $RAY_ADDRESS).
RESOLVED_BY_RAY = ("auto",)
CONNECT_SECONDS = 5.0
# The oldest Ray `catrt.serve.ray_app` runs on, as pyproject's ray extra says: a deployment's request_router_config
# (catrt's ReadyFirstRouter), from Ray 2.48.
RAY_MINIMUM = (2, 48)


def check_ray_version() -> None:
    """Refuse an installed Ray older than RAY_MINIMUM, before it is imported: importing `catrt.serve.ray_app` then
    failed on Ray's router API, and the refusal said Ray Serve was not installed. A version that does not read as
    MAJOR.MINOR (a source build) is left to the import."""
    try:
        installed = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return
    release = re.match(r"(\d+)\.(\d+)", installed)
    if release is not None and (int(release[1]), int(release[2])) < RAY_MINIMUM:
        wanted = ".".join(map(str, RAY_MINIMUM))
        raise ConfigError(
            f'--ray needs Ray >= {wanted} (Ray Serve\'s custom request router) but Ray {installed} is installed: '
            'pip install -U "catrt[ray]"',
            field="ray", value=installed,
        )


def check_fleet_start(host: str, port: int, address: str | None) -> None:
    """Refuse, before Ray starts, a busy `--port` for a local cluster or a `--ray-address` nobody answers at."""
    if address is None or address == LOCAL:
        listening_socket(host, port).close()  # a port in use, or a host this machine cannot listen on
    elif address not in RESOLVED_BY_RAY:
        _check_answers(address)


def _check_answers(address: str) -> None:
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({reason}); start one there "
            "(ray start --head) or fix the address",
            field="ray_address", value=address,
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (a head node's GCS) or `ray://HOST:PORT` (Ray Client)."""
    bare = address[len(CLIENT_PREFIX):] if address.startswith(CLIENT_PREFIX) else address
    host, _, port = bare.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--ray-address {address!r} is not a Ray cluster address: give auto, HOST:PORT (the head node, e.g. "
            "10.0.0.5:6379) or ray://HOST:PORT (Ray Client, e.g. ray://head:10001)",
            field="ray_address", value=address,
        )
    return host, int(port)


def replica_device(config: ServeConfig, gpus: bool) -> str:
    """The Ray resource each model replica holds one of, "GPU" or "CPU", following the device it serves on (`gpus`:
    the cluster has GPUs). An eager model runs on `--device`: a CUDA one needs a GPU (on any cluster: a joined one
    may add GPU nodes), any other runs on CPUs, and holding a GPU it never uses would cap a CPU fleet at the GPU count.
    A build's backend picks CUDA wherever the replica's process sees a GPU (Ray 2.60 hides none from a replica that
    asked for no GPU), so builds hold one on a cluster that has GPUs."""
    if config.model is not None:
        return "GPU" if config.device.split(":")[0] == "cuda" else "CPU"
    return "GPU" if gpus else "CPU"


def check_fleet_device(config: ServeConfig) -> None:
    """Refuse a `--device cuda:N`: Ray hands each model replica one GPU of its choosing and shows it that one alone
    (CUDA_VISIBLE_DEVICES), as cuda:0, so an index names a GPU the replica cannot see (the model failed to load, after
    Ray had started) or pins one Ray did not choose."""
    if config.model is not None and config.device.startswith("cuda:"):
        raise ConfigError(
            f"--device {config.device} is not served with --ray: Ray assigns each model replica its GPU; use --device cuda",
            field="device", value=config.device,
        )


def check_local_room(fleet: FleetConfig, resources: Mapping[str, float], device: str) -> None:
    """Refuse more model replicas than a local cluster (`resources`: `ray.cluster_resources()`) has devices for
    (`device`: each replica's, `replica_device`). It
    has no autoscaler, so a replica without one is never placed and Serve waits for it for ever: the CLI never said
    it listened, and only Ray's "can't be scheduled" warnings, half a minute apart, told why. A joined cluster may
    add nodes (KubeRay's autoscaler), so it is not refused (`joined_room_warning`); nor is `--max-replicas`, which
    Serve only scales towards.
    A GPU replica holds a CPU too (Ray Serve gives each replica `num_cpus=1` unless told otherwise): a cluster with more
    GPUs than CPUs (a container's CPU limit) placed only as many replicas as it had CPUs, and waited for the rest."""
    short = _short_of(fleet, resources, device)
    if short is not None:
        needs, name, wanted, have = short
        raise ConfigError(
            f"{needs} but the local Ray cluster has {have}: ask for at most {have}, or join a cluster with room "
            "(--ray-address)",
            field=name, value=wanted,
        )


def joined_room_warning(fleet: FleetConfig, resources: Mapping[str, float], device: str) -> str | None:
    """The line `catrt serve` prints where a joined cluster has fewer devices now than the replicas need (None where it
    has them): Serve then waits for its autoscaler to add nodes, for ever on a cluster without one, and nothing said
    why (a `--device cuda` fleet joined to a CPU-only cluster never started, in silence)."""
    short = _short_of(fleet, resources, device)
    if short is None:
        return None
    needs, _, _, have = short
    return (f"catrt serve: warning: {needs} and the Ray cluster has {have} now: the application runs once its "
            "autoscaler adds them (never, where it has none; Ctrl-C stops)")


def _short_of(fleet: FleetConfig, resources: Mapping[str, float],
              device: str) -> tuple[str, str, int, int] | None:
    """(what the replicas need, in words; the flag's field; replicas wanted; the count of the first resource
    `resources` lacks for them), or None where it has room."""
    wanted = fleet.replicas if fleet.replicas is not None else fleet.min_replicas
    for held in (device, "CPU") if device != "CPU" else ("CPU",):
        have = int(resources.get(held, 0))
        if wanted is not None and wanted > have:
            flag = "--replicas" if fleet.replicas is not None else "--min-replicas"
            name = flag[2:].replace("-", "_")
            return f"{flag} {wanted} needs {wanted} {held}s (each model replica holds one)", name, wanted, have
    return None


# ray.init's words when `auto` finds no cluster; Ray 2.60 goes on, on the same line, to advise its own CLI's
# `--address` flag, which `catrt serve` does not have.
NO_CLUSTER = "Could not find any running Ray instance."


def ray_start_error(error: BaseException, address: str | None) -> ConfigError:
    """`ray.init`'s refusal (no cluster found, an address it cannot read or reach) as one line naming the address."""
    where = "a local Ray cluster" if address is None else f"--ray-address {address}"
    reason = first_line(error)
    if address in RESOLVED_BY_RAY and NO_CLUSTER in reason:
        reason = (reason[:reason.index(NO_CLUSTER) + len(NO_CLUSTER)]
                  + " Start one on this machine (ray start --head), or leave out --ray-address to start a local one")
    return ConfigError(f"cannot start or join {where}: {reason}", field="ray_address", value=address)


def first_line(error: BaseException) -> str:
    """The error's own first line; for Ray's task errors, that of the exception inside the task."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    text = next((line.strip() for line in str(shown).splitlines() if line.strip()), "")
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__
