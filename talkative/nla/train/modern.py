"""Modern training text: documents the subject writes itself, in the genres people type and paste into analysis.

The historical corpora (Shakespeare, the King James Bible, Webster 1913, reST) are far from what users analyse;
on modern prose, chat and code an NLA trained only on them explains worse. So the subject writes one document per
(genre, topic) pair from `modern_topics.txt` × `GENRES` (every genre has a few phrasings, picked per pair by a
hash), each record keeping its genre and prompt, so the genre is a fact an explanation can state and an
evaluation can check. A topic is a prompt family: its documents in every genre share a split side.

Generation is resumable (records are appended to a JSONL file; ids already there are skipped) and batched across
prompts (left-padded rows, each sampling from the seeded stream of its own document id, so a document's text does
not depend on the batch it was written in, up to floating-point rounding of the batched matmuls).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..kvcache import KVCache
from ..lm import LM
from ..prompts import end_of_turn_ids
from ..sampling import sample_next, step_seeds


@dataclass(frozen=True)
class Genre:
    key: str  # a key of explanations.GENRE_LABELS: how an explanation names it
    templates: tuple[str, ...]
    chat: bool = False  # the document is the rendered chat (user turn + reply), not the reply alone


GENRES: tuple[Genre, ...] = (
    Genre(
        "conversation",
        (
            "Can you tell me about {topic}?",
            "I have a question about {topic}. What should I know?",
            "Hi! Could you help me with something? It's about {topic}.",
        ),
        chat=True,
    ),
    Genre(
        "news",
        (
            "Write a short news report about {topic}.",
            "Write a newspaper article about {topic}, with a headline.",
            "Write a local news story about {topic}.",
        ),
    ),
    Genre(
        "story",
        (
            "Write a short story about {topic}.",
            "Tell a story for children about {topic}.",
            "Write the opening of a novel about {topic}.",
        ),
    ),
    Genre(
        "email",
        (
            "Write an email to a colleague about {topic}.",
            "Write a friendly email to a friend about {topic}.",
            "Write a short formal email about {topic}.",
        ),
    ),
    Genre(
        "recipe",
        (
            "Write a recipe inspired by {topic}, with ingredients and steps.",
            "Give me a simple recipe for a dish named after {topic}.",
            "Write a recipe card for a snack to enjoy with {topic}.",
        ),
    ),
    Genre(
        "instructions",
        (
            "Write step-by-step instructions for something related to {topic}.",
            "Write a how-to guide about {topic}.",
            "Explain in numbered steps how to get started with {topic}.",
        ),
    ),
    Genre(
        "product",
        (
            "Write a product description for an online shop selling something related to {topic}.",
            "Write an advertisement for a product about {topic}.",
            "Describe a new product inspired by {topic} for a catalogue.",
        ),
    ),
    Genre(
        "code",
        (
            "Write a short Python program with comments about {topic}.",
            "Write a commented Python function that could be used for {topic}.",
            "Write a small JavaScript example with comments about {topic}.",
        ),
    ),
    Genre(
        "qa",
        (
            "Write a question someone might ask about {topic}, then answer it.",
            "Write an FAQ entry about {topic}: a question and its answer.",
            "Q: What is interesting about {topic}? Write the question and a helpful answer.",
        ),
    ),
    Genre(
        "encyclopedia",
        (
            "Write an encyclopedia paragraph about {topic}.",
            "Write a factual, neutral paragraph for a reference book about {topic}.",
            "Write a short Wikipedia-style introduction to {topic}.",
        ),
    ),
    Genre(
        "dialogue",
        (
            "Write a dialogue between two people about {topic}.",
            "Write a short scene from a play in which two characters talk about {topic}.",
            "Write a conversation between a teacher and a student about {topic}, with speaker names.",
        ),
    ),
    Genre(
        "review",
        (
            "Write a customer review of something related to {topic}.",
            "Write a short review, with a star rating, of a product or place related to {topic}.",
            "Write a blog review about {topic}.",
        ),
    ),
)

GENRE_BY_KEY = {g.key: g for g in GENRES}


@dataclass(frozen=True)
class ModernPrompt:
    doc_id: str  # "<genre>/<topic index>", stable across runs
    genre: str
    family: str  # the topic: documents of one family are split together
    prompt: str
    seed_key: tuple[int, int]  # (genre index, topic index): the document's own sampling stream


def default_topics() -> list[str]:
    text = resources.files("talkative.nla.train").joinpath("modern_topics.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _pick(n: int, *parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "little") % n


def modern_prompts(topics: list[str] | None = None) -> list[ModernPrompt]:
    """Every (genre, topic) prompt, in a fixed order; each genre's phrasing is picked by a hash of the pair."""
    topics = topics or default_topics()
    out = []
    for t, topic in enumerate(topics):
        for g, genre in enumerate(GENRES):
            template = genre.templates[_pick(len(genre.templates), genre.key, topic)]
            out.append(
                ModernPrompt(
                    f"{genre.key}/{t:03d}", genre.key, f"topic:{t:03d}", template.format(topic=topic), (g, t)
                )
            )
    return out


def _done_ids(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    return {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}


def write_modern(
    lm: LM,
    out: Path,
    prompts: list[ModernPrompt] | None = None,
    *,
    batch: int = 8,
    max_new_tokens: int = 200,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """Append one record per prompt to `out` (JSONL), skipping ids already there: safe to stop and rerun."""
    prompts = prompts if prompts is not None else modern_prompts()
    done = _done_ids(out)
    todo = [p for p in prompts if p.doc_id not in done][:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    stops = end_of_turn_ids(lm)
    n = 0
    with open(out, "a") as fh, tqdm(total=len(todo), desc="writing documents", disable=not progress) as bar:
        for s in range(0, len(todo), batch):
            rows = todo[s : s + batch]
            messages = [[{"role": "user", "content": p.prompt}] for p in rows]
            rendered = [
                str(lm.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
                for m in messages
            ]
            replies, reasons = generate_batch(
                lm,
                [lm.encode(r) for r in rendered],
                step_seeds(seed, [p.seed_key for p in rows], max_new_tokens),
                stops,
                temperature=temperature,
                top_p=top_p,
            )
            for p, m, reply, reason in zip(rows, messages, replies, reasons, strict=True):
                reply = reply.strip()
                if GENRE_BY_KEY[p.genre].chat:
                    text = str(
                        lm.tokenizer.apply_chat_template(
                            [*m, {"role": "assistant", "content": reply}], tokenize=False
                        )
                    )
                else:
                    text = reply
                rec = {
                    "id": p.doc_id,
                    "genre": p.genre,
                    "family": p.family,
                    "prompt": p.prompt,
                    "reply": reply,
                    "finish_reason": reason,
                    "text": text,
                }
                fh.write(json.dumps(rec) + "\n")
                n += 1
            fh.flush()
            bar.update(len(rows))
    return n


def generate_batch(
    lm: LM,
    prompts: list[list[int]],
    seeds: torch.Tensor,
    stops: set[int],
    *,
    temperature: float,
    top_p: float,
) -> tuple[list[str], list[str]]:
    """Sample a continuation of each prompt (rows of different lengths) until a stop token or `seeds.shape[1]`.

    Prompts are left-padded; a pad slot gets position −1, which the cache's masks never attend to, and every row
    keeps its own positions, so a row computes what it would alone.
    """
    B, steps = len(prompts), seeds.shape[1]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(B, width, dtype=torch.long)
    pos = torch.full((B, width), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        pos[i, width - len(p) :] = torch.arange(len(p))
    lengths = torch.tensor([len(p) for p in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    reasons = ["length"] * B
    with torch.no_grad():
        cache = KVCache(B, width + steps, device=lm.device)
        h = lm.forward(
            lm.add_positions(lm.embed(ids.to(lm.device)), pos.to(lm.device)), pos.to(lm.device), cache=cache
        )
        logits = lm.logits(lm.final_norm(h[:, -1]))
        for t in range(steps):
            toks = sample_next(logits, temperature, seeds[:, t], top_p=top_p).tolist()
            for i, tid in enumerate(toks):
                if done[i]:
                    continue
                if tid in stops:
                    done[i], reasons[i] = True, "stop"
                else:
                    out[i].append(tid)
            if all(done):
                break
            at = (lengths + t).unsqueeze(1).to(lm.device)
            step = torch.tensor(toks, dtype=torch.long, device=lm.device).unsqueeze(1)
            h = lm.forward(lm.add_positions(lm.embed(step), at), at, cache=cache)
            logits = lm.logits(lm.final_norm(h[:, -1]))
    return [lm.tokenizer.decode(o, skip_special_tokens=False) for o in out], reasons


# -- reading the corpus back ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModernRecord:
    doc_id: str
    genre: str
    family: str
    text: str


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_shingles(text: str, n: int = 5) -> set[bytes]:
    """Digests of every run of `n` words (lower-cased): stable across processes, unlike `hash`."""
    w = _words(text)
    return {
        hashlib.blake2b(" ".join(w[i : i + n]).encode(), digest_size=8).digest()
        for i in range(max(0, len(w) - n + 1))
    }


def near_duplicates(texts: list[str], threshold: float = 0.5, n: int = 5) -> dict[int, int]:
    """Index of each text that is a near-copy of an earlier one -> that earlier index.

    Near-copy: the Jaccard similarity of their word 5-gram sets is at least `threshold`. A small model writing
    from similar prompts repeats itself (the same boilerplate reply, the same refusal); such pairs would be trained
    on twice, or leak across the split when they fall in different families.
    """
    index: dict[bytes, list[int]] = {}
    sets = [word_shingles(t, n) for t in texts]
    dropped: dict[int, int] = {}
    for i, s in enumerate(sets):
        shared: dict[int, int] = {}
        for h in s:
            for j in index.get(h, ()):
                shared[j] = shared.get(j, 0) + 1
        match = next(
            (j for j, c in sorted(shared.items()) if c / max(1, len(s) + len(sets[j]) - c) >= threshold), None
        )
        if match is not None:
            dropped[i] = match
            continue
        for h in s:
            index.setdefault(h, []).append(i)
    return dropped


def distinct_trigrams(text: str) -> float:
    """The share of distinct word 3-grams among a text's 3-grams: near 0 for a reply stuck in a loop."""
    w = _words(text)
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) / len(grams) if grams else 0.0


def read_modern(path: Path, *, min_words: int = 20, min_distinct: float = 0.3) -> Iterator[ModernRecord]:
    """The records of a modern-text JSONL, without near-duplicates, replies too short to be text, and replies
    stuck in a loop (a small model at temperature 0.7 sometimes repeats one line to the token limit: text nobody
    types, which would teach the explanations a genre that is no genre)."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [
        r
        for r in recs
        if len(_words(r["reply"])) >= min_words and distinct_trigrams(r["reply"]) >= min_distinct
    ]
    dropped = near_duplicates([r["reply"] for r in recs])
    for i, r in enumerate(recs):
        if i not in dropped:
            yield ModernRecord(r["id"], r["genre"], r["family"], r["text"])
