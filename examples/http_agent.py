#!/usr/bin/env python3
"""A small agent loop against airlock's Streamable HTTP mode.

Start the server with a token, then run this script:

    echo "me:$(openssl rand -hex 24)" > tokens.txt
    airlock serve --http 127.0.0.1:8080 --tokens-file tokens.txt &
    pip install "mcp==2.3.0"
    AIRLOCK_TOKEN="$(cut -d: -f2 tokens.txt)" python3 examples/http_agent.py

It opens one MCP session (one sandbox), uploads a CSV, analyses it with
pandas across several run_code calls (variables persist between them),
saves a matplotlib chart it gets back as an image, and closes the session,
which destroys the sandbox. A real agent would let its model choose the
tool calls; the steps here are fixed so that the script runs unattended.
"""

from __future__ import annotations

import base64
import os
import sys

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

URL = os.environ.get("AIRLOCK_URL", "http://127.0.0.1:8080/mcp")
TOKEN = os.environ.get("AIRLOCK_TOKEN", "")

CSV = """city,month,rain_mm
Lisbon,Jan,100
Lisbon,Feb,90
Lisbon,Mar,70
Oslo,Jan,50
Oslo,Feb,40
Oslo,Mar,45
"""

STEPS = [
    ("write_file", {"path": "rain.csv", "content": CSV}),
    ("run_code", {"language": "python", "code": "import pandas as pd\ndf = pd.read_csv('rain.csv')\ndf.head()"}),
    ("run_code", {"language": "python", "code": "totals = df.groupby('city').rain_mm.sum()\ntotals"}),
    (
        "run_code",
        {
            "language": "python",
            "code": "import matplotlib.pyplot as plt\ntotals.plot.bar(title='Rain, Q1 (mm)')\nplt.tight_layout()\nplt.show()",
        },
    ),
    ("sandbox_info", {}),
]


async def main() -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
    # The first call of a fresh install waits for the warm template: allow minutes.
    http = create_mcp_http_client(headers=headers, timeout=httpx2.Timeout(30.0, read=1800.0))
    # A result holding a big file arrives as one server-sent event: allow
    # more than the SDK's default of 1 MiB.
    async with http, streamable_http_client(URL, http_client=http, max_sse_event_size=32 << 20) as (
        read,
        write,
    ):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            print(f"connected to {init.server_info.name} {init.server_info.version}")
            tools = [t.name for t in (await session.list_tools()).tools]
            print("tools:", ", ".join(tools))
            for name, arguments in STEPS:
                result = await session.call_tool(name, arguments, read_timeout_seconds=1800)
                what = str(arguments.get("code", arguments.get("path", ""))).splitlines()
                print(f"\n>>> {name} {what[0] if what else ''}")
                for block in result.content:
                    if block.type == "text":
                        print(block.text)
                    elif block.type == "image":
                        path = "rain.png"
                        with open(path, "wb") as f:
                            f.write(base64.b64decode(block.data))
                        print(f"[saved the {block.mime_type} image to {path}]")
                if result.is_error:
                    print("the tool reported an error; a model would now adjust its next call")
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
