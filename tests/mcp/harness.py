"""Shared helpers for the MCP integration tests.

Each test script drives the built `airlock` binary (path in $AIRLOCK_BIN)
with the official Python `mcp` SDK and exits non-zero on the first failed
check. tests/mcp.rs runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

# tests/mcp.rs asks a script it is about to kill as hung where it is: SIGUSR1
# dumps every thread's stack (even one blocked in C), SIGUSR2 every asyncio
# task's.
faulthandler.register(signal.SIGUSR1, all_threads=True)


def _dump_tasks(_signum: int, _frame: Any) -> None:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return
    for task in tasks:
        task.print_stack(file=sys.stderr)


signal.signal(signal.SIGUSR2, _dump_tasks)

AIRLOCK = os.environ.get("AIRLOCK_BIN") or (sys.argv[1] if len(sys.argv) > 1 else "airlock")

# The very first sandbox of a fresh install waits for the guest image and the
# warm template to be built (minutes); later ones restore in well under a second.
FIRST_CALL_TIMEOUT = 1800.0
CALL_TIMEOUT = 120.0


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def check(condition: Any, message: str) -> None:
    if not condition:
        raise AssertionError(message)
    log(f"ok: {message}")


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def vmm_children(pid: int) -> list[int]:
    return [c for c in children(pid) if "vmm" in cmdline(c)[1:2]]


def stdio_server_pid() -> int | None:
    """The `airlock serve` process the SDK's stdio_client started from this process."""
    for c in children(os.getpid()):
        args = cmdline(c)
        if len(args) >= 2 and args[0] == AIRLOCK and args[1] == "serve":
            return c
    return None


def wait_gone(pids: list[int], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    check(not left, f"{what}: no VMM process left behind (had {len(pids)}, alive now {left})")


def tokens_file(principals: list[str]) -> tuple[str, dict[str, str]]:
    tokens = {p: secrets.token_hex(24) for p in principals}
    fd, path = tempfile.mkstemp(prefix="airlock-tokens-")
    with os.fdopen(fd, "w") as f:
        for p, t in tokens.items():
            f.write(f"{p}:{t}\n")
    return path, tokens


class HttpServer:
    """`airlock serve --http` on a free loopback port; SIGTERM on exit, then
    checks that every VMM it started is gone."""

    def __init__(self, *extra: str, tokens: list[str] = ("alice", "bob")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens_path, self.tokens = tokens_file(list(tokens))
        # Sandboxes are paused into the state directory at shutdown: a test's
        # own, removed after it, unless the test names one to restart on.
        self.own_state_dir = None
        if "--state-dir" not in extra:
            self.own_state_dir = tempfile.mkdtemp(prefix="airlock-state-")
            extra = ("--state-dir", self.own_state_dir, *extra)
        self.args = [AIRLOCK, "serve", "--http", f"127.0.0.1:{self.port}", "--tokens-file", self.tokens_path, *extra]
        self.proc: subprocess.Popen | None = None
        self.vmms: set[int] = set()

    def __enter__(self) -> "HttpServer":
        log("starting", " ".join(self.args))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            check_running = self.proc.poll()
            if check_running is not None:
                raise AssertionError(f"airlock serve exited with {check_running}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("airlock serve did not answer /healthz within 60 s")
            time.sleep(0.2)
        return self

    def note_vmms(self) -> None:
        assert self.proc is not None
        self.vmms.update(vmm_children(self.proc.pid))

    def metrics(self, token: str) -> str:
        request = urllib.request.Request(f"{self.url}/metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.read().decode()

    def metric(self, token: str, name: str) -> float:
        for line in self.metrics(token).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} missing")

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.note_vmms()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("airlock serve did not exit within 60 s of SIGTERM")
            if exc[0] is None:
                check(code == 0, f"airlock serve exited cleanly after SIGTERM (status {code})")
        os.unlink(self.tokens_path)
        if exc[0] is None:
            wait_gone(sorted(self.vmms), 15, "after SIGTERM")
        if self.own_state_dir is not None:
            shutil.rmtree(self.own_state_dir, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def session(
        self, principal: str = "alice", *, token: str | None = None, modern: bool = False, logging_callback: Any = None
    ):
        """An MCP client session: legacy (initialize, Mcp-Session-Id) or
        modern (2026-07-28 discover, no session)."""
        token = token if token is not None else self.tokens[principal]
        client = create_mcp_http_client(
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx2.Timeout(30.0, read=FIRST_CALL_TIMEOUT),
        )
        async with client:
            # Results carrying a 10 MiB file are bigger than the SDK's default
            # 1 MiB limit on one server-sent event.
            async with streamable_http_client(
                f"{self.url}/mcp", http_client=client, max_sse_event_size=64 << 20
            ) as (read, write):
                async with ClientSession(read, write, logging_callback=logging_callback) as session:
                    if modern:
                        await session.discover()
                    else:
                        await session.initialize()
                    yield session


async def call(session: ClientSession, tool: str, timeout: float = CALL_TIMEOUT, **arguments: Any):
    return await session.call_tool(tool, arguments, read_timeout_seconds=timeout)


async def run(session: ClientSession, code: str, language: str = "python", timeout: float = CALL_TIMEOUT, **extra: Any):
    return await call(session, "run_code", timeout=timeout, language=language, code=code, **extra)
