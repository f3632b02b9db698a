"""`talkative analyze` in a subprocess, offline: JSON rows, the rich table, options and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from talkative.nla.explanations import parse

pytestmark = pytest.mark.integration

TEXT = "The capital of France is Paris."
TOKENS = ["The", " capital", " of", " France", " is", " Paris", "."]
FIELDS = {
    "position",
    "token",
    "token_id",
    "explanation",
    "explanation_structured",
    "token_salience",
    "mse",
    "relative_rmse",
    "cosine",
    "nmse",
    "fve",
    "kl_divergence",
    "logit_lens_top",
    "tuned_lens_top",
    "layer",
}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT",)}
    # offline: the hub is switched off and, should anything try anyway, points nowhere
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", COLUMNS="200")
    env.update(extra)
    return env


def talkative(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "talkative.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.mark.slow
def test_analyze_json_on_a_fresh_machine(tmp_path):
    """Defaults (the committed demo NLA, layer 12, explanations of 24 tokens; k=8, salience, KL), and an empty model
    cache: the bundled model is converted on the way, with its progress on stderr and nothing but JSON on stdout."""
    proc = talkative("analyze", TEXT, "--json", env=_env(TALKATIVE_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows, meta = out["tokens"], out["metadata"]
    assert [r["token"] for r in rows] == TOKENS
    assert [r["position"] for r in rows] == list(range(7))
    for r in rows:
        assert set(r) >= FIELDS
        assert r["layer"] == 12 and r["explanation"]
        assert len(r["token_salience"]) == 24 and len(r["explanation_structured"]) == 24
        assert parse(r["explanation"]) is not None  # the default samples in its explanation language
        assert r["mse"] > 0 and r["relative_rmse"] > 0 and -1 <= r["cosine"] <= 1
        assert r["kl_divergence"] >= 0
    assert meta["best_of_k"] == 8 and meta["layer"] == 12 and meta["seed"] == 42
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / ".talkative-complete").is_file()
    # the same command again gives the same rows (seeded), now from the cached conversion
    again = talkative("analyze", TEXT, "--json", env=_env(TALKATIVE_CACHE=str(tmp_path / "cache")))
    assert json.loads(again.stdout)["tokens"] == rows


def test_analyze_table():
    proc = talkative("analyze", TEXT, "-k", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "layer 12" in out and "k=2" in out
    for col in ("pos", "token", "explanation", "mse", "rel rmse", "cos", "KL"):
        assert col in out
    for tok in TOKENS:
        assert repr(tok) in out
    # every position of a 7-token text is flagged (positions < 10 are early), so no mean is taken, and the
    # line says why rather than averaging known-noisy rows
    assert "means over 0 positions (7 flagged positions left out)" in out


def test_analyze_options_and_messages(tmp_path):
    msgs = tmp_path / "chat.json"
    msgs.write_text(
        json.dumps([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}])
    )
    proc = talkative(
        "analyze",
        "--messages",
        str(msgs),
        "--last-n-messages",
        "1",
        "--layer",
        "5",
        "-k",
        "1",
        "--no-kl",
        "--no-salience",
        "--logit-lens",
        "--temperature",
        "0",
        "--seed",
        "3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer 5 uses an untrained NLA" in proc.stderr  # the demo explains layer 12
    out = json.loads(proc.stdout)
    rows = out["tokens"]
    assert (
        out["metadata"]["layer"] == 5
        and out["metadata"]["best_of_k"] == 1
        and out["metadata"]["temperature"] == 0
    )
    assert "".join(r["token"] for r in rows) == "<|im_start|>assistant\nHello."
    assert all(
        r["kl_divergence"] is None and r["token_salience"] is None and r["logit_lens_top"] for r in rows
    )


def test_analyze_a_saved_checkpoint(tmp_path, smollm2):
    from talkative.nla.checkpoint import NLA
    from talkative.nla.sources import DEFAULT_SOURCE

    NLA.init(smollm2, 3, subject_source=DEFAULT_SOURCE, t_text=4, name="mine").save(tmp_path / "ckpt")
    proc = talkative("analyze", "Hi there.", "--checkpoint", str(tmp_path / "ckpt"), "-k", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["metadata"]["model"] == "mine" and out["metadata"]["layer"] == 3
    assert all(len(r["explanation_structured"]) == 4 for r in out["tokens"])
    wrong = talkative("analyze", "Hi there.", "--checkpoint", str(tmp_path / "ckpt"), "--layer", "4")
    assert wrong.returncode != 0 and "explains layer 3" in wrong.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze"], "nothing to analyse"),
        (["analyze", "   "], "the text is empty"),
        (["analyze", "Hi", "-k", "0"], "best_of_k"),
        (["analyze", "Hi", "--temperature", "5"], "temperature"),
        (["analyze", "Hi", "--last-n-messages", "1"], "last_n_messages applies to chat messages only"),
        (["analyze", "Hi", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["analyze", "Hi", "--checkpoint", "init:SomeOrg/some-model@3"], "local path"),
    ],
)
def test_analyze_errors_are_one_clear_line(args, message):
    proc = talkative(*args, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_lists_refuses_and_runs_the_engine_against_the_naive_path():
    """`talkative bench` finds bench/*.py; the analyze benchmark's --check compares the engine with upstream's
    algorithm written with plain HF calls (greedy, fp32): same explanations, MSE, salience and KL."""
    listing = talkative("bench")
    assert listing.returncode == 0 and all(n in listing.stdout for n in ("analyze", "serve", "load"))
    unknown = talkative("bench", "nope")
    assert unknown.returncode == 2 and "no benchmark 'nope'" in unknown.stderr
    check = talkative("bench", "analyze", "--check", "--dtypes", "fp32", "--threads", "1")
    assert check.returncode == 0, check.stderr[-2000:]
    assert "greedy explanations identical; their MSE, salience and KL agree" in check.stdout
