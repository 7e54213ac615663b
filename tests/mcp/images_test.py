"""Streamable HTTP: two custom images served side by side (tests/common/
test_images.rs builds them). Each conversation gets the image it picks, or
its principal's default; the data image's module is pre-loaded in its warm
Python, its Debian package and environment are there; the OCI image shows
its layers' whiteouts and overrides; a principal limited to one image cannot
pick another, and an existing sandbox keeps its image."""

from __future__ import annotations

import os
import tempfile

import anyio
from harness import FIRST_CALL_TIMEOUT, HttpServer, call, check, log, run, text_of

DATA, OCI = "test-data", "test-oci"


async def main() -> None:
    fd, config = tempfile.mkstemp(prefix="airlock-config-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(f'[principals.bob]\nimages = ["{OCI}"]\n')
    with HttpServer("--pool-size", "1", "--image", DATA, "--image", OCI, "--config", config, tokens=["alice", "bob"]) as server:
        async with server.session("alice") as a, server.session("bob") as b, server.session("alice") as a2:
            # alice without `image`: the server's first, the data image.
            r = await run(
                a,
                "import sys\nprint('preloaded', 'airlock_demo' in sys.modules)\nimport airlock_demo\nprint(airlock_demo.GREETING)",
                timeout=FIRST_CALL_TIMEOUT,
            )
            out = text_of(r)
            check(not r.is_error and "preloaded True" in out, f"the wheel's module is already imported in a fresh sandbox: {out!r}")
            check("hello from a local wheel" in out, "the local wheel is installed")
            r = await call(a, "run_command", command="jq --version; echo \"$DEMO_GREETING\"; cat /etc/airlock-test/motd.txt")
            out = text_of(r)
            check(not r.is_error and "jq-" in out, f"the recipe's Debian package runs: {out!r}")
            check("hello from the recipe" in out, "the recipe's environment reaches code")
            check("copied in by the recipe" in out, "the recipe's file is in the image")
            r = await call(a, "sandbox_info")
            info = r.structured_content
            check(info["image"] == DATA and info["images"] == [DATA, OCI], f"sandbox_info names the image and the images served: {info['image']}, {info['images']}")
            r = await run(a, "1", image=OCI)
            check(r.is_error and "runs the image" in text_of(r), f"an existing sandbox keeps its image: {text_of(r)!r}")

            # bob may use only the OCI image: it is his default.
            r = await call(
                b,
                "run_command",
                command='[[ -e /etc/deleted ]] && echo deleted-present || echo deleted-absent; echo "layered: $(< /etc/layered)"; echo "$DEMO_GREETING"',
                timeout=FIRST_CALL_TIMEOUT,
            )
            out = text_of(r)
            check(not r.is_error and "deleted-absent" in out, f"the whiteout's file is absent in the guest: {out!r}")
            check("layered: from layer 2" in out, "a later layer's file overrides an earlier one's")
            check("hello from an OCI base" in out, "the OCI image's recipe environment reaches code")
            r = await run(b, "print(1)")
            check(r.is_error and "has no python" in text_of(r).lower(), f"Python is refused by name in an image without it: {text_of(r)!r}")
            r = await call(b, "sandbox_info")
            info = r.structured_content
            check(info["image"] == OCI and info["images"] == [OCI], f"bob's sandbox runs the OCI image, the only one he may use: {info['image']}, {info['images']}")

            # A second conversation of alice picks the OCI image.
            r = await call(a2, "run_command", command='echo "$(< /etc/layered)"', image=OCI, timeout=FIRST_CALL_TIMEOUT)
            check(not r.is_error and "from layer 2" in text_of(r), f"a conversation picks the other image: {text_of(r)!r}")

        # bob cannot pick the data image; a name no one serves is refused.
        async with server.session("bob") as b2, server.session("alice") as a3:
            r = await run(b2, "1", image=DATA)
            check(r.is_error and "not allowed" in text_of(r), f"bob's allowlist holds: {text_of(r)!r}")
            r = await run(a3, "1", image="no-such-image")
            check(r.is_error and "does not serve" in text_of(r), f"an image not served is refused by name: {text_of(r)!r}")
    os.unlink(config)
    log("images_test: all checks passed")


anyio.run(main)
