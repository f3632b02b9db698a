"""`talkative mcp`: Talkative's tools for an agent over stdio (MCP), calling a running server.

A desktop agent starts it as a subprocess (e.g. `{"command": "talkative", "args": ["mcp", "--server",
"http://127.0.0.1:8000"]}`) and talks MCP on its stdin/stdout; nothing else is written to stdout. The server
does the work, with its keys, limits and ownership; `--api-key` (or $TALKATIVE_API_KEY) is the agent's key.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "TALKATIVE_SERVER"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
        help=f"the Talkative server's URL (default: ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    p.add_argument("--api-key", default=None, help="an API key of that server (default: $TALKATIVE_API_KEY)")
    p.add_argument(
        "--timeout", type=float, default=330.0, help="seconds one request to the server may take (330)"
    )


def run(args: argparse.Namespace) -> int:
    import anyio

    from ..mcp.remote import serve_stdio

    anyio.run(serve_stdio, args.server, args.api_key, args.timeout)
    return 0
