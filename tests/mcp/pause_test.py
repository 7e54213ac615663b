"""Pause to disk over stdio, through the SDK: with --pause-after 1s an idle
sandbox's VM ends (its state saved to disk), and the next call resumes it
with files, Python, JavaScript and bash state, the working directory and a
background process; then 50 pause/resume cycles, each appending a line and
incrementing a variable, lose nothing."""

from __future__ import annotations

import os
import time

import anyio
from harness import (
    AIRLOCK,
    FIRST_CALL_TIMEOUT,
    call,
    check,
    log,
    run,
    stdio_server_pid,
    text_of,
    vmm_children,
)
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

CYCLES = 50
PAUSE_WITHIN = 60.0


async def wait_paused(server: int, what: str) -> float:
    """Waits until the server has no VMM process (--pool-size 0: the
    sandbox's is the only one); returns how long that took."""
    started = time.monotonic()
    while vmm_children(server):
        if time.monotonic() - started > PAUSE_WITHIN:
            check(False, f"{what}: the idle sandbox was paused within {PAUSE_WITHIN} s")
        await anyio.sleep(0.1)
    return time.monotonic() - started


async def ok(s: ClientSession, code: str, language: str = "python") -> str:
    r = await run(s, code, language=language)
    check(not r.is_error, f"{language} ran: {text_of(r)!r}")
    return text_of(r)


async def main() -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRLOCK_") or k == "TMPDIR"}
    args = ["serve", "--pause-after", "1s", "--pool-size", "0"]
    params = StdioServerParameters(command=AIRLOCK, args=args, env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            server = stdio_server_pid()
            check(server is not None, "the server process is found")
            r = await run(s, "counter = 41\nprint('warm')", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error, f"the first call makes the sandbox: {text_of(r)!r}")
            r = await call(s, "write_file", path="notes.txt", content="kept across pauses")
            check(not r.is_error, f"write_file: {text_of(r)!r}")
            await ok(s, "globalThis.carried = 'js-kept';", "javascript")
            await ok(
                s,
                "mkdir -p /tmp/work && cd /tmp/work && export CARRIED=bash-kept\n"
                "(while :; do date +%s >> /tmp/ticks; sleep 1; done) >/dev/null 2>&1 &\n"
                "sleep 1",
                "bash",
            )

            took = await wait_paused(server, "after the first calls")
            log(f"ok: paused {took:.1f} s after the last call")
            await anyio.sleep(2)
            started = time.monotonic()
            out = await ok(s, "counter += 1\nprint(counter, open('/home/sandbox/notes.txt').read())")
            log(f"LATENCY first call after a pause (resume included): {time.monotonic() - started:.2f} s")
            check("42 kept across pauses" in out, f"Python state and files survive a pause: {out!r}")
            out = await ok(s, "console.log(globalThis.carried)", "javascript")
            check("js-kept" in out, f"JavaScript state survives: {out!r}")
            out = await ok(s, 'echo "$(pwd) $CARRIED"', "bash")
            check("/tmp/work bash-kept" in out, f"bash's cwd and variables survive: {out!r}")
            out = await ok(s, "sleep 2; tail -n 1 /tmp/ticks", "bash")
            last = float(out.strip().splitlines()[0])
            check(abs(last - time.time()) < 3, f"the background loop goes on, on the host's clock (last tick {last}, now {time.time():.0f})")
            r = await call(s, "sandbox_info")
            info = r.structured_content
            check(info["pauses"] >= 1 and info["resumes"] >= 1, f"sandbox_info counts the pause and the resume: {info}")
            check(info["stored_bytes"] > 0 and info["last_resumed_unix"], f"and shows the stored bytes and the last resume: {info}")
            check(info["pause_after_seconds"] == 1, f"and the pause policy: {info}")

            # The soak: every cycle pauses and resumes; nothing is lost.
            await ok(s, "n = 0\nopen('/home/sandbox/soak.txt', 'w').close()")
            pause_waits = []
            started = time.monotonic()
            for i in range(1, CYCLES + 1):
                pause_waits.append(await wait_paused(server, f"cycle {i}"))
                out = await ok(s, "n += 1\nopen('/home/sandbox/soak.txt', 'a').write(f'{n}\\n')\nprint(n)")
                check(out.strip().splitlines()[0] == str(i), f"cycle {i}: the variable carried on ({out!r})")
            soaked = time.monotonic() - started
            out = await ok(s, "print(n, open('/home/sandbox/soak.txt').read().split() == [str(i) for i in range(1, n + 1)])")
            check(out.strip().splitlines()[0].split() == [str(CYCLES), "True"], f"{CYCLES} cycles: no line and no increment lost ({out!r})")
            r = await call(s, "sandbox_info")
            info = r.structured_content
            check(info["pauses"] >= CYCLES + 1 and info["resumes"] >= CYCLES + 1, f"every cycle paused and resumed: {info}")
            log(
                f"LATENCY {CYCLES} pause/resume cycles in {soaked:.1f} s; mean pause {info['pause_seconds_total'] / info['pauses']:.3f} s, "
                f"mean resume {info['resume_seconds_total'] / info['resumes']:.3f} s, stored {info['stored_bytes'] >> 20} MiB"
            )
    log("ok: pause_test passed")


anyio.run(main)
