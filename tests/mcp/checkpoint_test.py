"""Sessions that survive, through the SDK over Streamable HTTP, on real VMs:

1. checkpoint_sandbox, rollback_sandbox, fork_sandbox and list_checkpoints:
   a rollback restores files and variables exactly, a fork is an independent
   copy with its own random numbers, and another principal can use neither
   the sandbox nor its checkpoints;
2. SIGTERM (HTTP pauses every sandbox by default): a restarted server on the
   same address takes up the sessionless sandbox ids, files, variables and
   checkpoints intact, and the snapshot quota counts the kept checkpoints;
3. SIGKILL while a pause is being written: the next server brings the
   sandbox back from its last complete state, says so in the next result,
   and the registry names only what is on disk.
"""

from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import tempfile
import time

import anyio
from harness import FIRST_CALL_TIMEOUT, HttpServer, call, check, log, run, text_of

STATE_DIR = tempfile.mkdtemp(prefix="airlock-checkpoint-")


def server_on(port: int | None, tokens: dict[str, str] | None, *extra: str) -> HttpServer:
    """A server with the test's state directory, on `port` and with
    `tokens` if given (a restart), else on a new port."""
    server = HttpServer("--state-dir", STATE_DIR, "--pool-size", "0", *extra)
    if port is not None and tokens is not None:
        server.port = port
        server.url = f"http://127.0.0.1:{port}"
        with open(server.tokens_path, "w") as f:
            for p, t in tokens.items():
                f.write(f"{p}:{t}\n")
        server.tokens = dict(tokens)
        server.args[3] = f"127.0.0.1:{port}"
    return server


def store_dir(port: int) -> str:
    return os.path.join(STATE_DIR, f"http-127.0.0.1-{port}")


def check_store_consistent(port: int) -> None:
    """Every state the database names is on disk, and nothing else is."""
    root = store_dir(port)
    db = sqlite3.connect(os.path.join(root, "registry.sqlite3"))
    named = {r[0] for r in db.execute("SELECT saved FROM sandboxes WHERE saved IS NOT NULL")}
    named |= {r[0] for r in db.execute("SELECT dir FROM checkpoints")}
    dangling = [r[0] for r in db.execute("SELECT id FROM checkpoints WHERE sandbox_id NOT IN (SELECT id FROM sandboxes)")]
    db.close()
    on_disk = {n for n in os.listdir(root) if n.startswith("paused-")}
    check(named <= on_disk, f"every state the registry names is on disk ({sorted(named - on_disk)} missing)")
    check(on_disk <= named, f"no saved state is left that the registry does not name ({sorted(on_disk - named)})")
    check(not dangling, f"no checkpoint row outlives its sandbox ({dangling})")
    staging = glob.glob(os.path.join(root, ".staging", "*", "*"))
    check(not staging, f"nothing half-written is left in staging ({staging})")


async def main() -> None:
    # 1. Checkpoint, rollback, fork, ownership.
    first = server_on(None, None)
    with first as server:
        port, tokens = server.port, dict(server.tokens)
        async with server.session("alice", modern=True) as s:
            r = await run(s, "x = 1\nopen('f.txt', 'w').write('one')\nprint('ready')", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error, f"the first run: {text_of(r)!r}")
            sid = r.structured_content["sandbox_id"]
            t0 = time.monotonic()
            r = await run(s, "print(x)", sandbox_id=sid)
            warm = time.monotonic() - t0
            t0 = time.monotonic()
            r = await call(s, "checkpoint_sandbox", sandbox_id=sid, label="x is 1")
            took_checkpoint = time.monotonic() - t0
            check(not r.is_error, f"checkpoint_sandbox: {text_of(r)!r}")
            c1 = r.structured_content["checkpoint_id"]
            check(r.structured_content["label"] == "x is 1" and r.structured_content["size_bytes"] > 0, f"the checkpoint has its label and size: {r.structured_content}")
            r = await run(s, "x += 1\nopen('f.txt', 'w').write('two')\nprint(x)", sandbox_id=sid)
            check("2" in text_of(r), f"the sandbox runs on after its checkpoint, state intact: {text_of(r)!r}")
            r = await call(s, "checkpoint_sandbox", sandbox_id=sid)
            c2 = r.structured_content["checkpoint_id"]
            r = await call(s, "list_checkpoints", sandbox_id=sid)
            listed = [c["checkpoint_id"] for c in r.structured_content["checkpoints"]]
            check(listed == [c1, c2], f"list_checkpoints shows both, oldest first: {text_of(r)!r}")

            r = await run(s, "x = 99\nopen('f.txt', 'w').write('ninety-nine')\nopen('later.txt', 'w').write('gone')", sandbox_id=sid)
            t0 = time.monotonic()
            r = await call(s, "rollback_sandbox", sandbox_id=sid, checkpoint_id=c1)
            took_rollback = time.monotonic() - t0
            check(not r.is_error and r.structured_content["discarded_checkpoint_ids"] == [c2], f"rollback_sandbox: {text_of(r)!r}")
            check(r.structured_content["sandbox_id"] == sid, "the rollback keeps the sandbox id")
            r = await run(s, "import os\nprint(x, open('f.txt').read(), os.path.exists('later.txt'))", sandbox_id=sid)
            check("1 one False" in text_of(r), f"the rollback restored files and variables exactly: {text_of(r)!r}")
            r = await call(s, "rollback_sandbox", sandbox_id=sid, checkpoint_id=c2)
            check(r.is_error and "no checkpoint" in text_of(r), f"a checkpoint rolled back past is gone: {text_of(r)!r}")

            t0 = time.monotonic()
            r = await call(s, "fork_sandbox", sandbox_id=sid, checkpoint_id=c1)
            took_fork = time.monotonic() - t0
            check(not r.is_error, f"fork_sandbox: {text_of(r)!r}")
            fork = r.structured_content["sandbox_id"]
            check(fork != sid and r.structured_content["parent_sandbox_id"] == sid, "the fork is a new sandbox")
            r = await run(s, "print(x, open('f.txt').read())", sandbox_id=fork)
            check("1 one" in text_of(r), f"the fork starts as the checkpoint: {text_of(r)!r}")
            await run(s, "x = 100\nopen('f.txt', 'w').write('fork')", sandbox_id=fork)
            r = await run(s, "print(x, open('f.txt').read())", sandbox_id=sid)
            check("1 one" in text_of(r), f"the parent does not see the fork's writes: {text_of(r)!r}")
            entropy = "import os, random\nprint(os.urandom(16).hex(), random.getrandbits(64))"
            a = text_of(await run(s, entropy, sandbox_id=sid)).split()[:2]
            b = text_of(await run(s, entropy, sandbox_id=fork)).split()[:2]
            check(a[0] != b[0] and a[1] != b[1], f"the fork's os.urandom and random differ from the parent's ({a} / {b})")
            r = await call(s, "fork_sandbox", sandbox_id=sid)
            check(not r.is_error and r.structured_content["checkpoint_id"] not in (c1, ""), f"a fork without checkpoint_id takes one now: {text_of(r)!r}")
            now_fork = r.structured_content["sandbox_id"]
            r = await run(s, "print(x)", sandbox_id=now_fork)
            check("1" in text_of(r), "the fork of now has the parent's state")
            info = await call(s, "sandbox_info", sandbox_id=sid)
            st = info.structured_content
            check(st["checkpoints"] == 2 and st["snapshot_writes"] >= 2 and st["snapshot_restores"] >= 3, f"sandbox_info meters snapshots: {st}")
            log(
                f"LATENCY http warm_run_code={warm:.3f}s checkpoint_sandbox={took_checkpoint:.3f}s "
                f"rollback_sandbox={took_rollback:.3f}s fork_sandbox={took_fork:.3f}s "
                f"checkpoint_size={st['checkpoint_bytes'] / st['checkpoints'] / 2**20:.1f}MiB"
            )
            server.note_vmms()

        async with server.session("bob", modern=True) as b:
            r = await call(b, "rollback_sandbox", sandbox_id=sid, checkpoint_id=c1)
            check(r.is_error and "another client" in text_of(r), f"another principal cannot roll back the sandbox: {text_of(r)!r}")
            r = await call(b, "list_checkpoints", sandbox_id=sid)
            check(r.is_error and "another client" in text_of(r), "nor list its checkpoints")
            r = await run(b, "print('bob')")
            bobs = r.structured_content["sandbox_id"]
            r = await call(b, "fork_sandbox", sandbox_id=bobs, checkpoint_id=c1)
            check(r.is_error and "another client" in text_of(r), f"nor fork from its checkpoint: {text_of(r)!r}")
            server.note_vmms()
        text = server.metrics(tokens["alice"])
        check(server.metric(tokens["alice"], "airlock_checkpoints_total") >= 3, "/metrics counts checkpoints")
        check(server.metric(tokens["alice"], "airlock_forks_total") == 2 and "airlock_rollbacks_total 1" in text, "and forks and rollbacks")

    # 2. After SIGTERM, the sessionless ids come back with their state and
    #    checkpoints; the quota counts the kept checkpoints.
    with server_on(port, tokens, "--max-snapshot-bytes-per-principal", "1M") as server:
        async with server.session("alice", modern=True) as s:
            r = await run(s, "print(x, open('f.txt').read())", sandbox_id=sid, timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error and "1 one" in text_of(r), f"the sandbox id resumes after a restart, files and variables intact: {text_of(r)!r}")
            r = await run(s, "print(x, open('f.txt').read())", sandbox_id=fork)
            check("100 fork" in text_of(r), f"so does the fork: {text_of(r)!r}")
            r = await call(s, "list_checkpoints", sandbox_id=sid)
            check([c["checkpoint_id"] for c in r.structured_content["checkpoints"]][0] == c1, "the checkpoints outlive the restart")
            r = await call(s, "checkpoint_sandbox", sandbox_id=sid)
            check(r.is_error and "quota" in text_of(r) and "MiB" in text_of(r), f"past the quota, a clear error that says how much is used: {text_of(r)!r}")
            r = await call(s, "rollback_sandbox", sandbox_id=sid, checkpoint_id=c1)
            check(not r.is_error, "a kept checkpoint still rolls back")
            server.note_vmms()
    check_store_consistent(port)

    # 3. SIGKILL while a pause is being written.
    killed = server_on(port, tokens, "--pause-after", "1s")
    killed.__enter__()
    try:
        async with killed.session("alice", modern=True) as s:
            # One call sets x and dirties enough memory that the pause after
            # it takes a while to write; no pause can come in between.
            code = "import os\nx = 5\nbig = os.urandom(1 << 20) * 96\nopen('/tmp/big', 'wb').write(big[: 32 << 20])\nprint('dirty', x)"
            r = await run(s, code, sandbox_id=sid, timeout=FIRST_CALL_TIMEOUT)
            check("dirty 5" in text_of(r), f"the sandbox runs again and dirtied its memory: {text_of(r)!r}")
        staging = os.path.join(store_dir(port), ".staging")
        deadline = time.monotonic() + 120
        seen = None
        while time.monotonic() < deadline and seen is None:
            for overlay in glob.glob(os.path.join(staging, "*", "memory.overlay")):
                if os.path.getsize(overlay) > 0:
                    seen = overlay
            time.sleep(0.01)
        check(seen is not None, "a pause began writing")
        assert killed.proc is not None
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(timeout=30)
        log(f"SIGKILLed the server while {seen} was being written")
    finally:
        if killed.proc is not None and killed.proc.poll() is None:
            killed.proc.kill()
        os.unlink(killed.tokens_path)

    with server_on(port, tokens) as server:
        check_store_consistent(port)
        async with server.session("alice", modern=True) as s:
            r = await run(s, "import os\nprint(x, open('f.txt').read(), os.path.exists('/tmp/big'))", sandbox_id=sid, timeout=FIRST_CALL_TIMEOUT)
            t = text_of(r)
            if "5 one True" in t:
                check(False, f"the pause finished before the kill, so this run did not test a cut pause: {t!r}")
            check(not r.is_error and "1 one False" in t, f"after the kill, the sandbox is back from its last complete state: {t!r}")
            check("stopped unexpectedly" in t, f"and the result says it came back older: {t!r}")
            r = await run(s, "print(x)", sandbox_id=sid)
            check("stopped unexpectedly" not in text_of(r), "said once")
            server.note_vmms()
    log("ok: checkpoint_test passed")


anyio.run(main)
