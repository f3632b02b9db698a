"""The resumable training loop shared by every stage.

A run directory holds `checkpoint/` (a native NLA checkpoint plus `state.pt`: step, optimiser and scheduler
states, the run's RNG, the data cursor), `metrics.jsonl` and `curves.png`. Checkpoints are written to a temporary
directory and swapped in by rename every few minutes, so a run killed at any moment resumes with `--resume` from
its last checkpoint and then follows exactly the trajectory an uninterrupted run would have taken: the data order
comes from a seeded permutation per epoch and every random draw comes from the run's own generator.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import metrics as M
from ..checkpoint import NLA, CheckpointError
from ..lm import LMPool
from ..loading import open_nla
from .config import TrainConfig
from .data import ActivationSet

CHECKPOINT = "checkpoint"
STATE = "state.pt"


@dataclass
class Cursor:
    epoch: int = 0
    index: int = 0


@dataclass
class RunState:
    step: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    elapsed: float = 0.0


def build_nla(cfg: TrainConfig, pool: LMPool) -> NLA:
    if cfg.init == "init":
        a = cfg.arch
        lm = pool.get(a.source)
        return NLA.init(
            lm,
            a.layer,
            subject_source=a.source,
            av_prompt=a.av_prompt,
            patch_layers=a.patch_layers,
            t_text=a.t_text,
            ar_prompt=a.ar_prompt,
            head=a.head,
            objective=a.objective,
            name="training",
        )
    return open_nla(cfg.init, pool=pool)


def cosine_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Run:
    """Data, model, optimisers and bookkeeping of one stage; `stages.py` supplies the step."""

    def __init__(
        self, cfg: TrainConfig, *, resume: bool = False, checkpoint_every: int | None = None
    ) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_every = checkpoint_every
        roots = [Path(d) for d in (cfg.data if isinstance(cfg.data, list) else [cfg.data])]
        self.train = ActivationSet([r / "train" for r in roots])
        held = [r / "heldout" for r in roots if any((r / "heldout").glob("shard-*"))]
        self.heldout = ActivationSet(held) if held else None
        # evaluations during training run on held-out data; without any they run on training data, labelled so
        self.eval_split = "heldout" if self.heldout is not None else "train"
        self.device = torch.device(resolve_device(cfg.device))
        self.pool = LMPool(dtype=cfg.dtype, device=str(self.device))
        recover_checkpoint(self.out)
        ckpt = self.out / CHECKPOINT
        resuming = resume and (ckpt / STATE).is_file()
        if resume and not resuming:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt}")
        self.nla = open_nla(str(ckpt), pool=self.pool) if resuming else build_nla(cfg, self.pool)
        for data in (self.train, self.heldout):
            if data is not None:
                data.require_subject(self.nla.subject, self.nla.subject_source, self.nla.layer)
        # FVE's denominator: variance of norm-√d training activations (the official "rawvar" baseline).
        variance = M.normalized_variance(self.train.acts)
        self.nla.fve_variance = variance
        self.nla.fve_baseline = {
            "variance": variance,
            "kind": "rawvar",
            "source": [str(r) for r in roots],
            "n_vectors": len(self.train),
        }
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.state = RunState()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self._resuming = resuming
        self._perm: Tensor | None = None
        self._perm_epoch = -1
        self.metrics_path = self.out / "metrics.jsonl"
        self._last_save = time.monotonic()

    # -- optimisation -----------------------------------------------------------------------------------------
    def add_optimizer(self, name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.99))
        self.optimizers[name] = opt
        self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(self.cfg))
        return opt

    def step_optimizer(self, name: str, loss: Tensor) -> float:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if params else torch.tensor(0.0)
        opt.step()
        self.schedulers[name].step()
        return float(norm)

    # -- data -----------------------------------------------------------------------------------------------------
    def next_batch(self, size: int) -> Tensor:
        n = len(self.train)
        out: list[Tensor] = []
        while sum(len(o) for o in out) < size:
            c = self.state.cursor
            if self._perm_epoch != c.epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + c.epoch)
                self._perm = torch.randperm(n, generator=g)
                self._perm_epoch = c.epoch
            assert self._perm is not None
            take = min(size - sum(len(o) for o in out), n - c.index)
            out.append(self._perm[c.index : c.index + take])
            c.index += take
            if c.index >= n:
                c.epoch, c.index = c.epoch + 1, 0
        return torch.cat(out)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load optimiser, scheduler, RNG and cursor states (after optimisers were added)."""
        if not self._resuming:
            return
        state = torch.load(self.out / CHECKPOINT / STATE, map_location="cpu", weights_only=True)
        self.state = RunState(
            step=state["step"], cursor=Cursor(**state["cursor"]), elapsed=state.get("elapsed", 0.0)
        )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.generator.set_state(state["generator"])

    def save(self) -> Path:
        final = self.out / CHECKPOINT
        tmp = self.out / f".{CHECKPOINT}.tmp"
        old = self.out / f".{CHECKPOINT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self.nla.provenance = {
            **self.nla.provenance,
            "from": f"train:{self.cfg.stage}",
            "step": self.state.step,
            "created_at": _now(),
        }
        self.nla.name = f"{Path(self.cfg.out).name}"
        self.nla.save(tmp)
        torch.save(
            {
                "step": self.state.step,
                "cursor": vars(self.state.cursor),
                "elapsed": self.state.elapsed,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "generator": self.generator.get_state(),
                "config": self.cfg.to_dict(),
            },
            tmp / STATE,
        )
        (tmp / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        self._last_save = time.monotonic()
        return final

    def due_for_checkpoint(self) -> bool:
        if self.checkpoint_every is not None:
            return self.state.step % self.checkpoint_every == 0
        return time.monotonic() - self._last_save >= self.cfg.checkpoint_minutes * 60

    # -- logging --------------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_log(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be produced again)."""
        if not self.metrics_path.is_file():
            return
        keep = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= self.state.step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def loop(
        self,
        step_fn: Callable[[], dict[str, float]],
        eval_fn: Callable[[], dict[str, float]] | None = None,
        *,
        progress: bool = True,
    ) -> Path:
        from tqdm.auto import tqdm

        self.restore()
        self.truncate_log()
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps, initial=self.state.step, desc=cfg.stage, unit="step", disable=not progress
        )
        started = time.monotonic() - self.state.elapsed
        while self.state.step < cfg.steps:
            record = step_fn()
            self.state.step += 1
            self.state.elapsed = time.monotonic() - started
            bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.steps:
                lrs = {f"lr_{k}": s.get_last_lr()[0] for k, s in self.schedulers.items()}
                self.log({"step": self.state.step, "elapsed": round(self.state.elapsed, 1), **lrs, **record})
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float)})
            if eval_fn is not None and (
                self.state.step % cfg.eval_every == 0 or self.state.step == cfg.steps
            ):
                self.log(
                    {
                        "step": self.state.step,
                        "elapsed": round(self.state.elapsed, 1),
                        "eval": eval_fn(),
                        "eval_split": self.eval_split,
                    }
                )
                plot_curves(self.metrics_path, self.out / "curves.png")
            if self.due_for_checkpoint() or self.state.step == cfg.steps:
                self.save()
        bar.close()
        plot_curves(self.metrics_path, self.out / "curves.png")
        return self.out / CHECKPOINT


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def recover_checkpoint(out: Path) -> None:
    """Finish a checkpoint swap that a kill interrupted: `state.pt` is written last, so its presence marks a
    complete checkpoint directory."""
    final, tmp, old = out / CHECKPOINT, out / f".{CHECKPOINT}.tmp", out / f".{CHECKPOINT}.old"
    if (final / STATE).is_file():
        return
    if (tmp / STATE).is_file():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    elif (old / STATE).is_file():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(old, final)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def plot_curves(metrics: Path, png: Path) -> None:
    """Loss and FVE curves of a run (training batches and held-out evaluations)."""
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "eval" not in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "ar_loss", "pg_loss"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    for key, src in (("fve", train), ("reward_fve", train)):
        pts = [(r["step"], r[key]) for r in src if key in r]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), label=f"train {key}", alpha=0.6)
    eval_keys = sorted({k for r in evals for k in r["eval"] if k.startswith("fve")})
    for key in eval_keys:
        pts = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
        where = "training-set" if any(r.get("eval_split") == "train" for r in evals) else "held-out"
        axes[1].plot(*zip(*pts, strict=True), marker="o", label=f"{where} {key}")
    axes[1].set_xlabel("step")
    axes[1].set_title("fraction of variance explained")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
