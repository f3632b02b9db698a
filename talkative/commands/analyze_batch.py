"""`talkative analyze --input items.jsonl --output rows.jsonl`: a file of items analysed as one batch on a server.

Every item's result is appended to `--output` as one JSON line the moment the server has it (completion order,
`line` = the item's line in `--input`). Resumable: the rows already in `--output` are never asked for again. A
sidecar file (`<output>.batch`) names the batch in progress, so a run interrupted (Ctrl-C, a lost connection) picks
up the same batch's remaining results; items the output lacks and no batch holds any more are submitted anew.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

#: `--server` when none is given: the address `talkative serve` listens on by default
LOCAL_SERVER = "http://127.0.0.1:8000"


@dataclass
class Line:
    """A non-blank line of the input: its number, its text, and its item id when it has one."""

    number: int
    text: str
    item_id: Any


def read_input(path: Path) -> list[Line]:
    out = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        item_id = data.get("id") if isinstance(data, dict) else None
        out.append(Line(number, text, item_id if isinstance(item_id, str | int) else None))
    return out


def read_done(path: Path) -> tuple[set[str], set[int]]:
    """Ids (as JSON text) and input line numbers of the rows `--output` already holds; a torn last line (the
    previous run stopped while writing it) is dropped so that its item is asked for again."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not path.exists():
        return ids, lines
    good: list[str] = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        good.append(text)
        if row.get("id") is not None:
            ids.add(json.dumps(row["id"]))
        if isinstance(row.get("line"), int):
            lines.add(row["line"])
    path.write_text("".join(t + "\n" for t in good), encoding="utf-8")
    return ids, lines


def _todo(lines: list[Line], ids: set[str], numbers: set[int]) -> list[Line]:
    return [
        ln
        for ln in lines
        if not (ln.item_id is not None and json.dumps(ln.item_id) in ids) and ln.number not in numbers
    ]


def run(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from ..client import APIError, Client

    source, out = Path(args.input), Path(args.output)
    if not source.is_file():
        raise SystemExit(f"error: {source} does not exist")
    sidecar = out.with_name(out.name + ".batch")
    lines = read_input(source)
    ids, numbers = read_done(out)
    todo = _todo(lines, ids, numbers)
    already = len(lines) - len(todo)
    if already:
        print(f"{already} items already in {out}; {len(todo)} to go", file=sys.stderr)
    if not todo:
        sidecar.unlink(missing_ok=True)
        return 0
    server = args.server or LOCAL_SERVER
    try:
        with Client(server, api_key=args.api_key, max_retries=2) as client:
            batch_id, upload = _batch_for(client, sidecar, server, todo, options, args.model_id)
            _follow(client, batch_id, upload, out, ids, numbers, len(todo))
    except httpx.ConnectError:
        raise SystemExit(
            f"error: no Talkative server answers at {server}: start one with `talkative serve`, or name one "
            "with --server URL"
        ) from None
    except APIError as exc:
        raise SystemExit(f"error: the server refused the batch: {exc.detail}") from None
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: run the same command again to carry on ({sidecar} names the batch)",
            file=sys.stderr,
        )
        return 130
    sidecar.unlink(missing_ok=True)
    return 0


def _batch_for(
    client: Any, sidecar: Path, server: str, todo: list[Line], options: dict[str, Any], model_id: str | None
) -> tuple[str, list[int]]:
    """The batch that holds the items to do: the one the sidecar names when it is still on the same server and
    covers them, else a new one. Returns its id and, per line of its upload, the input's line number."""
    from ..client import APIError

    if sidecar.exists():
        saved = json.loads(sidecar.read_text())
        wanted = {ln.number for ln in todo}
        if saved.get("server") == server and wanted <= set(saved.get("lines", [])):
            try:
                client.batch_status(saved["batch_id"])
            except APIError as exc:
                if exc.status != 404:
                    raise
            else:
                print(f"resuming batch {saved['batch_id']}", file=sys.stderr)
                return saved["batch_id"], saved["lines"]
    run = client.batch_jsonl("\n".join(ln.text for ln in todo) + "\n", options=options, model_id=model_id)
    upload = [ln.number for ln in todo]
    sidecar.write_text(json.dumps({"batch_id": run.batch_id, "server": server, "lines": upload}))
    print(f"submitted batch {run.batch_id} ({run.total} items) to {server}", file=sys.stderr)
    return run.batch_id, upload


def _follow(
    client: Any, batch_id: str, upload: list[int], out: Path, ids: set[str], numbers: set[int], total: int
) -> None:
    """Append each result as it comes (its `line` mapped back to the input's), with a progress bar of items,
    positions per second and the time left."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("items"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} positions/s"),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
    )
    started, positions, failed = time.monotonic(), 0, 0
    with Progress(*columns, console=Console(stderr=True)) as bar, out.open("a", encoding="utf-8") as sink:
        task = bar.add_task("batch", total=total, rate="-", failed=0)
        for item in client.batch_results(batch_id):
            row = dict(item.raw)
            if isinstance(row.get("line"), int) and 0 < row["line"] <= len(upload):
                row["line"] = upload[row["line"] - 1]
            key = json.dumps(row.get("id")) if row.get("id") is not None else None
            if (key is not None and key in ids) or row.get("line") in numbers:
                continue  # written by an earlier run
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            positions += len(item.tokens)
            failed += not item.ok
            rate = positions / max(time.monotonic() - started, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f}", failed=failed)
