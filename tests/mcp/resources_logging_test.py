"""Streamable HTTP: a sandbox's files as MCP resources (listed, read byte
for byte as text or blob, refused to another principal), and MCP logging
(notifications about the session's own sandbox, filtered by the level the
session sets, never another session's)."""

from __future__ import annotations

import base64
import os
import warnings

import anyio
from harness import FIRST_CALL_TIMEOUT, HttpServer, call, check, log, run
from mcp.shared.exceptions import MCPError

warnings.simplefilter("ignore")  # logging/setLevel is deprecated as of 2026-07-28

BINARY = bytes(range(256)) * 64 + os.urandom(4096)
TEXT = "naïve café, line 1\nline 2 — ünïcödé\n"


class Inbox:
    """The log messages one session received."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    async def __call__(self, params) -> None:
        self.messages.append((params.level, str(params.data)))
        log(f"  log[{params.level}] {params.data}")

    async def wait_for(self, fragment: str, seconds: float = 30.0) -> tuple[str, str]:
        with anyio.fail_after(seconds):
            while True:
                for m in self.messages:
                    if fragment in m[1]:
                        return m
                await anyio.sleep(0.1)

    def count(self, fragment: str) -> int:
        return sum(fragment in m[1] for m in self.messages)


async def read_error(session, uri: str) -> str | None:
    """The error a resource read gets, or None if it succeeds."""
    try:
        await session.read_resource(uri)
    except MCPError as e:
        return str(e)
    return None


async def main() -> None:
    with HttpServer("--pool-size", "1") as server:
        inbox_a, inbox_b = Inbox(), Inbox()
        async with server.session("alice", logging_callback=inbox_a) as a, server.session(
            "bob", logging_callback=inbox_b
        ) as b:
            caps = a.server_capabilities
            check(caps is not None and caps.logging is not None and caps.resources is not None,
                  "the server offers logging and resources")
            listed = await a.list_resources()
            check(listed.resources == [], "before its first call a conversation has no files, and no sandbox is made")
            templates = await a.list_resource_templates()
            check(any(t.uri_template.startswith("sandbox:///") for t in templates.resource_templates),
                  f"a sandbox:/// resource template is listed ({[t.uri_template for t in templates.resource_templates]})")

            # Logging: the sandbox's start reaches its own session only.
            await a.set_logging_level("info")
            r = await run(a, "print('hello')", timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error, "session a runs code")
            sandbox_id = r.structured_content["sandbox_id"] if r.structured_content and "sandbox_id" in r.structured_content else None
            started = await inbox_a.wait_for("started from the warm template")
            check(started[0] == "info", f"the start is an info message ({started})")
            if sandbox_id is None:
                info = await call(a, "sandbox_info")
                sandbox_id = info.structured_content["sandbox_id"]
            check(sandbox_id in started[1], "the message names the session's sandbox")

            # Resources: files written by write_file, byte for byte.
            r = await call(a, "write_file", path="data/blob.bin", content=base64.b64encode(BINARY).decode(), encoding="base64")
            check(not r.is_error, "a binary file is written")
            r = await call(a, "write_file", path="notes.txt", content=TEXT)
            check(not r.is_error, "a text file is written")
            listed = await a.list_resources()
            uris = {str(res.uri): res for res in listed.resources}
            log("resources:", sorted(uris))
            check("sandbox:///home/sandbox/notes.txt" in uris and "sandbox:///home/sandbox/data/blob.bin" in uris,
                  "resources/list shows the files under /home/sandbox")
            check(uris["sandbox:///home/sandbox/notes.txt"].mime_type == "text/plain"
                  and uris["sandbox:///home/sandbox/data/blob.bin"].size == len(BINARY),
                  "listed files carry their MIME type and size")
            text = await a.read_resource("sandbox:///home/sandbox/notes.txt")
            content = text.contents[0]
            check(getattr(content, "text", None) == TEXT and content.mime_type == "text/plain",
                  "a text file reads back as text, exactly")
            blob = await a.read_resource("sandbox:///home/sandbox/data/blob.bin")
            content = blob.contents[0]
            check(base64.b64decode(getattr(content, "blob", "")) == BINARY
                  and content.mime_type == "application/octet-stream",
                  f"a binary file reads back as a blob, byte for byte ({len(BINARY)} bytes)")
            by_id = await a.read_resource(f"sandbox://{sandbox_id}/home/sandbox/notes.txt")
            check(getattr(by_id.contents[0], "text", None) == TEXT, "the same file by sandbox id")

            # Another principal's session cannot read it, either way.
            for uri in ("sandbox:///home/sandbox/notes.txt", f"sandbox://{sandbox_id}/home/sandbox/notes.txt"):
                refused = await read_error(b, uri)
                check(refused is not None, f"bob cannot read alice's {uri} ({refused})")
            for bad in ("file:///etc/passwd", "sandbox:///home/sandbox/%zz", "sandbox:///nope/missing.txt"):
                refused = await read_error(a, bad)
                check(refused is not None, f"{bad} is refused with an error ({refused})")

            # setLevel decides what the session hears: at warning a reset
            # (a notice) is not told; at notice it is.
            await a.set_logging_level("warning")
            r = await call(a, "reset_sandbox")
            check(not r.is_error, "reset at level warning")
            await anyio.sleep(1.5)
            check(inbox_a.count("was reset") == 0, "at level warning the reset notice is not sent")
            await a.set_logging_level("notice")
            r = await call(a, "reset_sandbox")
            check(not r.is_error, "reset at level notice")
            await inbox_a.wait_for("was reset")
            check(inbox_a.count("was reset") == 1, "at level notice the reset notice is sent, once")
            check(not any(sandbox_id in m[1] for m in inbox_b.messages),
                  f"bob's session heard nothing of alice's sandbox ({inbox_b.messages})")


if __name__ == "__main__":
    anyio.run(main)
