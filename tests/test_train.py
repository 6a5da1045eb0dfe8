"""Tests of `loraens.train`: the vectorised training of M members equals M separate PEFT trainings.

The key test trains an M=3 ensemble with `train_members` (one forward/backward for all members,
per-member clipping, one AdamW over the stacked parameters) and, for each member separately,
trains that member's exported PEFT adapter on a fresh copy of the base model with a textbook
loop: plain HF forwards scored by the unpacked reference of tests/conftest.py,
`torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` and the same `LambdaLR` schedule.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel

import loraens.train as train_mod
from loraens.batching import collate
from loraens.config import EnsembleConfig, Normalization, Scoring, TrainConfig
from loraens.data import MCQAExample
from loraens.ensemble import active_members, attach_members, export_member, lora_parameters, member_layers
from loraens.model import enable_gradient_checkpointing
from loraens.predict import predict
from loraens.train import linear_schedule, member_batches, member_orders, train_members, train_step
from tests.conftest import DEVICE, scorer

# Final LoRA weights after a few AdamW steps at lr 1e-2. The two paths compute the same math in
# fp32 in a different order (one bmm over members + packed/padded batches vs. per-adapter
# nn.Linear on one unpadded question at a time), so gradients differ by rounding: ~1e-8 absolute
# for gradients of size ~0.1. Adam moves a weight by lr * m / (sqrt(v) + eps), about lr * sign(g)
# per step, so that rounding reaches the weights only as ~lr * 1e-7: measured max |diff| ~2e-7
# after 4 steps, hence atol 1e-5.
# Exception, Adam's eps regime: for a weight whose FIRST gradient is tiny (|g| ~ 1e-7, a few
# times eps = 1e-8), the first update lr * g / (|g| + eps) changes by lr * eps * dg / g^2, and
# a 1e-8 rounding difference dg becomes ~2e-5 (seen once in ~2700 weights). Those rare weights
# (first |g| < 1e-5 = 1000 eps) are compared with a looser bound, a tenth of one step (lr = 1e-2).
WEIGHT_ATOL = 1e-5
EPS_REGIME_GRAD = 1e-5
EPS_REGIME_ATOL = 1e-3
LOSS_RTOL = 1e-5


def ens_config(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 3, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "dropout": 0.0,
                             "seed": 0, "member_data_order": True, **kw})


def lora_state(model, member: int) -> dict[str, torch.Tensor]:
    return {f"{n}.{w}": getattr(layer, f"lora_{w}")[member].detach().clone()
            for n, layer in member_layers(model).items() for w in ("A", "B")}


def first_step_grads(model, encoded, train: TrainConfig, cfg: EnsembleConfig, scoring, letter_ids,
                     normalization) -> list[dict[str, torch.Tensor]]:
    """Each member's gradients at the first optimizer step (before clipping), as `lora_state` keys, [M]."""
    probe = copy.deepcopy(model)
    lengths = np.array([q.num_tokens for q in encoded])
    orders = member_orders(len(encoded), cfg.num_members, 1, cfg.seed, cfg.member_data_order)
    first = member_batches(orders, lengths, train.batch_size, train.bucket_window, cfg.seed, 1)[0]
    c = max(q.num_choices for q in encoded)
    probe.train()
    train_step(probe, encoded, first, scorer(scoring, letter_ids, normalization), TrainConfig(), c)
    return [{f"{n}.{w}": getattr(layer, f"lora_{w}").grad[k].clone()
             for n, layer in member_layers(probe).items() for w in ("A", "B")} for k in range(cfg.num_members)]


def assert_weights_close(mine: dict, ref: dict, first_grads: dict) -> None:
    """atol WEIGHT_ATOL, except the rare weights in Adam's eps regime (see the top of this file)."""
    assert set(mine) == set(ref) == set(first_grads)
    regime_count, total = 0, 0
    for key in mine:
        regime = first_grads[key].abs() < EPS_REGIME_GRAD
        regime_count += int(regime.sum())
        total += regime.numel()
        torch.testing.assert_close(mine[key][~regime], ref[key][~regime], atol=WEIGHT_ATOL, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(mine[key][regime], ref[key][regime], atol=EPS_REGIME_ATOL, rtol=0,
                                   msg=lambda m, key=key: f"{key} (Adam eps regime): {m}")
    assert regime_count <= 0.01 * total, f"{regime_count} of {total} weights had a near-zero first gradient"


def peft_state(peft_model) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            out[f"{short}.A"] = module.lora_A["default"].weight.detach().clone()
            out[f"{short}.B"] = module.lora_B["default"].weight.detach().clone()
    return out


def ensemble(make_base, randomize_B, cfg: EnsembleConfig, b_std: float = 0.1):
    model = make_base()
    randomize_B(attach_members(model, cfg), std=b_std)
    return model


def encoder_for(scoring, letter_encoder, cloze_encoder):
    return letter_encoder if scoring is Scoring.LETTER else cloze_encoder


# ---------------------------------------------------------------- the key test


def reference_member_training(peft_model, encoded, train: TrainConfig, cfg: EnsembleConfig, member: int,
                              total: int, scoring, letter_ids, normalization, reference):
    """Train ONE member's PEFT adapter alone, the textbook way; returns (pre-clip norms, epoch losses)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = round(train.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, warmup))
    peft_model.train()
    n, b = len(encoded), train.batch_size
    lengths = np.array([q.num_tokens for q in encoded])
    norms, epoch_losses, step = [], [], 0
    for epoch in range(1, train.epochs + 1):
        orders = member_orders(n, cfg.num_members, epoch, cfg.seed, cfg.member_data_order)
        losses = []
        for chunk in member_batches(orders, lengths, b, train.bucket_window, cfg.seed, epoch):
            if step >= total:
                break
            idx = chunk[member]  # member k's questions at this step
            per_q = torch.stack([-reference(peft_model, encoded[i], scoring, letter_ids,
                                            normalization)[encoded[i].answer]
                                 for i in idx])
            per_q.mean().backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses += per_q.detach().tolist()
            step += 1
        if losses:
            epoch_losses.append(float(np.mean(losses)))
    return norms, epoch_losses


@pytest.mark.parametrize(("scoring", "normalization", "bucket_window"), [
    (Scoring.LETTER, Normalization.MEAN, 1),
    (Scoring.LETTER, Normalization.MEAN, 8),
    (Scoring.CHOICE_LIKELIHOOD, Normalization.SUM, 8),
    (Scoring.CHOICE_LIKELIHOOD, Normalization.MEAN, 1),
], ids=["letter", "letter-bucketed", "cloze-sum-bucketed", "cloze-mean"])
def test_vectorised_training_equals_separate_peft_training(make_base, letter_encoder, cloze_encoder, questions,
                                                           reference, randomize_B, tmp_path, monkeypatch, scoring,
                                                           normalization, bucket_window):
    enc = encoder_for(scoring, letter_encoder, cloze_encoder)
    encoded = enc.encode_all(questions[:10])  # 3, 4 and 5 choices
    cfg = ens_config(num_members=3)
    model = ensemble(make_base, randomize_B, cfg)  # B != 0, so A gets gradients from the first step
    folders = [export_member(model, k, tmp_path / f"member_{k}", cfg) for k in range(3)]  # BEFORE training

    # Clipping must be active for some members and not others: probe the first step's per-member
    # gradient norms on a copy and put max_norm between the smallest and the largest.
    probe_train = TrainConfig(batch_size=4, bucket_window=bucket_window)
    first_grads = first_step_grads(model, encoded, probe_train, cfg, scoring, enc.letter_ids, normalization)
    g = torch.stack([torch.stack([v.pow(2).sum() for v in grads.values()]).sum().sqrt() for grads in first_grads])
    assert g.max() > 1.1 * g.min(), g
    max_norm = float((g.min() * g.max()).sqrt())

    # 10 questions, batches of 4: epoch 1 has steps of 4, 4 and 2 questions (in a shuffled step
    # order with length bucketing); max_steps stops in epoch 2.
    train = TrainConfig(epochs=2, max_steps=4, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, batch_size=4,
                        grad_accum=1, max_grad_norm=max_norm, bucket_window=bucket_window)
    seen_norms: list[torch.Tensor] = []
    real_clip = train_mod.clip_grad_norm_per_member

    def spy(params, max_norm):
        norms = real_clip(params, max_norm)
        seen_norms.append(norms.clone())
        return norms

    monkeypatch.setattr(train_mod, "clip_grad_norm_per_member", spy)
    summaries = train_members(model, encoded, train, cfg, scorer(scoring, enc.letter_ids, normalization),
                              progress=False)
    assert [s.step for s in summaries] == [3, 4]
    assert len(seen_norms) == 4
    clipped = seen_norms[0] > max_norm
    assert clipped.any() and not clipped.all(), (seen_norms[0], max_norm)

    for k in range(3):
        peft_model = PeftModel.from_pretrained(make_base(), str(folders[k]), is_trainable=True).to(DEVICE)
        before = peft_state(peft_model)
        ref_norms, ref_losses = reference_member_training(peft_model, encoded, train, cfg, k, 4, scoring,
                                                          enc.letter_ids, normalization, reference)
        after = peft_state(peft_model)
        mine = lora_state(model, k)
        for key in after:
            assert (after[key] - before[key]).abs().max() > 1e-3, key  # the weights really moved
        assert_weights_close(mine, after, first_grads[k])
        norms = torch.stack([s[k] for s in seen_norms]).cpu()  # on the model's device; the reference's are floats
        torch.testing.assert_close(norms, torch.tensor(ref_norms), rtol=1e-4, atol=0)
        assert [s.train_loss[k] for s in summaries] == pytest.approx(ref_losses, rel=LOSS_RTOL)


# ---------------------------------------------------------------- data order and schedule


def test_member_orders():
    per = member_orders(10, 3, epoch=1, seed=0, per_member=True)
    same = member_orders(10, 3, epoch=1, seed=0, per_member=False)
    assert per.shape == same.shape == (3, 10)
    for row in (*per, *same):
        assert sorted(row.tolist()) == list(range(10))  # a permutation
    assert len({tuple(r) for r in per.tolist()}) == 3  # every member its own order
    assert all((r == same[0]).all() for r in same)  # all the same order
    # A new order each epoch; reproducible; member k's order does not depend on M.
    assert not (member_orders(10, 3, 2, 0, True) == per).all()
    assert (member_orders(10, 3, 1, 0, True) == per).all()
    assert (member_orders(10, 5, 1, 0, True)[:3] == per).all()
    assert not (member_orders(10, 3, 1, 1, True) == per).all()


@pytest.mark.parametrize("bucket_window", [1, 8])
@pytest.mark.parametrize("per_member", [True, False])
def test_train_members_uses_the_member_orders(make_base, letter_encoder, questions, randomize_B, monkeypatch,
                                              per_member, bucket_window):
    calls = []
    real = train_mod.train_step

    def spy(model, questions, chunk, *args):
        calls.append(chunk.copy())
        return real(model, questions, chunk, *args)

    monkeypatch.setattr(train_mod, "train_step", spy)
    cfg = ens_config(num_members=3, member_data_order=per_member)
    model = ensemble(make_base, randomize_B, cfg)
    encoded = letter_encoder.encode_all(questions[:7])
    train = TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.0, batch_size=3, bucket_window=bucket_window)
    train_members(model, encoded, train, cfg, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    assert sorted(c.shape[1] for c in calls) == [1, 3, 3]  # 7 questions in batches of 3
    got = np.concatenate(calls, axis=1)  # [M, n]: each member's questions in the order it saw them
    for row in got:
        assert sorted(row.tolist()) == list(range(7))  # every question once per epoch
    orders = member_orders(7, 3, 1, cfg.seed, per_member)
    if bucket_window == 1:
        assert (got == orders).all()
    lengths = np.array([q.num_tokens for q in encoded])
    expected = member_batches(orders, lengths, 3, bucket_window, cfg.seed, 1)
    assert all((a == b).all() for a, b in zip(calls, expected, strict=True))
    assert (len({tuple(r) for r in got.tolist()}) > 1) == per_member


def test_member_batches_bucket_by_length_within_each_members_window():
    orders = member_orders(40, 2, 1, 0, True)
    lengths = np.arange(40) * 3 % 17  # arbitrary lengths, with ties
    plain = member_batches(orders, lengths, 4, 1, 0, 1)
    assert len(plain) == 10 and all((c == orders[:, 4 * s: 4 * s + 4]).all() for s, c in enumerate(plain))
    bucketed = member_batches(orders, lengths, 4, 2, 0, 1)  # windows of 2 batches = 8 questions
    assert len(bucketed) == 10
    for k in range(2):
        for c in bucketed:
            # The batch's questions come from ONE window of member k's own order...
            windows = {int(np.where(orders[k] == i)[0][0]) // 8 for i in c[k]}
            assert len(windows) == 1
        seen = np.concatenate([c[k] for c in bucketed])
        assert sorted(seen.tolist()) == list(range(40))
    # ... and within a window the batches hold the longest and the shortest questions apart.
    for k in range(2):
        window = orders[k, :8]
        in_window = [c[k] for c in bucketed if set(c[k]) <= set(window)]
        assert len(in_window) == 2
        longer, shorter = sorted(in_window, key=lambda b: -lengths[b].max())
        assert lengths[longer].min() >= lengths[shorter].max()


def test_bucketed_members_see_different_questions_on_a_large_set():
    orders = member_orders(200, 3, 1, 0, True)
    lengths = np.arange(200) % 37
    batches = member_batches(orders, lengths, 4, 8, 0, 1)
    assert len(batches) == 50
    for chunk in batches:
        assert len({frozenset(r) for r in chunk.tolist()}) == 3
        # ... but of similar length: the point of the buckets.
        assert lengths[chunk].max() - lengths[chunk].min() < 37


def test_bucketed_members_see_different_questions_on_a_small_set():
    orders = member_orders(12, 3, 1, 0, True)
    lengths = np.arange(12) + 5  # distinct lengths
    for chunk in member_batches(orders, lengths, 4, 8, 0, 1):
        assert len({frozenset(r) for r in chunk.tolist()}) > 1, chunk


def test_linear_schedule_by_hand():
    f = linear_schedule(total_steps=10, warmup_steps=2)
    assert [f(s) for s in range(12)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0])
    g = linear_schedule(total_steps=4, warmup_steps=0)
    assert [g(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_scheduler_lrs_seen_by_the_optimizer(make_base, letter_encoder, questions, randomize_B, monkeypatch):
    """warmup_ratio 0.25 of 4 steps = 1 warmup step: lr * [1/2, 1, 2/3, 1/3]."""
    lrs = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = ens_config(num_members=2)
    model = ensemble(make_base, randomize_B, cfg)
    train = TrainConfig(epochs=1, lr=0.1, warmup_ratio=0.25, batch_size=1)
    train_members(model, letter_encoder.encode_all(questions[:4]), train, cfg,
                  scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    assert lrs == pytest.approx([0.05, 0.1, 0.1 * 2 / 3, 0.1 / 3])


# ---------------------------------------------------------------- grad accumulation and learning


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_grad_accum_gives_the_same_update(make_base, letter_encoder, cloze_encoder, questions, randomize_B, scoring):
    enc = encoder_for(scoring, letter_encoder, cloze_encoder)
    encoded = enc.encode_all(questions[:8])
    cfg = ens_config(num_members=2)
    models, summaries = [], []
    for accum in (1, 2):
        model = ensemble(make_base, randomize_B, cfg)
        train = TrainConfig(epochs=1, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, batch_size=4, grad_accum=accum,
                            max_grad_norm=0.5)
        if accum == 1:
            first_grads = first_step_grads(model, encoded, train, cfg, scoring, enc.letter_ids, Normalization.MEAN)
        summaries.append(train_members(model, encoded, train, cfg, scorer(scoring, enc.letter_ids), progress=False))
        models.append(model)
    for k in range(2):
        assert_weights_close(lora_state(models[1], k), lora_state(models[0], k), first_grads[k])
    assert summaries[0][0].train_loss == pytest.approx(summaries[1][0].train_loss, rel=LOSS_RTOL)


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_train_step_gradient_does_not_depend_on_micro_batches(make_base, letter_encoder, cloze_encoder, questions,
                                                              randomize_B, scoring):
    """b = 3 (an epoch's short last batch) split into 1, 2 (sizes 2+1) or 3 micro-batches: the same
    gradient and loss (uneven weights)."""
    enc = encoder_for(scoring, letter_encoder, cloze_encoder)
    encoded = enc.encode_all(questions[:6])
    cfg = ens_config(num_members=2)
    model = ensemble(make_base, randomize_B, cfg)
    model.train()
    chunk = np.array([[0, 1, 2], [5, 4, 3]])
    results = []
    for accum in (1, 2, 3):
        copy_ = copy.deepcopy(model)
        loss = train_step(copy_, encoded, chunk, scorer(scoring, enc.letter_ids, Normalization.MEAN),
                          TrainConfig(batch_size=6, grad_accum=accum), 5)
        results.append((loss, [p.grad.clone() for p in lora_parameters(copy_)]))
    (loss1, grads1) = results[0]
    # Hand check of the loss: member k's mean NLL over its 3 questions.
    with torch.no_grad():
        batch = collate([encoded[i] for i in chunk.reshape(-1)], num_choices=5)
        lp = scorer(scoring, enc.letter_ids, Normalization.MEAN).log_probs(model, batch, 2)
    answers = torch.tensor([[encoded[i].answer] for i in chunk.reshape(-1)], device=lp.device).view(2, 3, 1)
    expected = -lp.gather(-1, answers).mean((1, 2)).cpu()  # train_step returns the losses on the CPU
    torch.testing.assert_close(loss1, expected, atol=1e-6, rtol=1e-6)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, loss1, atol=1e-6, rtol=1e-6)
        for g, g1 in zip(grads, grads1):
            torch.testing.assert_close(g, g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_member_chunks_and_gradient_checkpointing_give_the_same_step(make_base, letter_encoder, cloze_encoder,
                                                                      questions, randomize_B, scoring):
    """--train.member_chunk 1 or 2 (uneven: 2+1) and --train.gradient_checkpointing change memory, not the step.

    Checked on the per-member losses and every LoRA gradient, with the KL regulariser on (its base
    log-probs are indexed per member group), against the plain all-members step.
    """
    enc = encoder_for(scoring, letter_encoder, cloze_encoder)
    encoded = enc.encode_all(questions[:6])
    model = ensemble(make_base, randomize_B, ens_config(num_members=3))
    model.train()
    chunk = np.array([[0, 1], [5, 4], [2, 3]])
    # On the CPU, where `base_log_probs` returns it; `train_step` moves it to the model's device.
    base_lp = torch.log_softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)), -1)

    def step(member_chunk=None, checkpointing=False):
        copy_ = copy.deepcopy(model)
        calls = []
        layer = next(iter(member_layers(copy_).values()))
        layer.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
        if checkpointing:
            enable_gradient_checkpointing(copy_)
        loss = train_step(copy_, encoded, chunk, scorer(scoring, enc.letter_ids, Normalization.MEAN),
                          TrainConfig(kl_coef=0.3, member_chunk=member_chunk), 5, base_lp)
        return loss, [p.grad.clone() for p in lora_parameters(copy_)], calls

    loss0, grads0, calls0 = step()
    rows = calls0[0]
    assert calls0 == [rows]  # one forward of all M x b rows
    for member_chunk, want_calls in ((1, [rows // 3] * 3), (2, [rows * 2 // 3, rows // 3])):
        loss, grads, calls = step(member_chunk)
        assert calls == want_calls  # really ran the members in groups of member_chunk
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-6)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    loss, grads, calls = step(checkpointing=True)
    assert calls == [rows, rows]  # the layer ran again in the backward pass: activations were not kept
    torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)


def test_checkpointing_leaves_the_frozen_bottom_layers_out_of_the_backward(make_base, letter_encoder, questions,
                                                                          randomize_B):
    """LoRA in the top layer only, without the prefix cache: layer 0 is frozen, so checkpointing
    must not recompute it in the backward pass (its output needs no gradient), and the step's
    gradients stay those of the plain step."""
    encoded = letter_encoder.encode_all(questions[:4])
    chunk = np.array([[0, 1], [2, 3]])
    results = []
    for checkpointing in (False, True):
        model = make_base()
        randomize_B(attach_members(model, ens_config(num_members=2, top_layers=1, prefix_cache=False)), std=0.1)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        bottom_calls, top_calls = [], []
        layers = model.model.layers
        # Hooks on a layer's first modules: checkpointing's recomputation stops early, as soon as it
        # has what the backward needs, so a hook at the end of a whole layer would not see it.
        layers[0].input_layernorm.register_forward_hook(lambda mod, inp, out,
                                                        calls=bottom_calls: calls.append(out.requires_grad))
        layers[-1].self_attn.q_proj.register_forward_hook(lambda mod, inp, out, calls=top_calls: calls.append(1))
        train_step(model, encoded, chunk, scorer(Scoring.LETTER, letter_encoder.letter_ids, Normalization.MEAN),
                   TrainConfig(), 5)
        results.append([p.grad.clone() for p in lora_parameters(model)])
        assert bottom_calls == [False]  # run once, outside autograd: never recomputed
        assert len(top_calls) == (2 if checkpointing else 1)  # the LoRA layer is
    for g, g0 in zip(results[1], results[0]):
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)


def test_active_members_restores_the_outer_range(make_base):
    model = make_base()
    attach_members(model, ens_config(num_members=3))
    layer = next(iter(member_layers(model).values()))
    with active_members(model, 0, 3):
        with active_members(model, 1, 2):
            assert layer.active == slice(1, 2)
        assert layer.active == slice(0, 3)
    assert layer.active is None


def test_active_members_rejects_a_range_outside_the_ensemble(make_base):
    model = make_base()
    attach_members(model, ens_config(num_members=3))
    with pytest.raises(ValueError, match=r"active_members\(2, 4\).*ensemble of 3"), active_members(model, 2, 4):
        pass
    assert all(layer.active is None for layer in member_layers(model).values())


def member_nll(model, encoded, m, letter_ids) -> torch.Tensor:
    """Mean NLL of the correct choice, per member: [M]."""
    preds = predict(model, encoded, [str(i) for i in range(len(encoded))], m, scorer(Scoring.LETTER, letter_ids),
                    progress=False)
    p = preds.member_probs[torch.arange(len(encoded)), :, preds.targets]  # [N, M]
    return -p.log().mean(0)


def test_training_lowers_every_members_loss(make_base, letter_encoder, randomize_B):
    questions = [
        MCQAExample(id=f"t{i}", question=q, choices=c, answer=a)
        for i, (q, c, a) in enumerate([
            ("What colour is the sky?", ("red", "blue", "green"), 1),
            ("Which animal lives in the sea?", ("cat", "dog", "fish", "bird"), 2),
            ("What is hot?", ("fire", "water", "stone", "moon", "tree"), 0),
            ("What is cold?", ("sun", "fire", "water"), 2),
            ("Which is small?", ("cat", "sea", "moon", "sun"), 0),
            ("What is large?", ("bird", "fish", "sea"), 2),
            ("Which is fast?", ("stone", "tree", "bird", "moon"), 2),
            ("Which is slow?", ("tree", "bird", "fish", "cat", "dog"), 0),
        ])
    ]
    encoded = letter_encoder.encode_all(questions)
    cfg = ens_config(num_members=3)
    model = ensemble(make_base, randomize_B, cfg, b_std=0.0)  # the default start: every member = base
    before = member_nll(model, encoded, 3, letter_encoder.letter_ids)
    train = TrainConfig(epochs=15, lr=2e-2, warmup_ratio=0.0, batch_size=4, max_grad_norm=1.0)
    summaries = train_members(model, encoded, train, cfg, scorer(Scoring.LETTER, letter_encoder.letter_ids),
                              progress=False)
    assert summaries[-1].step == 30
    after = member_nll(model, encoded, 3, letter_encoder.letter_ids)
    assert torch.all(after < 0.5 * before), (before, after)
    assert all(late < early for early, late in zip(summaries[0].train_loss, summaries[-1].train_loss))
    assert not model.training  # train_members leaves the model in eval mode


def test_no_questions_is_an_error(base_model):
    attach_members(base_model, ens_config())
    with pytest.raises(ValueError, match="No training questions"):
        train_members(base_model, [], TrainConfig(), ens_config(), scorer(Scoring.LETTER), progress=False)


def test_choice_likelihood_gradients_are_finite_with_padding(make_base, cloze_encoder, questions, randomize_B):
    """Padded positions of packed rows must not leak NaN into the gradients (SDPA with empty mask rows)."""
    cfg = ens_config(num_members=2)
    model = ensemble(make_base, randomize_B, cfg)
    encoded = cloze_encoder.encode_all(questions[:4])
    assert len({q.num_tokens for q in encoded}) > 1
    model.train()
    chunk = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    train_step(model, encoded, chunk, scorer(Scoring.CHOICE_LIKELIHOOD, (), Normalization.MEAN), TrainConfig(), 5)
    for p in lora_parameters(model):
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    batch = collate(encoded)
    assert batch.attention_mask.any(-1).all()  # no query row without a key
