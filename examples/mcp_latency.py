#!/usr/bin/env python3
"""Latency of run_code through MCP, as a client sees it.

    pip install "mcp==2.3.0"
    cargo build --release
    python3 examples/mcp_latency.py [target/release/airlock] [--conversations N] [--warm-calls N]

Starts `airlock serve --http` on a free loopback port (no tokens: loopback
only) and, for each of N conversations (MCP sessions, one after another):

- first: the first run_code `print(1)` of the new conversation, which takes
  a sandbox (from the warm pool when it has one, else restored then);
- warm: run_code `print(1)` again in the same sandbox;
- baseline: sandbox_info, a tool call that never touches the guest, i.e. the
  MCP and HTTP cost alone, measured in the same run.

It prints medians and the ratios first/warm and warm/baseline: absolute
figures depend on the machine (and on a software-nested KVM, where each
guest system call costs about a millisecond, they are far from real KVM's).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def timed(session: ClientSession, tool: str, arguments: dict) -> float:
    started = time.perf_counter()
    result = await session.call_tool(tool, arguments, read_timeout_seconds=1800)
    elapsed = time.perf_counter() - started
    if result.is_error:
        raise SystemExit(f"{tool} failed: {result.content}")
    return elapsed


async def measure(url: str, conversations: int, warm_calls: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"first": [], "warm": [], "baseline": []}
    code = {"language": "python", "code": "print(1)"}
    for n in range(conversations):
        async with streamable_http_client(url) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                figures["first"].append(await timed(session, "run_code", code))
                for _ in range(warm_calls):
                    figures["warm"].append(await timed(session, "run_code", code))
                    figures["baseline"].append(await timed(session, "sandbox_info", {}))
        print(f"conversation {n + 1}: first run_code {figures['first'][-1] * 1000:.0f} ms", file=sys.stderr)
        # Let the warm pool refill, as it would between real conversations.
        await anyio.sleep(3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("airlock", nargs="?", default="target/release/airlock")
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--warm-calls", type=int, default=10)
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen([args.airlock, "serve", "--http", f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 1800
        while True:
            if server.poll() is not None:
                raise SystemExit(f"airlock serve exited with {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if b"ready" in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.5)
        figures = anyio.run(measure, f"http://127.0.0.1:{port}/mcp", args.conversations, args.warm_calls)
    finally:
        server.terminate()
        server.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"first run_code in a new conversation: median {med['first'] * 1000:.0f} ms "
          f"(min {min(figures['first']) * 1000:.0f}, max {max(figures['first']) * 1000:.0f}, n={len(figures['first'])})")
    print(f"warm run_code:                        median {med['warm'] * 1000:.0f} ms (n={len(figures['warm'])})")
    print(f"baseline sandbox_info (no guest):     median {med['baseline'] * 1000:.1f} ms")
    print(f"ratios: first/warm {med['first'] / med['warm']:.2f}x, warm/baseline {med['warm'] / med['baseline']:.1f}x")


if __name__ == "__main__":
    main()
