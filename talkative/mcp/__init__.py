"""Talkative as tools for agents, over the Model Context Protocol (the official `mcp` SDK).

* `tools.py`: the tools (list_models, analyze, tokenize, extract, describe, score, …), each written once over
  `talkative.client.AsyncClient`, with documented input schemas and errors that carry the server's reason;
* `shapes.py`: what they take and return (compact analysis rows, vectors as base64 float32);
* `remote.py`: `talkative mcp`, the tools over stdio, calling a running server over the network.

The server's own `/mcp` endpoint (streamable HTTP) is `talkative/serve/api/mcp.py`: the same tools, whose client
sends each request through the server's own middleware and routes as the caller. Nothing here imports the engine
or the web server, so an agent's stdio process starts in a moment.
"""

from .tools import Connector, Tools, build_server

__all__ = ["Connector", "Tools", "build_server"]
