"""`talkative` command line: serve | analyze | models | train | eval | convert | inspect | bench | mcp.

Subcommands live in their own modules and are imported only when used, so `talkative --help` stays fast and
`talkative analyze` never imports the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# name -> (module, help); each module defines `add_arguments(parser)` and `run(args) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("talkative.commands.serve", "run the analysis server (REST, WebSocket and web UI)"),
    "analyze": ("talkative.commands.analyze", "explain every token of a text and score the explanations"),
    "models": ("talkative.commands.models", "list model groups, prepare the bundled model"),
    "train": (
        "talkative.commands.train",
        "train an NLA (stages ar-sft, av-sft, grpo) or extract activations",
    ),
    "eval": ("talkative.commands.evaluate", "evaluate a checkpoint on held-out activations"),
    "convert": ("talkative.commands.convert", "convert a checkpoint between formats"),
    "inspect": ("talkative.commands.inspect", "describe a checkpoint of any format"),
    "bench": ("talkative.commands.bench", "run a benchmark from bench/"),
    "mcp": ("talkative.commands.mcp", "give an agent Talkative's tools over stdio (MCP), via a server"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(
        prog="talkative", description="Natural language autoencoders: explain activations in words."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    argv = sys.argv[1:]
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            runners[name] = mod.run
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser, runners = build_parser()
    args = parser.parse_args()
    if not args.command:
        parser.print_help()
        return 2
    return int(runners[args.command](args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
