"""stdio: one sandbox for the server's life. Tools and their annotations,
state across calls in python, javascript and bash, images, bad arguments,
a timeout and a cancellation that leave the sandbox usable, progress, files,
sandbox_info, and no VMM left behind when stdin closes."""

from __future__ import annotations

import base64
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
    wait_gone,
)
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

EXPECTED_TOOLS = {
    "run_code",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
    "reset_sandbox",
    "sandbox_info",
    "checkpoint_sandbox",
    "rollback_sandbox",
    "fork_sandbox",
    "list_checkpoints",
}


async def main() -> None:
    # The SDK gives a server only a minimal environment; airlock's settings and
    # the temporary directory (its VMM sockets live there) go along.
    env = {k: v for k, v in os.environ.items() if k.startswith("AIRLOCK_") or k == "TMPDIR"}
    params = StdioServerParameters(command=AIRLOCK, args=["serve"], env=env)
    vmms: list[int] = []
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            init = await s.initialize()
            check(init.server_info.name == "airlock", "server names itself airlock")
            check("persist" in (init.instructions or ""), "instructions say what persists")

            tools = {t.name: t for t in (await s.list_tools()).tools}
            check(set(tools) == EXPECTED_TOOLS, f"lists the tools {sorted(tools)}")
            a = {name: t.annotations for name, t in tools.items()}
            check(not a["run_code"].read_only_hint and not a["run_code"].idempotent_hint, "run_code: not read-only, not idempotent")
            for name in ("read_file", "list_files", "sandbox_info"):
                check(a[name].read_only_hint, f"{name} is read-only")
            check(a["reset_sandbox"].destructive_hint, "reset_sandbox is destructive")
            check(tools["run_code"].output_schema is not None, "run_code has an output schema")
            check("1 hour" in tools["run_code"].description, "run_code's description says how long the sandbox lives")

            info = await call(s, "sandbox_info")
            check(not info.is_error and info.structured_content["sandbox_id"] is None, "sandbox_info before any call creates nothing")

            # First call: takes a sandbox (waits for the template on a fresh install).
            started = time.monotonic()
            r = await run(s, "x = 41\nprint('hello')", timeout=FIRST_CALL_TIMEOUT)
            first = time.monotonic() - started
            check(not r.is_error and "hello" in text_of(r), f"first run_code works ({first:.2f} s): {text_of(r)!r}")
            sc = r.structured_content
            check(sc["exit_code"] == 0 and sc["stdout"].startswith("hello"), "structured output has exit code and stdout")
            server = stdio_server_pid()
            check(server is not None, "found the server process")
            vmms = vmm_children(server)
            check(len(vmms) >= 1, f"the server runs VMM processes {vmms}")

            warm = []
            for _ in range(5):
                started = time.monotonic()
                r = await run(s, "x + 1")
                warm.append(time.monotonic() - started)
            check("42" in text_of(r), f"python state persists across calls: {text_of(r)!r}")
            warm.sort()
            log(f"LATENCY stdio first_run_code={first:.3f}s warm_run_code_median={warm[len(warm) // 2]:.3f}s")

            r = await run(s, "1/0")
            check(not r.is_error and r.structured_content["error"]["name"] == "ZeroDivisionError", "an exception is reported")
            r = await run(s, "x")
            check("41" in text_of(r), "and the interpreter keeps its state after it")

            # Node (V8) crashes at random on kvm_pvm (a software-nested KVM):
            # there a crash must come back as a clean tool result.
            r = await run(s, "let y = 5", language="javascript", timeout=700, timeout_seconds=600)
            if os.environ.get("AIRLOCK_TEST_KVM_PVM") and (r.is_error or r.structured_content["exit_code"] != 0):
                check("killed by signal" in text_of(r) or "restarted" in text_of(r) or "start" in text_of(r), f"a node crash is reported clearly: {text_of(r)[:300]!r}")
                log("note: node crashed on kvm_pvm; skipping the javascript state check")
            else:
                check(not r.is_error and r.structured_content["exit_code"] == 0, f"javascript runs: {text_of(r)[:300]!r}")
                r = await run(s, "y * 2", language="javascript")
                check("10" in text_of(r), f"javascript state persists: {text_of(r)!r}")
            await run(s, "cd /tmp && export GREETING=hi", language="bash")
            r = await run(s, "pwd; echo $GREETING", language="bash")
            check("/tmp" in text_of(r) and "hi" in text_of(r), f"bash keeps cwd and variables: {text_of(r)!r}")

            r = await run(s, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
            images = [c for c in r.content if c.type == "image"]
            check(images and images[0].mime_type == "image/png", "a matplotlib figure comes back as PNG image content")
            check(base64.b64decode(images[0].data).startswith(b"\x89PNG"), "the image is a valid PNG")

            # Bad arguments are tool errors that say how to fix them.
            r = await run(s, "1", timeout_seconds=-1)
            check(r.is_error and "timeout_seconds" in text_of(r), f"a bad timeout is a tool error: {text_of(r)!r}")
            r = await call(s, "run_code", language="cobol", code="1")
            check(r.is_error, f"an unknown language is a tool error: {text_of(r)!r}")
            r = await call(s, "read_file", path="/home/sandbox/no-such-file")
            check(r.is_error and "list_files" in text_of(r), f"a missing file is a tool error with a hint: {text_of(r)!r}")
            r = await call(s, "run_code", language="python", code="1", sandbox_id="not-an-id")
            check(r.is_error and "sandbox_id" in text_of(r), "a malformed sandbox_id is a tool error")
            r = await call(s, "write_file", path="a.bin", content="%%%", encoding="base64")
            check(r.is_error and "base64" in text_of(r), "bad base64 is a tool error")

            # A timeout stops the code; the sandbox stays usable.
            started = time.monotonic()
            r = await run(s, "while True:\n    pass", timeout_seconds=2)
            elapsed = time.monotonic() - started
            check(not r.is_error and r.structured_content["timed_out"], f"an endless loop times out ({elapsed:.1f} s)")
            check(elapsed < 15, "and returns promptly")
            r = await run(s, "print(x)")
            if r.structured_content["state_lost"]:
                log("note: the interpreter lost its state on the timeout")
            check(not r.is_error and (r.structured_content["exit_code"] == 0 or r.structured_content["state_lost"]), "the sandbox answers after a timeout")
            await run(s, "x = 41")

            # A cancellation kills the code; the sandbox stays usable.
            code = "import time\nfor i in range(120):\n    open('/tmp/ticks', 'a').write('.')\n    time.sleep(0.5)"
            started = time.monotonic()
            with anyio.move_on_after(4) as scope:
                await run(s, code, timeout_seconds=120)
            check(scope.cancelled_caught, "the client cancelled a long run")
            r = await call(s, "run_command", command="wc -c < /tmp/ticks")
            n1 = int(r.structured_content["stdout"].strip())
            await anyio.sleep(2)
            r = await call(s, "run_command", command="wc -c < /tmp/ticks")
            n2 = int(r.structured_content["stdout"].strip())
            check(n1 == n2, f"the cancelled code stopped running ({n1} then {n2} ticks)")
            started = time.monotonic()
            r = await run(s, "x + 1")
            check("42" in text_of(r), f"the sandbox is usable after a cancellation ({time.monotonic() - started:.2f} s): {text_of(r)!r}")

            # Progress notifications during a long run.
            progress: list[tuple[float, str | None]] = []

            async def on_progress(p: float, total: float | None, message: str | None) -> None:
                progress.append((p, message))

            r = await s.call_tool(
                "run_code",
                {"language": "python", "code": "import time\nfor i in range(6):\n    print('step', i, flush=True)\n    time.sleep(1)"},
                read_timeout_seconds=60,
                progress_callback=on_progress,
            )
            check(not r.is_error and "step 5" in text_of(r), "a long run finishes")
            check(len(progress) >= 1, f"a long run sends progress notifications: {progress}")

            # Files.
            r = await call(s, "write_file", path="notes/hello.txt", content="héllo\n")
            check(not r.is_error, f"write_file works: {text_of(r)!r}")
            r = await call(s, "read_file", path="/home/sandbox/notes/hello.txt")
            check(text_of(r) == "héllo\n", f"read_file returns the text: {text_of(r)!r}")
            r = await call(s, "list_files", path="notes")
            check("hello.txt" in text_of(r), f"list_files shows it: {text_of(r)!r}")
            r = await run(s, "print(open('notes/hello.txt').read().strip())")
            check("héllo" in text_of(r), "code sees the file")
            r = await call(s, "run_command", command="id -u")
            check(r.structured_content["stdout"].strip() not in ("", "0"), "commands do not run as root")

            info = await call(s, "sandbox_info")
            sc = info.structured_content
            check(sc["sandbox_id"] and sc["idle_timeout_seconds"] == 3600 and sc["max_lifetime_seconds"] == 8 * 3600, f"sandbox_info names the sandbox and its limits: {text_of(info)!r}")
            check(sc["usage"]["runs"] >= 10 and sc["usage"]["memory_gb_seconds"] > 0, f"sandbox_info reports usage {sc['usage']}")

            r = await call(s, "reset_sandbox")
            check(not r.is_error, "reset_sandbox works")
            r = await run(s, "x")
            check("NameError" in text_of(r), "after a reset the old variables are gone")
            vmms = sorted(set(vmms) | set(vmm_children(server)))
    # stdin closed: the server destroys its sandboxes and exits.
    wait_gone(vmms, 20, "after stdin closed")


anyio.run(main)
print("stdio: all checks passed")
