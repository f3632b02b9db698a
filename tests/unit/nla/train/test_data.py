"""Training data and evaluation honesty: a split that cannot leak, data tied to its NLA, windows that start the
way analysis does, shuffled controls that pair different documents, and baselines compared at equal k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_corpus import random_text, tiny_data_config, write_corpus

from talkative.nla import metrics as M
from talkative.nla.analysis import prepare
from talkative.nla.checkpoint import NLA
from talkative.nla.train.config import load_config
from talkative.nla.train.corpora import Document
from talkative.nla.train.data import (
    SHINGLE,
    ActivationSet,
    DataConfig,
    DatasetMismatch,
    Window,
    assign_splits,
    build_dataset,
    cross_document_derangement,
    dedupe,
    plan_dataset,
    same_document_fraction,
    split_components,
)
from talkative.nla.train.evaluate import best_of, evaluate, sample_and_score, token_means, write_report
from talkative.nla.train.loop import Run
from talkative.nla.train.stages import train


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory, tiny_llama_dir):
    from talkative.nla.lm import load_lm

    root = tmp_path_factory.mktemp("train-data-honesty")
    lm = load_lm(str(tiny_llama_dir), progress=False)
    cfg = tiny_data_config(
        write_corpus(root / "corpus", docs=12), str(tiny_llama_dir), heldout_fraction=0.4, max_windows=48
    )
    build_dataset(cfg, lm, root / "ds", progress=False)
    return root / "ds", lm, cfg


# -- the split ------------------------------------------------------------------------------------------------
def test_identical_texts_are_kept_once(tiny_llama):
    docs = [
        Document("m/a", "m", "same text"),
        Document("m/b", "m", "same text"),
        Document("m/c", "m", "other"),
    ]
    kept, dropped = dedupe(docs)
    assert [d.doc_id for d in kept] == ["m/a", "m/c"] and dropped == {"m/b": "m/a"}


def test_replies_to_one_prompt_and_documents_sharing_a_shingle_split_together(tiny_llama):
    tok = tiny_llama.tokenizer
    shared = random_text(99, 120)
    docs = [
        Document("c/0001-0", "c", "reply one", group="prompt-1"),
        Document("c/0001-1", "c", "reply two", group="prompt-1"),
        Document("w/x", "w", random_text(1) + " " + shared),
        Document("w/y", "w", shared + " " + random_text(2)),
        Document("w/z", "w", random_text(3)),
    ]
    windows = []
    for i, d in enumerate(docs):
        ids = list(tok(d.text, add_special_tokens=False)["input_ids"])
        windows += [Window(i, "", ids[s : s + 128], [100]) for s in range(0, max(1, len(ids) - 127), 128)]
    comp = split_components(docs, windows)
    assert comp["c/0001-0"] == comp["c/0001-1"] == "c/0001-0"
    assert comp["w/x"] == comp["w/y"] != comp["w/z"]
    for seed in range(40):  # whatever the hash says, members of one component land on one side
        s = assign_splits(docs, seed, 0.5, comp)
        assert s["c/0001-0"] == s["c/0001-1"] and s["w/x"] == s["w/y"]
    # without the shingle rule, x and y split apart for some seed (the old rule: a hash of each doc id)
    alone = {d.doc_id: d.doc_id for d in docs}
    assert any(
        assign_splits(docs, seed, 0.5, alone)["w/x"] != assign_splits(docs, seed, 0.5, alone)["w/y"]
        for seed in range(40)
    )


def test_heldout_windows_share_no_shingle_with_training_windows(tmp_path, tiny_llama):
    """A corpus with a duplicated file and a passage quoted across files: nothing held out appears in train."""
    corpus = write_corpus(tmp_path / "c", docs=10)
    (corpus / "doc0_copy.txt").write_text((corpus / "doc0.txt").read_text())
    quote = random_text(77, 100)
    for d in (3, 6):
        (corpus / f"doc{d}.txt").write_text((corpus / f"doc{d}.txt").read_text() + " " + quote)
    docs = list(
        __import__("talkative.nla.train.corpora", fromlist=["documents"]).documents(f"files:{corpus}")
    )
    cfg = tiny_data_config(
        corpus, "tiny", heldout_fraction=0.3, max_windows=400, max_windows_per_doc=20, window=64
    )
    plan = plan_dataset(cfg, docs, tiny_llama)
    assert "files/doc0_copy.txt" in plan.duplicates
    held = [w for w in plan.windows if w.split == "heldout"]
    train_ = [w for w in plan.windows if w.split == "train"]
    assert held and train_
    _assert_no_shared_shingle(held, train_)
    assert plan.splits["files/doc3.txt"] == plan.splits["files/doc6.txt"]


def _assert_no_shared_shingle(held: list[Window], train_: list[Window]) -> None:
    """Independent of the split's own (linear) hashing: Python's hash of every 64-token run as a tuple of ids."""

    def runs(ws: list[Window]) -> set[int]:
        out: set[int] = set()
        for w in ws:
            ids = w.ids[w.prefix :]
            out.update(hash(tuple(ids[i : i + SHINGLE])) for i in range(len(ids) - SHINGLE + 1))
        return out

    shared = runs(held) & runs(train_)
    assert not shared, f"{len(shared)} held-out shingles occur in training windows"


@pytest.mark.slow
def test_default_corpora_heldout_shares_no_text_with_train():
    """The demo's corpora (configs/data-*.yaml, main set): no held-out text or 64-token shingle in train.

    Needs the Debian corpora (apt-get install dict-gcide python3.11-doc fortunes) and PyPI for the others."""
    from talkative.nla.lm import load_lm
    from talkative.nla.train.corpora import documents

    cfg = DataConfig(**yaml.safe_load(Path("configs/data-smollm2-l12.yaml").read_text()))
    lm = load_lm(cfg.source, progress=False)
    docs = [d for spec in cfg.corpora for d in documents(spec)]
    plan = plan_dataset(cfg, docs, lm)
    # the milton corpus ships every work twice: one copy each is left
    assert sum(k.startswith("milton/") for k in plan.duplicates) >= 7
    texts = {d.doc_id: d.text for d in plan.docs}
    held_docs = {k for k, s in plan.splits.items() if s == "heldout"}
    train_texts = {texts[k] for k, s in plan.splits.items() if s == "train"}
    assert held_docs and not {texts[k] for k in held_docs} & train_texts
    held = [w for w in plan.windows if w.split == "heldout"]
    train_ = [w for w in plan.windows if w.split == "train"]
    assert {plan.docs[w.doc_index].corpus for w in held} == set(cfg.corpora)
    _assert_no_shared_shingle(held, train_)


# -- BOS ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory, tokenizer):
    """A tiny Llama whose tokenizer adds a BOS (as Llama-3 and Gemma do), saved as a model directory."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = tmp_path_factory.mktemp("bos-llama")
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A",
        special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))],
    )
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_training_windows_start_with_the_bos_analysis_adds(tmp_path, bos_llama):
    from talkative.nla.lm import load_lm

    lm = load_lm(str(bos_llama), progress=False)
    bos = lm.tokenizer.bos_token_id
    assert lm.encode("x")[0] == bos
    corpus = write_corpus(tmp_path / "c", docs=3, words=120)
    cfg = tiny_data_config(
        corpus, str(bos_llama), heldout_fraction=0.0, max_windows_per_doc=1, positions_per_window=6
    )
    build_dataset(cfg, lm, tmp_path / "ds", progress=False)
    data = ActivationSet(tmp_path / "ds" / "train")
    nla = NLA.init(lm, cfg.layer, t_text=4, patch_layers=1)
    compared = 0
    for d in range(3):
        text = (corpus / f"doc{d}.txt").read_text()
        prepared = prepare(nla, text=text, options={"no_kl": True})
        ids = prepared.ids
        for i in (data.doc == d).nonzero().flatten().tolist():
            p = int(data.pos[i])
            assert [t for t in data.ctx[i].tolist() if t >= 0] == ids[: p + 1]
            torch.testing.assert_close(data.acts[i], prepared.acts[p].float(), rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared >= 12


# -- data tied to its NLA -------------------------------------------------------------------------------------
def _stage(tmp: Path, ds: Path | list[str], src: Path, layer: int = 1, **kw) -> dict:
    cfg = {
        "stage": "ar-sft",
        "data": ds if isinstance(ds, list) else str(ds),
        "out": str(tmp / "run"),
        "dtype": "float32",
        "steps": 2,
        "batch_size": 4,
        "eval_every": 2,
        "eval_samples": 8,
        "log_every": 1,
        "arch": {"source": str(src), "layer": layer, "t_text": 4, "patch_layers": 1},
    }
    cfg.update(kw)
    return cfg


def test_training_refuses_data_of_another_layer_or_subject(
    tmp_path, tiny_ds, tiny_llama_dir, make_tiny, tokenizer
):
    ds, lm, _cfg = tiny_ds
    with pytest.raises(DatasetMismatch, match="layer 1, the NLA explains layer 0"):
        Run(load_config(None, **_stage(tmp_path / "a", ds, tiny_llama_dir, layer=0)))
    other = tmp_path / "other-llama"
    make_tiny("llama", seed=11).model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(DatasetMismatch, match="not from the NLA's subject"):
        Run(load_config(None, **_stage(tmp_path / "b", ds, other)))
    # the same weights under another path are the same subject
    same = tmp_path / "same-llama"
    lm.model.save_pretrained(same)
    tokenizer.save_pretrained(same)
    Run(load_config(None, **_stage(tmp_path / "c", ds, same)))


def test_datasets_of_different_layers_cannot_be_mixed(tmp_path, tiny_ds):
    ds, lm, cfg = tiny_ds
    other = tmp_path / "l0"
    cfg0 = tiny_data_config(Path(cfg.corpora[0].split(":", 1)[1]), cfg.source, layer=0)
    build_dataset(cfg0, lm, other, progress=False)
    with pytest.raises(DatasetMismatch, match="different layers cannot be mixed"):
        ActivationSet([ds / "train", other / "train"])


def test_eval_refuses_data_of_another_subject(tiny_ds, make_tiny):
    ds, _lm, cfg = tiny_ds
    stranger = make_tiny("llama", seed=12)
    nla = NLA.init(stranger, cfg.layer, t_text=4, patch_layers=1)
    with pytest.raises(DatasetMismatch, match="not from the NLA's subject"):
        evaluate(nla, ActivationSet(ds / "heldout"), n=4, kl_samples=0, ks=(1,))


# -- held-out evaluation never silently runs on training data --------------------------------------------------
def test_training_curves_without_heldout_are_labelled_train(tmp_path, tiny_llama_dir):
    from talkative.nla.lm import load_lm

    lm = load_lm(str(tiny_llama_dir), progress=False)
    cfg = tiny_data_config(write_corpus(tmp_path / "c", docs=4), str(tiny_llama_dir), heldout_fraction=0.0)
    build_dataset(cfg, lm, tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds" / "heldout").exists()
    run = Run(load_config(None, **_stage(tmp_path, tmp_path / "ds", tiny_llama_dir)))
    train(run, progress=False)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert evals and {r["eval_split"] for r in evals} == {"train"}


def test_talkative_eval_refuses_a_training_split_unless_asked(tmp_path, tiny_ds):
    ds, lm, cfg = tiny_ds
    ckpt = tmp_path / "ckpt"
    NLA.init(lm, cfg.layer, subject_source=cfg.source, t_text=4, patch_layers=1).save(ckpt)
    base = [sys.executable, "-m", "talkative.cli", "eval", str(ckpt), "--data", str(ds / "train")]
    base += ["-n", "8", "--kl-samples", "0", "--no-untrained", "--out", str(tmp_path / "out")]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not a held-out split" in refused.stderr
    done = subprocess.run([*base, "--allow-train"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["split"] == "train" and "TRAINING-SET" in (tmp_path / "out" / "eval.md").read_text()


# -- controls and baselines -----------------------------------------------------------------------------------
def test_derangement_pairs_every_sample_with_another_document():
    keys = torch.tensor([0] * 5 + [1] * 3 + [2] * 4 + [3] * 2)
    perm = cross_document_derangement(keys, seed=3)
    assert sorted(perm.tolist()) == list(range(len(keys)))
    assert bool((keys[perm] != keys).all())
    assert torch.equal(perm, cross_document_derangement(keys, seed=3))
    assert not torch.equal(perm, cross_document_derangement(keys, seed=4))
    # the roll by one it replaces mostly pairs a sample with its own document
    assert float((keys[torch.roll(torch.arange(len(keys)), 1)] == keys).float().mean()) > 0.5
    # one document with most samples: a permutation still, with the fewest same-document pairs possible
    lopsided = torch.tensor([0, 0, 0, 0, 1, 2])
    perm = cross_document_derangement(lopsided, seed=0)
    assert sorted(perm.tolist()) == list(range(6))
    assert same_document_fraction(lopsided, perm) == pytest.approx(2 / 6)


def test_av_shuffled_control_uses_other_documents(tmp_path, tiny_ds, tiny_llama_dir, monkeypatch):
    """The AV's shuffled-vector loss is computed on activations of other documents."""
    from talkative.nla.train import stages

    ds = tiny_ds[0]
    run = Run(load_config(None, **_stage(tmp_path, ds, tiny_llama_dir, stage="av-sft", eval_samples=16)))
    seen: list[torch.Tensor] = []
    real = stages._batched_logp

    def spy(v, A, ids, size=64):
        seen.append(A.clone())
        return real(v, A, ids, size)

    monkeypatch.setattr(stages, "_batched_logp", spy)
    stages.heldout_eval(run, with_generation=True)
    data = run.heldout
    assert data is not None
    real_acts, shuffled = seen
    n = len(real_acts)
    src = [int((data.acts[:n] == row).all(1).nonzero()[0]) for row in shuffled]
    assert all(int(data.doc[s]) != int(data.doc[i]) for i, s in enumerate(src))


def test_eval_baselines_at_equal_k(tmp_path, tiny_ds):
    ds, lm, cfg = tiny_ds
    held, trn = ActivationSet(ds / "heldout"), ActivationSet(ds / "train")
    nla = NLA.init(lm, cfg.layer, t_text=4, patch_layers=1, objective="nmse")
    nla.fve_variance = 0.5
    untrained = NLA.init(lm, cfg.layer, t_text=4, patch_layers=1)
    n = min(12, len(held))
    report = evaluate(nla, held, train=trn, untrained=untrained, n=n, kl_samples=2, seed=5, ks=(1, 2, 4))
    A, cur = held.acts[:n], held.current[:n]
    # token mean by hand: the mean training activation of the current token, the global mean otherwise
    means, glob = token_means(trn)
    for t in set(trn.current.tolist()):
        torch.testing.assert_close(means[t], trn.acts[trn.current == t].mean(0))
    hand = torch.stack([means.get(int(t), glob) for t in cur.tolist()])
    assert report["token_mean"]["fve"] == pytest.approx(float(1 - M.nmse(A, hand).mean() / 0.5), rel=1e-5)
    # selection control by hand: best of k over the explanations sampled for another document's activation
    scored = sample_and_score(nla, A, cur, 4, 5, 1.0)
    perm = cross_document_derangement(held.doc_key[:n], 5)
    r = nla.reconstructor
    with torch.no_grad():
        ctrl = r(scored.ids[perm].reshape(-1, 4), cur.repeat_interleave(4)).view(n, 4, -1)
    for k in (1, 2, 4):
        best = M.nmse(A.unsqueeze(1).expand_as(ctrl[:, :k]), ctrl[:, :k]).min(1).values
        assert report["selection_control"][str(k)]["nmse"] == pytest.approx(float(best.mean()), rel=1e-5)
        mine, _ = best_of(scored, k)
        gap = report["gaps"][str(k)]["vs_selection_control"]["fve_gap"]
        assert gap == pytest.approx(float((best - M.nmse(A, mine)).mean() / 0.5), rel=1e-4, abs=1e-6)
        assert "vs_untrained" in report["gaps"][str(k)]
    assert "vs_token_mean" in report["gaps"]["1"] and "blank" not in report
    # a direction-only NLA's unit-dependent figures use its reconstruction at the norm of A
    k1, _ = best_of(scored, 1)
    assert report["unit_metrics_at_norm_of_A"] is True
    assert report["best_of_k"]["1"]["mse"] == pytest.approx(
        float(M.mse(A, M.rescale_to_norm(k1, A)).mean()), rel=1e-5
    )
    assert report["best_of_k"]["1"]["kl"] is not None and report["selection_control"]["4"].get("kl") is None
    write_report(report, tmp_path / "eval", "tiny")
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "selection control" in md and "token mean" in md and "held-out" in md


def test_eval_kl_refuses_a_context_shorter_than_the_window(tmp_path, tiny_ds):
    _ds, lm, cfg = tiny_ds
    short = tiny_data_config(Path(cfg.corpora[0].split(":", 1)[1]), cfg.source, context=12)
    build_dataset(short, lm, tmp_path / "short", progress=False)
    held = ActivationSet(tmp_path / "short" / "heldout")
    nla = NLA.init(lm, cfg.layer, t_text=4, patch_layers=1)
    with pytest.raises(ValueError, match="KL needs the whole window"):
        evaluate(nla, held, n=4, kl_samples=4, ks=(1,))
    report = evaluate(nla, held, n=4, kl_samples=0, ks=(1,))  # without KL the rest is valid
    assert report["kl_samples"] == 0 and "kl" not in report["best_of_k"]["1"]


def test_dataset_records_its_subject_split_rule_and_hashes(tiny_ds):
    ds, _lm, cfg = tiny_ds
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["subject"]["fingerprint"] and meta["layer"] == cfg.layer
    assert meta["shared_shingles"] == 0 and all(len(d["sha256"]) == 64 for d in meta["documents"])


def test_a_directory_of_another_plan_is_not_resumed_into(tmp_path, tiny_ds):
    _ds, lm, cfg = tiny_ds
    out = tmp_path / "ds"
    build_dataset(cfg, lm, out, progress=False)
    changed = tiny_data_config(Path(cfg.corpora[0].split(":", 1)[1]), cfg.source, seed=9)
    with pytest.raises(DatasetMismatch, match="another dataset plan"):
        build_dataset(changed, lm, out, progress=False)
