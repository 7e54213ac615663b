#!/bin/sh
# Registers airlock with Claude Code as a stdio MCP server for this user.
# Usage: examples/claude-code.sh [path-to-airlock-binary]
set -eu
AIRLOCK="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/release/airlock}"
claude mcp add --scope user airlock -- "$AIRLOCK" serve
