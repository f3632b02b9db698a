"""The three training stages, each a step function over a `Run`.

* `ar-sft`: the reconstructor learns to map warm-start explanations (plus the current token) back to the
  activation; loss = nMSE (direction) + a small term that keeps the norm right, so raw MSE is meaningful too.
* `av-sft`: the verbalizer learns next-token prediction of the warm-start explanation given the activation; its
  held-out loss is compared with the same loss given shuffled activations (the gap is the signal it reads).
* `grpo`: the verbalizer samples G explanations per activation, each rewarded by −nMSE of its reconstruction
  (in the sentence language, minus a penalty when it does not parse, plus a reward for the share of its claims
  that are true of the sample); advantages are normalised within the group; optional KL to a reference
  verbalizer and entropy bonus; the reconstructor keeps training on the rollouts (online), as in the official
  recipe.

Warm-start explanations come from the data itself (`targets.py`, no hosted model): the T tokens of context just
before the position (the activation at layer L is a function of that context, so recovering it is the most
faithful short explanation there is), or a sentence of the explanation language (`nla/explanations.py`: the
genre, the last words, the subject's likely next tokens), which a person can read and check; GRPO then keeps
sentences in the language with `parse_penalty` (see docs/training.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import metrics as M
from ..checkpoint import NLA
from ..explanations import Form, parse
from ..loading import open_nla
from ..reconstructor import SoftPromptReconstructor
from ..sampling import SEED_BOUND
from ..verbalizer import LayerReplacementVerbalizer
from .claims import claim_scores
from .data import ActivationSet, cross_document_derangement
from .loop import Run
from .targets import WarmStart, context_ids


def warm_start_ids(data: ActivationSet, idx: Tensor, t_text: int, space_id: int) -> Tensor:
    """The t_text context tokens before each sample's position (the `context` language's warm start)."""
    return context_ids(data, idx, t_text, space_id)


def warm_start(run: Run, data: ActivationSet) -> WarmStart:
    """The warm-start explanations of `data` in the run's configured language."""
    v, r = _require_upstream(run.nla)
    cfg = run.cfg
    form = Form(cfg.state_genre, cfg.quote_tokens, cfg.next_tokens)
    return WarmStart(data, cfg.explanations, v.lm.tokenizer, form, v.t_text, r.space_id)


def parse_rate(tokenizer: Any, ids: Tensor) -> Tensor:
    """[n] 1.0 where the explanation (token ids) parses in the sentence language, else 0.0."""
    return torch.tensor([float(parse(tokenizer.decode(row)) is not None) for row in ids.tolist()])


def reconstruction_loss(A: Tensor, A_hat: Tensor, scale_weight: float) -> tuple[Tensor, Tensor]:
    """(loss, per-row nMSE): nMSE plus scale_weight · log(|Â|/|A|)² (training only constrains direction otherwise)."""
    n = M.nmse(A, A_hat)
    log_ratio = torch.log(A_hat.float().norm(dim=-1).clamp_min(1e-6) / A.float().norm(dim=-1).clamp_min(1e-6))
    return n.mean() + scale_weight * log_ratio.pow(2).mean(), n.detach()


def _require_upstream(nla: NLA) -> tuple[LayerReplacementVerbalizer, SoftPromptReconstructor]:
    v, r = nla.verbalizer, nla.reconstructor
    if not isinstance(v, LayerReplacementVerbalizer) or not isinstance(r, SoftPromptReconstructor):
        raise ValueError(
            "training supports the frozen-base design (layer-replacement verbalizer, soft-prompt reconstructor)"
        )
    return v, r


def _params(module: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    if trainable == "all":
        return list(module.parameters())
    prefixes = tuple(p.strip() for p in trainable.split(","))
    return [p for n, p in module.named_parameters() if n.startswith(prefixes)]


def _freeze(nla: NLA) -> None:
    for p in nla.parameters():
        p.requires_grad_(False)


def _fve(run: Run, n: Tensor) -> float:
    var = run.nla.fve_variance or 1.0
    return float(1 - n.mean() / var)


# -- evaluation used during training --------------------------------------------------------------------------
def heldout_eval(run: Run, warm_of: WarmStart | None = None, *, with_generation: bool) -> dict[str, float]:
    """FVE of warm-start texts and of a blank explanation (the AR's bounds), plus the AV's k=1 FVE and losses.

    Measured on the held-out split, or on the training split when the data have none: the loop logs which
    (`eval_split`), so a curve of training data is never read as a held-out one.
    """
    data = run.heldout if run.heldout is not None else run.train
    nla = run.nla
    v, r = _require_upstream(nla)
    warm_of = warm_of if warm_of is not None else warm_start(run, data)
    n = min(run.cfg.eval_samples, len(data))
    idx = torch.arange(n)
    A = data.acts[idx].to(run.device)
    cur = data.current[idx]
    T = v.t_text
    out: dict[str, float] = {}
    with torch.no_grad():
        warm = warm_of(idx).to(run.device)
        out["fve_warm_start"] = _fve(run, M.nmse(A, _batched(lambda i: r(warm[i], cur[i]), n)))
        blank = torch.full_like(warm, r.space_id)
        out["fve_blank"] = _fve(run, M.nmse(A, _batched(lambda i: r(blank[i], cur[i]), n)))
        if with_generation:
            g = torch.Generator().manual_seed(1234)
            u = torch.randint(0, SEED_BOUND, (n, T), generator=g)  # step seeds
            expl = v.generate(A, 1, u, 1.0)
            ids = torch.tensor([e.ids for e in expl], device=run.device)
            out["fve_k1"] = _fve(run, M.nmse(A, _batched(lambda i: r(ids[i], cur[i]), n)))
            if run.cfg.explanations == "sentence":
                out["parse_rate_k1"] = float(parse_rate(v.lm.tokenizer, ids).mean())
            out["av_loss"] = float(-_batched_logp(v, A, warm).mean())
            perm = cross_document_derangement(data.doc_key[idx], seed=1234)
            out["av_loss_shuffled"] = float(-_batched_logp(v, A[perm], warm).mean())
    return out


def _batched(fn: Callable[[Tensor], Tensor], n: int, size: int = 64) -> Tensor:
    return torch.cat([fn(torch.arange(i, min(n, i + size))) for i in range(0, n, size)])


def _batched_logp(v: LayerReplacementVerbalizer, A: Tensor, ids: Tensor, size: int = 64) -> Tensor:
    return torch.cat(
        [v.token_logprobs(A[i : i + size], ids[i : i + size])[0] for i in range(0, len(A), size)]
    )


# -- stages -----------------------------------------------------------------------------------------------------
def ar_sft(run: Run) -> tuple[Callable[[], dict[str, float]], Callable[[], dict[str, float]]]:
    nla = run.nla
    _, r = _require_upstream(nla)
    _freeze(nla)
    run.add_optimizer("reconstructor", _params(r, run.cfg.trainable), run.cfg.lr)
    data = run.train
    warm, held = _warm_starts(run)

    def step() -> dict[str, float]:
        idx = run.next_batch(run.cfg.batch_size)
        units = warm(idx)
        A = data.acts[idx].to(run.device)
        loss, n = reconstruction_loss(A, r(units, data.current[idx]), run.cfg.scale_weight)
        gnorm = run.step_optimizer("reconstructor", loss)
        return {"loss": float(loss.detach()), "fve": _fve(run, n), "grad_norm": gnorm}

    return step, lambda: heldout_eval(run, held, with_generation=False)


def av_sft(run: Run) -> tuple[Callable[[], dict[str, float]], Callable[[], dict[str, float]]]:
    nla = run.nla
    v, _ = _require_upstream(nla)
    _freeze(nla)
    run.add_optimizer("verbalizer", _params(v, run.cfg.trainable), run.cfg.lr)
    data = run.train
    warm, held = _warm_starts(run)

    def step() -> dict[str, float]:
        idx = run.next_batch(run.cfg.batch_size)
        ids = warm(idx).to(run.device)
        logp, _ = v.token_logprobs(data.acts[idx].to(run.device), ids)
        loss = -logp.mean()
        gnorm = run.step_optimizer("verbalizer", loss)
        acc = float((logp.detach() > -0.6931).float().mean())  # tokens given probability > 1/2
        return {"loss": float(loss.detach()), "token_p_gt_half": acc, "grad_norm": gnorm}

    return step, lambda: heldout_eval(run, held, with_generation=True)


def grpo(run: Run) -> tuple[Callable[[], dict[str, float]], Callable[[], dict[str, float]]]:
    cfg = run.cfg
    nla = run.nla
    v, r = _require_upstream(nla)
    _freeze(nla)
    run.add_optimizer("verbalizer", _params(v, cfg.trainable), cfg.lr)
    if cfg.train_reconstructor:
        run.add_optimizer("reconstructor", list(r.parameters()), cfg.ar_lr)
    reference = _reference(run) if cfg.kl_weight > 0 else None
    data = run.train
    G = cfg.group_size
    _, held = _warm_starts(run, train=False)
    tokenizer = v.lm.tokenizer

    def step() -> dict[str, float]:
        idx = run.next_batch(cfg.batch_size)
        A = data.acts[idx].to(run.device)
        cur = data.current[idx].repeat_interleave(G)
        A_rep = A.repeat_interleave(G, 0)
        u = torch.randint(0, SEED_BOUND, (len(idx) * G, v.t_text), generator=run.generator)  # step seeds
        with torch.no_grad():
            ids = torch.tensor([e.ids for e in v.generate(A, G, u, cfg.temperature)], device=run.device)
            n = M.nmse(A_rep, r(ids, cur))
        reward = -n
        rec: dict[str, Any] = {}
        if cfg.parse_penalty > 0:
            parses = parse_rate(tokenizer, ids).to(n.device)
            reward = reward - cfg.parse_penalty * (1 - parses)
            rec["parse_rate"] = float(parses.mean())
        if cfg.claim_reward > 0:
            truth = claim_scores(tokenizer, data, idx.repeat_interleave(G), ids).to(n.device)
            reward = reward + cfg.claim_reward * truth
            rec["claim_score"] = float(truth.mean())
        reward = reward.view(-1, G)
        adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(-1)
        logp, entropy = v.token_logprobs(A_rep, ids)
        pg = -(adv.unsqueeze(1) * logp).mean()
        loss = pg - cfg.entropy_weight * entropy.mean()
        if reference is not None:
            with torch.no_grad():
                ref_logp, _ = reference.token_logprobs(A_rep, ids)
            d = ref_logp - logp
            kl = (d.exp() - d - 1).mean()
            loss = loss + cfg.kl_weight * kl
            rec["kl"] = float(kl.detach())
        rec["grad_norm"] = run.step_optimizer("verbalizer", loss)
        if cfg.train_reconstructor:
            ar_loss, _ = reconstruction_loss(A_rep, r(ids, cur), cfg.scale_weight)
            run.step_optimizer("reconstructor", ar_loss)
            rec["ar_loss"] = float(ar_loss.detach())
        best = n.view(-1, G).min(1).values
        rec.update(
            {
                "pg_loss": float(pg.detach()),
                "reward_fve": _fve(run, n),
                "reward_fve_best_of_group": _fve(run, best),
                "entropy": float(entropy.detach().mean()),
            }
        )
        return rec

    return step, lambda: heldout_eval(run, held, with_generation=True)


def _warm_starts(run: Run, *, train: bool = True) -> tuple[WarmStart, WarmStart]:
    """Warm starts of the training split (when the stage trains on them) and of the evaluation split."""
    data = run.heldout if run.heldout is not None else run.train
    held = warm_start(run, data)
    if not train:
        return held, held
    return (held if data is run.train else warm_start(run, run.train)), held


def _reference(run: Run) -> LayerReplacementVerbalizer:
    """A frozen verbalizer to stay close to: the one the stage started from ("init") or the untrained prompt ("base").

    Rebuilt from the config rather than copied from the live model, so a resumed run has the same reference.
    """
    v, _ = _require_upstream(run.nla)
    if run.cfg.kl_reference == "init" and run.cfg.init != "init":
        ref = open_nla(run.cfg.init, pool=run.pool).verbalizer
        if not isinstance(ref, LayerReplacementVerbalizer):
            raise ValueError("the KL reference must be a layer-replacement verbalizer")
    else:
        ref = LayerReplacementVerbalizer(v.lm, prompt=v.prompt, patch_layers=v.patch_layers, t_text=v.t_text)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


STAGE_FUNCTIONS = {"ar-sft": ar_sft, "av-sft": av_sft, "grpo": grpo}


def train(run: Run, *, progress: bool = True) -> Any:
    step, evaluate = STAGE_FUNCTIONS[run.cfg.stage](run)
    return run.loop(step, evaluate, progress=progress)
