"""A gateway that is not root: `airlock serve` over stdio as an unprivileged
user jails each VMM in a user namespace of its own, and sandboxes work.

tests/mcp.rs prepares the user's cache (AIRLOCK_TEST_HOME: the image, built
by root, linked in; no template, so this gateway makes and seals its own) and
a KVM device node it may open (AIRLOCK_TEST_KVM_DEVICE). Run as root, the
server is started as AIRLOCK_TEST_AS_UID through setpriv; run as a user, as
that user.
"""

from __future__ import annotations

import os

import anyio
from harness import AIRLOCK, FIRST_CALL_TIMEOUT, check, children, cmdline, log, run, text_of, wait_gone
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

HOME = os.environ["AIRLOCK_TEST_HOME"]
KVM = os.environ["AIRLOCK_TEST_KVM_DEVICE"]
AS_UID = os.environ.get("AIRLOCK_TEST_AS_UID", "")
CANARY = "AIRLOCK_TOKENS"


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def status(task: str) -> dict[str, str]:
    with open(f"{task}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def server_pid() -> int:
    """The serve process: a child of this one (setpriv execs airlock in place)."""
    for c in children(os.getpid()):
        args = cmdline(c)
        if AIRLOCK in args and "serve" in args:
            return c
    raise AssertionError("no airlock serve process")


def check_vmm(pid: int, uid: int) -> None:
    tasks = [f"/proc/{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task")]
    check(len(tasks) >= 4, f"the VMM runs its threads ({len(tasks)})")
    for task in tasks:
        s = status(task)
        name = s["Name"]
        check(s["Seccomp"] == "2", f"thread {name}: seccomp filter")
        check(s["NoNewPrivs"] == "1", f"thread {name}: no_new_privs")
        check(s["CapEff"] == "0000000000000000", f"thread {name}: no capability left")
        check(s["Uid"].split() == [str(uid)] * 4, f"thread {name}: runs as uid {uid} ({s['Uid']})")
    check(ns(pid, "user") != ns("self", "user"), "the VMM has a user namespace of its own")
    for kind in ("mnt", "pid", "net", "ipc", "uts"):
        check(ns(pid, kind) != ns("self", kind), f"the VMM has its own {kind} namespace")
    root, host = os.stat(f"/proc/{pid}/root"), os.stat("/")
    check((root.st_dev, root.st_ino) != (host.st_dev, host.st_ino), "the VMM's root is the jail's")
    # snapshot/: where a pause to disk saves this VM, empty until one does.
    jail = f"/proc/{pid}/root"
    check(sorted(os.listdir(jail)) == ["kernel", "rootfs", "run", "snapshot", "template"], f"the jail holds only the VM's files: {sorted(os.listdir(jail))}")
    check(os.listdir(f"{jail}/snapshot") == [], "its pause directory is empty while it runs")
    if os.geteuid() == 0:
        with open(f"/proc/{pid}/environ", "rb") as f:
            check(CANARY.encode() not in f.read(), f"the VMM's environment has no {CANARY}")


async def main() -> None:
    uid = int(AS_UID) if AS_UID else os.geteuid()
    command, args = AIRLOCK, ["serve"]
    if AS_UID:
        command, args = "setpriv", [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", AIRLOCK, "serve"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": HOME,
        "AIRLOCK_HOME": HOME,
        "AIRLOCK_KVM_DEVICE": KVM,
        CANARY: "canary-secret-token",
    }
    env.update({k: v for k, v in os.environ.items() if k in ("TMPDIR", "AIRLOCK_LOG", "AIRLOCK_AGENT")})
    params = StdioServerParameters(command=command, args=args, env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            server = server_pid()
            check(os.stat(f"/proc/{server}").st_uid == uid, f"the gateway runs as uid {uid}")

            # The first call makes this user's template (its VMM jailed too), then restores.
            r = await run(s, "x = 6\nprint(x * 7)", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error and text_of(r).splitlines()[0] == "42", f"run_code works: {text_of(r)!r}")

            vmms = [p for p in descendants(server) if "vmm" in cmdline(p) and ns(p, "pid") != ns("self", "pid")]
            check(vmms, "the sandbox runs in a jail's PID namespace")
            # The jail's supervisor and the VMM under it: the VMM has the vCPU threads.
            vmm = max(vmms, key=lambda p: len(os.listdir(f"/proc/{p}/task")))
            check_vmm(vmm, uid)

            r = await run(s, "print(x + 1)")
            check(not r.is_error and text_of(r).splitlines()[0] == "7", f"state survives between calls: {text_of(r)!r}")
    wait_gone(vmms, 30, "after the client left")
    log("PASS unprivileged_test")


if __name__ == "__main__":
    anyio.run(main)
