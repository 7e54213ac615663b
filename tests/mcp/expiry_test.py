"""Lifecycle over HTTP: the per-principal limit refuses with a clear error,
an idle sandbox expires and a later call says so clearly, reset_sandbox
starts over, and an expired sandbox frees its place under the limit."""

from __future__ import annotations

import anyio
from harness import FIRST_CALL_TIMEOUT, HttpServer, call, check, run, text_of

# Long enough that the second session's call lands before the first
# sandbox goes idle, even on a loaded one-vCPU emulated test host (at 5 s it
# did not, once: the pool's refill restore ran beside it).
IDLE = 20


async def main() -> None:
    args = ("--idle-timeout", f"{IDLE}s", "--pool-size", "1", "--max-sandboxes-per-principal", "1")
    with HttpServer(*args) as server:
        async with server.session("alice") as a, server.session("alice") as b:
            r = await run(a, "x = 1\nprint('ok')", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error, "the first session gets a sandbox")
            r = await run(b, "print('second')")
            check(r.is_error and "limit" in text_of(r), f"a second sandbox over the per-principal limit is refused clearly: {text_of(r)!r}")

            info = await call(a, "sandbox_info")
            check(info.structured_content["idle_timeout_seconds"] == IDLE, "sandbox_info shows the idle timeout")
            server.note_vmms()
            await anyio.sleep(IDLE + 3)
            r = await run(a, "x")
            message = text_of(r)
            check(r.is_error and "expired" in message and "idle" in message, f"a call after the idle timeout says the sandbox expired: {message!r}")
            check("reset_sandbox" in message, "and tells how to go on")
            r = await run(a, "x")
            check(r.is_error and "expired" in text_of(r), "it keeps saying so")

            # The expired sandbox no longer counts: b may have one now.
            r = await run(b, "print('second')")
            check(not r.is_error and "second" in text_of(r), "the limit frees up when a sandbox expires")
            r = await call(a, "reset_sandbox")
            check(r.is_error and "limit" in text_of(r), f"reset is refused while b holds the only place: {text_of(r)!r}")
            server.note_vmms()
        # Both sessions closed: a's reset may go ahead in a new session.
        async with server.session("alice") as c:
            r = await call(c, "reset_sandbox", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error, f"reset_sandbox gives a fresh sandbox: {text_of(r)!r}")
            r = await run(c, "1 + 1")
            check("2" in text_of(r), "which runs code")
            server.note_vmms()


anyio.run(main)
print("expiry: all checks passed")
