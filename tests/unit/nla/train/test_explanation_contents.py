"""scripts/explanation_contents.py on a tiny model: every form is rendered, parses where it is a sentence, and is
scored by the frozen reader with a fitted head on documents the head was not fitted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from train_corpus import tiny_data_config, write_modern_records

from talkative.nla.lm import load_lm
from talkative.nla.train.data import build_dataset


def test_the_content_measurement_scores_every_form(tmp_path, tiny_llama_dir):
    write_modern_records(tmp_path / "modern.jsonl", families=12)
    cfg = tiny_data_config(
        tmp_path / "modern.jsonl",
        str(tiny_llama_dir),
        corpora=[f"modern:{tmp_path / 'modern.jsonl'}"],
        heldout_fraction=0.2,
        predictions=True,
        top_k=5,
        max_windows=120,
    )
    build_dataset(cfg, load_lm(str(tiny_llama_dir), progress=False), tmp_path / "ds", progress=False)
    out = tmp_path / "contents.json"
    script = Path(__file__).resolve().parents[4] / "scripts" / "explanation_contents.py"
    args = ["--data", str(tmp_path / "ds"), "--layer", "1", "--samples", "200", "--dtype", "float32"]
    subprocess.run([sys.executable, str(script), *args, "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    forms = {row["form"]: row for row in report["forms"]}
    assert report["samples_fit"] + report["samples_scored"] == 200
    assert forms["genre + next 2 + reading 6"]["tokens_max"] <= 24
    assert forms["blank (spaces: the current token alone)"]["tokens_mean"] == 0
    assert all(row["fve"] == row["fve"] for row in report["forms"])  # finite, not NaN
    assert "| genre |" in out.with_suffix(".md").read_text()
