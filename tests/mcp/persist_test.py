"""A desktop assistant's restart, through the SDK over stdio: `serve
--persist demo`, a write and a variable, the client exits; `serve --persist
demo` again, and the file and the variable are there."""

from __future__ import annotations

import os
import tempfile

import anyio
from harness import AIRLOCK, FIRST_CALL_TIMEOUT, call, check, log, run, text_of
from mcp import StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp import ClientSession


async def session(state_dir: str, body) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRLOCK_") or k == "TMPDIR"}
    args = ["serve", "--persist", "demo", "--state-dir", state_dir, "--pool-size", "0"]
    params = StdioServerParameters(command=AIRLOCK, args=args, env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            await body(s)


async def main() -> None:
    state_dir = tempfile.mkdtemp(prefix="airlock-persist-")

    async def first(s: ClientSession) -> None:
        r = await run(s, "kept = 1234\nprint('set')", timeout=FIRST_CALL_TIMEOUT)
        check(not r.is_error, f"the first run: {text_of(r)!r}")
        r = await call(s, "write_file", path="notes.txt", content="outlives the server")
        check(not r.is_error, f"write_file: {text_of(r)!r}")

    await session(state_dir, first)
    check(
        any(n.startswith("paused-") for n in os.listdir(os.path.join(state_dir, "persist-demo"))),
        "the exit paused the sandbox into the store",
    )

    async def second(s: ClientSession) -> None:
        r = await call(s, "read_file", path="notes.txt", timeout=FIRST_CALL_TIMEOUT)
        check(not r.is_error and "outlives the server" in text_of(r), f"the file is back: {text_of(r)!r}")
        r = await run(s, "print(kept)")
        check(not r.is_error and "1234" in text_of(r), f"the variable is back: {text_of(r)!r}")
        r = await call(s, "sandbox_info")
        log(f"info after the restart: {text_of(r)}")

    await session(state_dir, second)
    log("ok: persist_test passed")


anyio.run(main)
