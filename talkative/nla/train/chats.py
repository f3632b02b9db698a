"""Chat transcripts written by the subject model itself, for training text in the chat format it will analyse.

Each prompt of `chat_prompts.txt` (written for this project) is answered by the subject; the transcript is kept
rendered with the subject's chat template (default system prompt included), exactly as a chat analysis sees it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from ..generation import GenerationRequest, generate
from ..lm import LM


def default_prompts() -> list[str]:
    text = resources.files("talkative.nla.train").joinpath("chat_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def write_chats(
    lm: LM,
    out: Path,
    prompts: list[str] | None = None,
    *,
    replies: int = 2,
    max_new_tokens: int = 200,
    seed: int = 0,
) -> int:
    """Append transcripts to `out` (JSONL), skipping prompts already done: safe to stop and rerun."""
    prompts = prompts or default_prompts()
    done: set[str] = set()
    if out.is_file():
        done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "a") as fh:
        for i, prompt in enumerate(tqdm(prompts, desc="writing chats", unit="prompt")):
            if all(f"{i:04d}-{r}" in done for r in range(replies)):
                continue
            messages = [{"role": "user", "content": prompt}]
            result = generate(
                lm,
                GenerationRequest(
                    messages=messages,
                    max_new_tokens=max_new_tokens,
                    temperature=0.7,
                    top_p=0.9,
                    seed=seed + i,
                    num_completions=replies,
                ),
            )
            for r, (reply, reason) in enumerate(zip(result.completions, result.finish_reasons, strict=True)):
                text = str(
                    lm.tokenizer.apply_chat_template(
                        [*messages, {"role": "assistant", "content": reply.strip()}], tokenize=False
                    )
                )
                rec = {
                    "id": f"{i:04d}-{r}",
                    "prompt": prompt,
                    "reply": reply,
                    "finish_reason": reason,
                    "text": text,
                }
                fh.write(json.dumps(rec) + "\n")
                n += 1
            fh.flush()
    return n
