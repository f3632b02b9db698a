"""`talkative analyze "TEXT"`: a readable table of every token's explanation and metrics, or `--json` rows; with
`--input items.jsonl --output rows.jsonl`, a file of items as one batch on a server (`analyze_batch.py`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..nla.metrics import MetricTable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="text to analyse (or use --messages)")
    p.add_argument("--messages", type=Path, help="JSON file with a list of {role, content} chat messages")
    p.add_argument(
        "--checkpoint", help="NLA checkpoint (native, upstream .pt or official); default: the demo checkpoint"
    )
    p.add_argument(
        "--layer",
        type=int,
        help="layer for an untrained NLA (a trained checkpoint fixes its own; without --checkpoint, a layer "
        "other than the demo checkpoint's uses an untrained NLA)",
    )
    p.add_argument(
        "-k", "--best-of-k", type=int, default=8, help="explanations sampled per position (default 8)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 for greedy (default 1.0)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-kl", action="store_true", help="skip the KL divergence")
    p.add_argument("--no-salience", action="store_true", help="skip per-token salience")
    p.add_argument("--logit-lens", action="store_true", help="add logit-lens top tokens")
    p.add_argument("--last-n-messages", type=int, help="with --messages: analyse only the last N messages")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["float32", "bfloat16", "auto"],
        help="model weights dtype (default auto: bfloat16 where this machine computes it natively, else float32)",
    )
    p.add_argument("--json", action="store_true", help="print the rows (and metadata) as JSON")
    p.add_argument("--server", help="analyse on a running Talkative server at this URL instead of locally")
    p.add_argument(
        "--input",
        type=Path,
        help="a JSONL file of items ({id, text | messages, options?} per line) to analyse as one batch on a "
        "server (--server, default http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="with --input: the JSONL file each item's result is appended to as it arrives (re-running the same "
        "command skips the items already in it)",
    )
    p.add_argument("--api-key", help="API key for --server (default: $TALKATIVE_API_KEY)")
    p.add_argument("--model-id", help="with --server: the model to use (default: the server's current model)")
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow unpickling an upstream .pt that needs it"
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "seed": args.seed,
        "no_kl": args.no_kl,
        "calculate_token_salience": not args.no_salience,
        "logit_lens_analysis": args.logit_lens,
        "temperature": args.temperature,
        "optimize_explanations_config": {"best_of_k": args.best_of_k},
    }
    if args.last_n_messages is not None:
        opts["last_n_messages"] = args.last_n_messages
    return opts


def _inputs(args: argparse.Namespace) -> tuple[str | None, list[dict[str, str]] | None]:
    if args.messages is not None:
        if args.text:
            raise SystemExit("give either TEXT or --messages, not both")
        data = json.loads(args.messages.read_text())
        if not isinstance(data, list):
            raise SystemExit(f"{args.messages} must hold a JSON list of {{role, content}} messages")
        return None, data
    if not args.text:
        raise SystemExit("nothing to analyse: give TEXT or --messages")
    return args.text, None


def run(args: argparse.Namespace) -> int:
    if args.input is not None or args.output is not None:
        if args.input is None or args.output is None:
            raise SystemExit("give --input and --output together")
        if args.text or args.messages:
            raise SystemExit("give either TEXT / --messages or --input, not both")
        from . import analyze_batch

        return analyze_batch.run(args, _options(args))
    text, messages = _inputs(args)
    options = _options(args)
    if args.server:
        rows, meta = _remote(args, text, messages, options)
    else:
        rows, meta = _local(args, text, messages, options)
    if args.json:
        json.dump({"tokens": rows, "metadata": meta}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(rows, meta)
    return 0


def _local(
    args: argparse.Namespace, text: str | None, messages: Any, options: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ..defaults import default_checkpoint_spec, demo_checkpoint
    from ..nla.analysis import AnalysisError, analyze
    from ..nla.checkpoint import CheckpointError
    from ..nla.formats.native import read_config
    from ..nla.loading import open_nla
    from ..nla.precision import resolve_dtype
    from ..nla.sources import DEFAULT_SOURCE, ModelSourceError

    spec = args.checkpoint or default_checkpoint_spec()
    demo = demo_checkpoint()
    demo_layer = int(read_config(demo)["layer"]) if demo is not None else None
    if args.checkpoint is None and args.layer is not None and demo_layer not in (None, args.layer):
        # `--layer N` alone asks for that layer: the demo explains another one, so an untrained NLA it is
        print(
            f"note: the demo checkpoint explains layer {demo_layer}; layer {args.layer} uses an untrained NLA",
            file=sys.stderr,
        )
        spec = f"init:{DEFAULT_SOURCE}@{args.layer}"
    try:
        dtype = resolve_dtype(args.dtype, "cpu")
        nla = open_nla(spec, dtype=dtype, layer=args.layer, trust_checkpoint=args.trust_checkpoint)
        result = analyze(nla, text, messages, options)
    except (AnalysisError, CheckpointError, ModelSourceError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return result.rows, result.metadata


def _remote(
    args: argparse.Namespace, text: str | None, messages: Any, options: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ..client import Client

    with Client(args.server, api_key=args.api_key) as client:
        result = client.analyze(text=text, messages=messages, options=options, model_id=args.model_id)
    return result.tokens, result.metadata


def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any], table: MetricTable | None = None) -> None:
    """The rows as a terminal table: every metric but those derived from another (`nmse` repeats the cosine),
    then the summary line of the headline metrics. `table` defaults to the engine's metric table."""
    from rich.console import Console
    from rich.table import Table

    from ..nla.metrics import METRICS

    table = METRICS if table is None else table
    shown = table.shown("headline", "detail")
    out = Table(
        title=f"{meta.get('model', '')} · layer {meta.get('layer')} · k={meta.get('best_of_k')}",
        show_lines=False,
    )
    out.add_column("pos", justify="right")
    out.add_column("token", justify="left")
    out.add_column("explanation", justify="left")
    for m in shown:
        out.add_column(m.cli, justify="right")
    for r in rows:
        out.add_row(
            str(r["position"]),
            repr(r["token"]),
            (r["explanation"] or "").replace("\n", "⏎"),
            *(_fmt(r.get(m.name), m.digits) for m in shown),
        )
    console = Console()
    console.print(out)
    summary = meta.get("summary") or {}
    if summary:
        means = ", ".join(f"{m.cli} {_fmt(summary.get(m.summary_key))}" for m in table.shown("headline"))
        console.print(
            f"means over {summary.get('positions_in_summary')} positions "
            f"({summary.get('positions_excluded')} flagged positions left out): {means}"
        )
