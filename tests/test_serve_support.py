"""Helpers shared by the `catrt serve` test modules (no tests here): a real server subprocess and its clients.

Servers listen on `--port 0` and the test reads the port from the start-up line, so no free-port
guess can race with another process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

PROMPT = "a red sun in a blue sky"
LISTENING = re.compile(r"^catrt serve: listening on (http://\S+)$")
CLI = [sys.executable, "-m", "catrt.cli"]
# `catrt serve` whose generation (in the server's own process) raises on the prompt "boom", sleeps N seconds
# on "sleep N", makes NaN images on "nan", waits before its call on "wait NAME" and, on "block NAME", runs a first
# denoising step that does not return, both while the file `hold_file(server, NAME)` exists (and marking that they
# hold by making that file's `.taken` twin): a failure, a busy worker, an overflow or a hung step on cue, so tests
# need not guess how fast this machine generates or which guidance overflows a model. With `WARM_UP_HOLD` set to a
# file's path in its environment, its warm-up waits while that file exists (marked as the holds are). It prints a
# line for each request's checks saying whether they ran on the event loop (`CHECKS_RAN`).
FAULT_CLI = [sys.executable, "-c", """
import asyncio, os, sys, tempfile, time
from catrt.serve.model import ServedModel
from catrt.serve.routing import RoutedRules
from catrt.serve.worker import WARMUP_PROMPT
admit = RoutedRules.admit
def admit_and_say_where(self, body):
    try:
        asyncio.get_running_loop()
        where = "on the event loop"
    except RuntimeError:
        where = "off the event loop"
    print(f"fault-cli: the checks of a prompt of {len(body.prompt)} characters ran {where}", flush=True)
    return admit(self, body)
RoutedRules.admit = admit_and_say_where
generate = ServedModel.generate
def hold(held):
    if os.path.exists(held):
        open(held + ".taken", "w").close()
    while os.path.exists(held):
        time.sleep(0.02)
def held(name):
    return os.path.join(tempfile.gettempdir(), f"catrt-fault-{os.getpid()}-{name}")
def faulty(self, rows, options, *rest, **named):
    for row in rows:
        if row.prompt == WARMUP_PROMPT and "CATRT_FAULT_WARM_UP_HOLD" in os.environ:
            hold(os.environ["CATRT_FAULT_WARM_UP_HOLD"])
        if row.prompt == "boom":
            raise RuntimeError("injected failure")
        if row.prompt.startswith("sleep "):
            time.sleep(float(row.prompt.split()[1]))
        if row.prompt.startswith("wait "):
            hold(held(row.prompt.split()[1]))
        if row.prompt.startswith("block "):
            name = row.prompt.split()[1]
            hook = self.runner.transformer.register_forward_pre_hook(lambda module, args: hold(held(name)))
            try:
                return generate(self, rows, options, *rest, **named)
            finally:
                hook.remove()
    if any(row.prompt == "nan" for row in rows):
        runner = self.runner
        def overflowing(*args, **kwargs):
            output = runner(*args, **kwargs)
            output.images = output.images * float("nan")
            return output
        self.runner = overflowing
        try:
            return generate(self, rows, options, *rest, **named)
        finally:
            self.runner = runner
    return generate(self, rows, options, *rest, **named)
ServedModel.generate = faulty
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""]
WARM_UP_HOLD = "CATRT_FAULT_WARM_UP_HOLD"
CHECKS_RAN = re.compile(r"^fault-cli: the checks of a prompt of (\d+) characters ran (on|off) the event loop$")
# The bound of every wait for a condition: only a hang reaches it, as each wait ends once its condition holds, so it
# is as generous as a loaded machine may need.
WAIT_SECONDS = 120.0


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Offline, one thread, and no API key unless the test gives one."""
    env = {key: value for key, value in os.environ.items() if key != "CATRT_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


class RemoteServer:
    """`catrt serve ... --port 0` in a subprocess; its output is collected line by line."""

    def __init__(self, command: list[str], serve_args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*command, "serve", *serve_args, "--port", "0"], env=server_env(env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self.url = ""
        self.ready_statuses: list[int] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.match(line.strip())
            if match and not self.url:
                self.url = match.group(1)
                self._listening.set()
        self._listening.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self, timeout: float = 600.0) -> None:
        assert self._listening.wait(timeout) and self.url, f"no start-up line:\n{self.output}"

    def ready_status(self) -> int | None:
        """/health/ready's status now (None: no answer yet), recorded in `ready_statuses`."""
        try:
            status = httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code
        except httpx.TransportError:
            return None
        self.ready_statuses.append(status)
        return status

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until /health/ready answers 200; `timeout` ends a hang only (a server that fails exits, which ends the wait):
        several servers loading at once on a loaded 2-core machine take minutes."""
        deadline = time.monotonic() + timeout
        self.wait_listening(timeout)
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output
            if self.ready_status() == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready in {timeout} s:\n{self.output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.wait_stopped()

    def wait_stopped(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)


def start_all(servers: dict[str, RemoteServer]) -> None:
    """Wait for every server; on failure stop them all so no process outlives the fixture."""
    try:
        for server in servers.values():
            server.wait_ready()
    except BaseException:
        stop_all(servers)
        raise


def stop_all(servers: dict[str, RemoteServer]) -> None:
    """Kill the fixtures' servers: a clean exit (tested on its own, with SIGTERM) costs seconds of torch
    teardown per process, and they hold nothing that needs one."""
    for server in servers.values():
        if server.process.poll() is None:
            server.process.kill()
    for server in servers.values():
        server.wait_stopped()


def generate(url: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, **body}, headers=headers, timeout=60)


async def generate_all(url: str, bodies: list[dict[str, Any]], stagger: float = 0.0) -> list[httpx.Response]:
    """POST every body concurrently (the i-th after i * stagger seconds)."""
    async with httpx.AsyncClient(timeout=60) as client:

        async def post(index: int, body: dict[str, Any]) -> httpx.Response:
            await asyncio.sleep(index * stagger)
            return await client.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, **body})

        return await asyncio.gather(*(post(index, body) for index, body in enumerate(bodies)))


T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = WAIT_SECONDS, interval: float = 0.02) -> T:
    """`condition()`'s first truthy value, asked every `interval` s: a wait on the condition itself, not on a guess of
    how long the other side takes; `timeout` only ends a hang, failing the test with `what`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(interval)
    return value


def hold_file(server: RemoteServer, name: str) -> Path:
    """The file whose existence holds `server`'s (FAULT_CLI) "wait NAME" and "block NAME" prompts."""
    return Path(tempfile.gettempdir()) / f"catrt-fault-{server.process.pid}-{name}"


def taken_mark(held: Path) -> Path:
    """The file FAULT_CLI makes once a call is held by `held`."""
    return held.with_name(held.name + ".taken")


class HeldWorker:
    """A FAULT_CLI server's worker held in one call, on cue instead of by a sleep: `body` with the prompt "wait NAME",
    POSTed on a thread of its own; entering returns once the worker holds it, `release` lets the call go on and
    returns its answer."""

    def __init__(self, server: RemoteServer, name: str = "held", **body: Any) -> None:
        self.url = server.url
        self.held = hold_file(server, name)
        self.taken = taken_mark(self.held)
        self.body = {"prompt": f"wait {name}", **body}
        self._answer: httpx.Response | BaseException | None = None
        self._thread = threading.Thread(target=self._post, daemon=True)

    def _post(self) -> None:
        try:
            self._answer = httpx.post(f"{self.url}/v1/images/generations", json=self.body, timeout=WAIT_SECONDS)
        except BaseException as error:  # noqa: BLE001 - handed to the test by `answer`
            self._answer = error

    def __enter__(self) -> HeldWorker:
        self.held.touch()
        self._thread.start()
        wait_until(lambda: self.taken.exists() or not self._thread.is_alive(), "the worker took the held request")
        assert self.taken.exists(), f"the held request was answered without being held: {self._answer!r}"
        return self

    def answer(self) -> httpx.Response:
        """The held request's answer, once it has one (a timeout or a refusal comes while the call is still held)."""
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "the held request was not answered"
        if isinstance(self._answer, BaseException):
            raise self._answer
        assert self._answer is not None
        return self._answer

    def release(self) -> httpx.Response:
        self.held.unlink(missing_ok=True)
        return self.answer()

    def __exit__(self, *exc: object) -> None:
        self.held.unlink(missing_ok=True)
        self._thread.join(WAIT_SECONDS)
        self.taken.unlink(missing_ok=True)


def queue_depth(url: str) -> float:
    """`catrt_queue_depth`: the requests waiting for the worker (the call it holds not counted)."""
    return metric(url, "catrt_queue_depth")


def png(b64: str) -> bytes:
    return base64.b64decode(b64)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    """OpenAI's error body with `status` and `param`; returns the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["code"] == str(status)
    return error


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=WAIT_SECONDS).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class LiveProbe:
    """GETs /health/live every 10 ms on its own thread and client; `latencies` are the answer times.

    It stops no sooner than `least` answers, so a machine that does the watched work fast still
    gets that many probes; the work was running during the first of them."""

    def __init__(self, url: str, least: int = 20) -> None:
        self.url = url
        self.least = least
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LiveProbe:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        wait_until(lambda: len(self.latencies) >= self.least or not self._thread.is_alive(), f"{self.least} probes",
                   interval=0.01)
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=WAIT_SECONDS) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(f"{self.url}/health/live").status_code
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                else:
                    if status != 200:
                        self.failures.append(str(status))
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.01)


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`catrt <args>` to completion; stdout and stderr captured."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=server_env(env), timeout=timeout)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and one `catrt serve: error:` line on stderr containing every needle."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("catrt serve: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def openapi_request_schema(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
