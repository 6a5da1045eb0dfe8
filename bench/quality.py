"""Section (h): quality on a real run. The same M members trained for a few epochs three ways,
their ensembles' metrics compared with bootstrap intervals and paired differences."""

from __future__ import annotations

import gc
import math
import time

import numpy as np
import torch

from loraens.bootstrap import metric_cis, paired_metric_diffs
from loraens.config import DType, EnsembleConfig, ModelConfig, Scoring, TrainConfig
from loraens.data import load_mcqa
from loraens.ensemble import attach_members, first_lora_layer, member_layers
from loraens.fast.prefix import prefix_cache_for
from loraens.metrics import ensemble_probs
from loraens.model import load_base_model
from loraens.predict import predict
from loraens.scoring import Scorer
from loraens.train import linear_schedule, member_batches, member_orders, train_members

from .common import ALPHA, MAX_GRAD_NORM, MODE_NAMES, NORM, RANK, SEED, TARGETS, Task, log, make_task
from .config import BenchConfig
from .peft_baseline import build_peft, peft_eval_loop, peft_member_step

REFERENCE = "full depth"
PEFT_SIDE = "PEFT-sequential fp32"
FP32_SIDE = "loraens fp32 full depth"


def run_quality(cfg: BenchConfig, tok) -> dict:
    """`quality_check` on its own seeded questions (--quality-train / --quality-eval of the dataset)."""
    q_train = load_mcqa(cfg.dataset, "train", data_dir=cfg.data_dir, limit=cfg.quality_train, seed=SEED + 1)
    q_eval = load_mcqa(cfg.dataset, cfg.eval_split, data_dir=cfg.data_dir, limit=cfg.quality_eval, seed=SEED + 1)
    return quality_check(cfg, tok, q_train, q_eval)


def quality_check(cfg: BenchConfig, tok, train_ex, eval_ex) -> dict:
    """Train the same M members for a few epochs three ways and compare their ensembles' metrics.

    Sides: loraens bf16 full depth (the reference), loraens bf16 with LoRA in the top K layers and
    the frozen-prefix cache, and (with --quality-peft) the PEFT-sequential fp32 baseline started
    from the SAME initial member weights, the same batches per member and the same LR schedule.
    Returns metrics with bootstrap intervals and paired differences against the reference.
    """
    scoring = Scoring(cfg.quality_mode)
    task = make_task(tok, scoring, train_ex, eval_ex)
    train = TrainConfig(epochs=cfg.quality_epochs, lr=cfg.quality_lr, batch_size=cfg.batch_size,
                        max_grad_norm=MAX_GRAD_NORM, eval_batch_size=cfg.eval_batch_size)
    out: dict = {"mode": MODE_NAMES[scoring], "members": cfg.quality_members, "epochs": cfg.quality_epochs,
                 "lr": cfg.quality_lr, "train": len(task.train_q), "eval": len(task.eval_q), "sides": {}}
    probs, init_state, out["layers"] = train_loraens_sides(cfg, task, train, out["sides"])
    if cfg.quality_peft:
        probs[PEFT_SIDE] = train_peft_side(cfg, task, train, init_state, out["sides"])
    compare_sides(task, probs, out)
    return out


def train_loraens_sides(cfg: BenchConfig, task: Task, train: TrainConfig, sides: dict,
                        ) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """Train and evaluate each loraens side on a fresh base; fills `sides` with their times.

    Returns the member probabilities per side, the first side's initial member weights (the
    PEFT side starts from them) and the number of decoder layers.
    """
    m, scoring = cfg.quality_members, task.scoring
    names = ([REFERENCE] + (["top-K + prefix cache"] if cfg.prefix_fraction > 0 else [])
             + ([FP32_SIDE] if cfg.quality_peft else []))
    probs: dict[str, torch.Tensor] = {}
    init_state, n_layers = None, None
    for name in names:
        fp32 = name.startswith("loraens fp32")
        base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32) if fp32 else ModelConfig())
        n_layers = base.config.num_hidden_layers
        k = max(1, round(cfg.prefix_fraction * n_layers)) if name.startswith("top-K") else None
        ens = EnsembleConfig(num_members=m, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, seed=SEED,
                             top_layers=k)
        attach_members(base, ens)
        cache = prefix_cache_for(base, first_lora_layer(base)) if k is not None else None
        scorer = Scorer(scoring, task.letter_ids, NORM, prefix_cache=cache)
        if init_state is None:
            init_state = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                          for n, layer in member_layers(base).items()}
        t0 = time.perf_counter()
        train_members(base, task.train_q, train, ens, scorer, progress=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs[name] = predict(base, task.eval_q, task.eval_ids, m, scorer, batch_size=cfg.eval_batch_size,
                              progress=False).member_probs
        sides[name] = {"train_s": t_train, "eval_s": time.perf_counter() - t0, "k": k}
        log(f"[quality] {name}: trained in {t_train:.0f} s")
        del base
        gc.collect()
    return probs, init_state, n_layers


def train_peft_side(cfg: BenchConfig, task: Task, train: TrainConfig, init_state: dict, sides: dict,
                    ) -> torch.Tensor:
    """The PEFT-sequential fp32 side from the loraens members' initial weights, with the same
    batches per member and LR schedule; returns its member probabilities, fills `sides`."""
    m, b = cfg.quality_members, cfg.batch_size
    peft_base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32, attn_implementation=cfg.baseline_attn))
    pm, p_params, p_opts = build_peft(peft_base, m, lr=train.lr, weight_decay=train.weight_decay)
    with torch.no_grad():  # the same initial weights as the loraens members
        for n_, (a, bb) in init_state.items():
            for kk in range(m):
                mod = pm.get_submodule(f"base_model.model.{n_}")
                mod.lora_A[f"m{kk}"].weight.copy_(a[kk])
                mod.lora_B[f"m{kk}"].weight.copy_(bb[kk])
    n = len(task.train_q)
    lengths = np.array([q.num_tokens for q in task.train_q])
    steps = math.ceil(n / b) * cfg.quality_epochs
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, linear_schedule(steps, round(train.warmup_ratio * steps)))
              for o in p_opts]
    t0 = time.perf_counter()
    for epoch in range(1, cfg.quality_epochs + 1):
        for chunk in member_batches(member_orders(n, m, epoch, SEED, True), lengths, b, train.bucket_window,
                                    SEED, epoch):
            for kk in range(m):  # one adapter after another, as bayesian-peft and BayesAdapt do
                peft_member_step(pm, p_params, p_opts, kk, [task.train_q[i] for i in chunk[kk]], task)
                scheds[kk].step()
    t_train = time.perf_counter() - t0
    log(f"[quality] PEFT-sequential: trained in {t_train:.0f} s")
    t0 = time.perf_counter()
    probs = peft_eval_loop(pm, task, m, cfg.eval_batch_size)
    sides[PEFT_SIDE] = {"train_s": t_train, "eval_s": time.perf_counter() - t0, "k": None}
    del pm, peft_base
    gc.collect()
    return probs


def compare_sides(task: Task, probs: dict[str, torch.Tensor], out: dict) -> None:
    """Each side's metrics with intervals, and its paired differences against the reference;
    with both fp32 sides, PEFT-sequential fp32 against loraens fp32 ("fp32_pair")."""
    targets = torch.tensor([q.answer for q in task.eval_q])
    ref = ensemble_probs(probs[REFERENCE])
    for name, p in probs.items():
        ens = ensemble_probs(p)
        side = out["sides"][name]
        side["cis"] = metric_cis(ens, targets, n_resamples=1000, seed=SEED)
        if name != REFERENCE:
            side["diff"] = paired_metric_diffs(ens, ref, targets, n_resamples=1000, seed=SEED)
            side["argmax_agreement"] = float((ens.argmax(-1) == ref.argmax(-1)).float().mean())
    if PEFT_SIDE in probs and FP32_SIDE in probs:
        # The same arithmetic on both sides: what remains is the vectorised member axis itself.
        ours32, peft32 = ensemble_probs(probs[FP32_SIDE]), ensemble_probs(probs[PEFT_SIDE])
        out["fp32_pair"] = {"diff": paired_metric_diffs(peft32, ours32, targets, n_resamples=1000, seed=SEED),
                            "argmax_agreement": float((peft32.argmax(-1) == ours32.argmax(-1)).float().mean()),
                            "max_prob_diff": float((probs[PEFT_SIDE] - probs[FP32_SIDE]).abs().max())}
