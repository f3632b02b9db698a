"""Training on tiny models: data extraction, each stage end to end, exact resume after a kill, eval metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_corpus import tiny_data_config, write_corpus

from talkative.nla import metrics as M
from talkative.nla.checkpoint import NLA
from talkative.nla.lm import load_lm
from talkative.nla.loading import open_nla
from talkative.nla.sampling import step_seeds
from talkative.nla.train.config import load_config
from talkative.nla.train.data import ActivationSet, build_dataset
from talkative.nla.train.evaluate import evaluate, write_report
from talkative.nla.train.loop import Run
from talkative.nla.train.stages import train, warm_start_ids


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("train-data")
    write_corpus(root / "corpus", words=400, sentences=True)
    cfg = tiny_data_config(root / "corpus", str(tiny_llama_dir), max_windows_per_doc=10, predictions=True)
    lm = load_lm(str(tiny_llama_dir), progress=False)
    meta = build_dataset(cfg, lm, root / "ds", progress=False)
    return root / "ds", meta, lm, cfg


def _config(tmp: Path, ds: Path, tiny_dir: Path, stage: str, **kw) -> dict:
    cfg = {
        "stage": stage,
        "data": str(ds),
        "out": str(tmp / stage),
        "dtype": "float32",
        "steps": 8,
        "batch_size": 8,
        "lr": 5e-3,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_samples": 16,
        "log_every": 1,
        "group_size": 4,
        "arch": {"source": str(tiny_dir), "layer": 1, "t_text": 6, "patch_layers": 2, "head": "linear"},
    }
    cfg.update(kw)
    return cfg


def test_dataset_split_is_disjoint_by_document_and_activations_are_the_subjects(dataset):
    ds, meta, lm, cfg = dataset
    train, held = ActivationSet(ds / "train"), ActivationSet(ds / "heldout")
    assert meta["counts"]["train"] == len(train) > 0 and meta["counts"]["heldout"] == len(held) > 0
    assert not set(train.doc.tolist()) & set(held.doc.tolist())
    splits = {i: d["split"] for i, d in enumerate(meta["documents"])}
    assert {splits[i] for i in train.doc.tolist()} == {"train"}
    assert {splits[i] for i in held.doc.tolist()} == {"heldout"}
    assert int(train.pos.min()) >= cfg.min_position
    # every activation equals a straightforward HF forward over its window prefix
    for i in range(0, len(train), max(1, len(train) // 5)):
        toks = [t for t in train.ctx[i].tolist() if t >= 0]
        with torch.no_grad():
            ref = lm.model(torch.tensor([toks]), output_hidden_states=True).hidden_states[cfg.layer + 1][
                0, -1
            ]
        torch.testing.assert_close(train.acts[i], ref, rtol=1e-4, atol=1e-4)
    assert "corpora" in meta and meta["corpora"][0]["licence"]


def test_dataset_build_resumes_without_redoing_chunks(dataset, tiny_llama_dir):
    ds, _meta, lm, cfg = dataset
    before = {p: p.stat().st_mtime_ns for p in (ds / "train").glob("shard-*")}
    build_dataset(cfg, lm, ds, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (ds / "train").glob("shard-*")}
    assert before == after


@pytest.mark.parametrize("stage", ["ar-sft", "av-sft", "grpo"])
def test_each_stage_trains_and_writes_a_loadable_checkpoint(tmp_path, dataset, tiny_llama_dir, stage):
    ds = dataset[0]
    extra = {"kl_weight": 0.1, "entropy_weight": 0.01} if stage == "grpo" else {}
    cfg = load_config(None, **_config(tmp_path, ds, tiny_llama_dir, stage, steps=12, **extra))
    run = Run(cfg)
    ckpt = train(run, progress=False)
    rows = [yaml.safe_load(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    evals = [r["eval"] for r in rows if "eval" in r]
    assert len(steps) == 12 and evals and (Path(cfg.out) / "curves.png").is_file()
    if stage == "ar-sft":
        assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    if stage == "av-sft":
        assert {"av_loss", "av_loss_shuffled", "fve_k1"} <= set(evals[-1])
        assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    if stage == "grpo":
        assert {"reward_fve", "kl", "ar_loss", "entropy"} <= set(steps[-1])
    nla = open_nla(str(ckpt))
    assert nla.fve_variance == pytest.approx(M.normalized_variance(ActivationSet(ds / "train").acts))
    assert nla.provenance["from"] == f"train:{stage}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return open_nla(str(path)).trained_state()


def test_resume_after_interruption_is_exact(tmp_path, dataset, tiny_llama_dir):
    ds = dataset[0]
    full = load_config(None, **_config(tmp_path / "a", ds, tiny_llama_dir, "grpo", steps=8))
    train(Run(full, checkpoint_every=1), progress=False)

    part = load_config(None, **_config(tmp_path / "b", ds, tiny_llama_dir, "grpo", steps=8))
    run = Run(part, checkpoint_every=1)
    step, evaluate_fn = __import__("talkative.nla.train.stages", fromlist=["grpo"]).grpo(run)
    calls = {"n": 0}

    def crashing_step():
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a crash in the middle of step 4: steps 1-3 are checkpointed
        return step()

    with pytest.raises(KeyboardInterrupt):
        run.loop(crashing_step, evaluate_fn, progress=False)
    resumed = Run(part, resume=True, checkpoint_every=1)
    assert resumed.nla.provenance["step"] == 3
    train(resumed, progress=False)
    a, b = _weights(Path(full.out) / "checkpoint"), _weights(Path(part.out) / "checkpoint")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = [yaml.safe_load(x) for x in (Path(part.out) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval" not in m] == list(range(1, 9))


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_matches(tmp_path, dataset, tiny_llama_dir):
    ds = dataset[0]
    ref = load_config(
        None, **_config(tmp_path / "ref", ds, tiny_llama_dir, "ar-sft", steps=30, eval_every=100)
    )
    train(Run(ref, checkpoint_every=1), progress=False)
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(
        yaml.safe_dump(_config(tmp_path / "kill", ds, tiny_llama_dir, "ar-sft", steps=30, eval_every=100))
    )
    cmd = [
        sys.executable,
        "-m",
        "talkative.cli",
        "train",
        "ar-sft",
        "--config",
        str(cfg_path),
        "--checkpoint-every",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state = tmp_path / "kill" / "ar-sft" / "checkpoint" / "state.pt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not state.exists():
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _weights(Path(ref.out) / "checkpoint"), _weights(tmp_path / "kill" / "ar-sft" / "checkpoint")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_metrics_match_hand_computation(tmp_path, dataset, tiny_llama_dir):
    ds, _, lm, cfg = dataset
    held = ActivationSet(ds / "heldout")
    nla = NLA.init(lm, cfg.layer, t_text=6, patch_layers=2, head="linear", objective="nmse")
    nla.fve_variance = 0.5
    report = evaluate(nla, held, n=6, kl_samples=3, seed=7, ks=(1, 2))
    v, r = nla.verbalizer, nla.reconstructor
    A, cur = held.acts[:6], held.current[:6]
    with torch.no_grad():
        hats = []
        for i in range(6):
            u = step_seeds(7, [(i, 0)], v.t_text)
            ids = torch.tensor([v.generate(A[i : i + 1], 1, u, 1.0)[0].ids])
            hats.append(r(ids, cur[i : i + 1])[0])
        # a direction-only (nmse) reconstruction is measured at the norm of A
        hats_t = M.rescale_to_norm(torch.stack(hats), A)
    n = M.nmse(A, hats_t)
    assert report["best_of_k"]["1"]["fve"] == pytest.approx(float(1 - n.mean() / 0.5), rel=1e-5)
    assert report["best_of_k"]["1"]["relative_rmse"] == pytest.approx(
        float(M.relative_rmse(A, hats_t).mean()), rel=1e-5
    )
    assert report["best_of_k"]["2"]["fve"] >= report["best_of_k"]["1"]["fve"] - 1e-6
    # the blank explanation stays as a diagnostic
    with torch.no_grad():
        blank = r(torch.full((6, v.t_text), r.space_id), cur)
    assert report["blank_diagnostic"]["nmse"] == pytest.approx(float(M.nmse(A, blank).mean()), rel=1e-5)
    # KL of the k=1 reconstruction by hand: HF forward with a temporary hook patching block L's output
    kls = []
    for i in range(3):
        toks = torch.tensor([[t for t in held.ctx[i].tolist() if t >= 0]])
        with torch.no_grad():
            clean = lm.model(toks).logits[0, -1]

            def hook(module, inputs, output, i=i):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[0, -1] = hats_t[i]
                return (h, *output[1:]) if isinstance(output, tuple) else h

            handle = lm.model.model.layers[cfg.layer].register_forward_hook(hook)
            try:
                patched = lm.model(toks).logits[0, -1]
            finally:
                handle.remove()
        p, q = torch.log_softmax(clean, -1), torch.log_softmax(patched, -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    assert report["best_of_k"]["1"]["kl"] == pytest.approx(sum(kls) / 3, rel=1e-4, abs=1e-6)
    write_report(report, tmp_path / "eval", "tiny")
    assert (tmp_path / "eval" / "best_of_k.png").is_file() and "| trained | 1 |" in (
        tmp_path / "eval" / "eval.md"
    ).read_text()


def test_warm_start_is_the_context_before_the_position(dataset):
    ds = dataset[0]
    data = ActivationSet(ds / "train")
    ids = warm_start_ids(data, torch.arange(3), 6, space_id=0)
    for i in range(3):
        toks = [t for t in data.ctx[i].tolist() if t >= 0]
        assert ids[i].tolist() == toks[-7:-1]


def test_unknown_config_keys_are_refused(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("stage: ar-sft\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(bad)
