"""The diversity levers (loraens.diversity): each changes what it claims and nothing else.

- bagging: member k's training questions are exactly its own bootstrap bag, every epoch;
- hyper-diversity: the optimizer applies each member's drawn lr and weight decay, checked against
  torch's AdamW run on that member alone with those values, and against training that member alone;
- per-member targets: a member's other modules stay exactly the base model's (A = B = 0).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import loraens.train as train_mod
from loraens.config import ConfigError, EnsembleConfig, RunConfig, Scoring, TrainConfig
from loraens.diversity import (
    apply_member_hyperparameters,
    member_bag,
    member_hyperparameters,
    member_targets,
)
from loraens.ensemble import attach_members, lora_parameters, member_layers
from loraens.train import linear_schedule, member_orders, train_members
from tests.conftest import scorer


def ens_config(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 3, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0, **kw})


# ---------------------------------------------------------------- bagging

def test_member_bag_is_a_seeded_bootstrap_resample():
    bag = member_bag(50, seed=0, member=1)
    assert bag.shape == (50,) and bag.min() >= 0 and bag.max() < 50
    assert len(set(bag.tolist())) < 50  # drawn with replacement: some questions twice, some never
    assert (member_bag(50, 0, 1) == bag).all()  # reproducible
    assert not (member_bag(50, 0, 2) == bag).all()  # its own per member
    assert not (member_bag(50, 1, 1) == bag).all()  # and per seed
    # About 1 - 1/e of the questions are in a bag.
    share = np.mean([len(set(member_bag(2000, 0, k).tolist())) / 2000 for k in range(5)])
    assert abs(share - (1 - np.exp(-1))) < 0.02


def test_bagged_orders_visit_each_members_bag_in_a_new_order_every_epoch():
    n = 20
    e1 = member_orders(n, 3, 1, seed=0, per_member=True, bagging=True)
    e2 = member_orders(n, 3, 2, seed=0, per_member=True, bagging=True)
    for k in range(3):
        bag = Counter(member_bag(n, 0, k).tolist())
        assert Counter(e1[k].tolist()) == bag == Counter(e2[k].tolist())  # the same multiset every epoch
    assert not (e1 == e2).all()
    assert len({tuple(sorted(r)) for r in e1.tolist()}) == 3  # members see different multisets
    # The member's bag depends on its global index only (a torchrun shard gets the same one).
    assert (member_orders(n, 2, 1, 0, True, first_member=1, bagging=True) == e1[1:]).all()
    # Without bagging nothing changes: every member sees every question once.
    plain = member_orders(n, 3, 1, 0, True)
    assert all(sorted(r) == list(range(n)) for r in plain.tolist())


def test_train_members_trains_each_member_on_its_bag(make_base, letter_encoder, questions, monkeypatch):
    calls = []
    real = train_mod.train_step

    def spy(model, questions, chunk, *args):
        calls.append(chunk.copy())
        return real(model, questions, chunk, *args)

    monkeypatch.setattr(train_mod, "train_step", spy)
    cfg = ens_config(bagging=True)
    model = make_base()
    attach_members(model, cfg)
    encoded = letter_encoder.encode_all(questions[:9])
    train = TrainConfig(epochs=2, lr=1e-3, warmup_ratio=0.0, batch_size=3, bucket_window=1)
    train_members(model, encoded, train, cfg, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    seen = np.concatenate(calls, axis=1)  # [M, 2 * 9]
    for k in range(3):
        bag = Counter(member_bag(9, 0, k).tolist())
        assert Counter(seen[k, :9].tolist()) == bag and Counter(seen[k, 9:].tolist()) == bag


# ---------------------------------------------------------------- hyper-diversity

def test_member_hyperparameters_draws_within_the_ranges():
    cfg = ens_config(num_members=6, lr_range=[1e-4, 1e-2], weight_decay_range=[0.0, 0.5])
    hyper = member_hyperparameters(cfg, TrainConfig())
    assert hyper is not None and hyper.lr.shape == (6,) and hyper.weight_decay.shape == (6,)
    assert ((hyper.lr >= 1e-4) & (hyper.lr <= 1e-2)).all() and len(set(hyper.lr.tolist())) == 6
    assert ((hyper.weight_decay >= 0) & (hyper.weight_decay <= 0.5)).all()
    # Member k's draw does not depend on the ensemble size or on the process that trains it.
    shard = member_hyperparameters(cfg, TrainConfig(), first_member=2, num_members=3)
    assert torch.equal(shard.lr, hyper.lr[2:5]) and torch.equal(shard.weight_decay, hyper.weight_decay[2:5])
    # One range alone: the other setting is --train's for every member.
    only_lr = member_hyperparameters(ens_config(lr_range=[1e-3, 2e-3]), TrainConfig(weight_decay=0.25))
    assert only_lr.weight_decay.tolist() == [0.25] * 3
    only_wd = member_hyperparameters(ens_config(weight_decay_range=[0.1, 0.2]), TrainConfig(lr=3e-3))
    assert only_wd.lr.tolist() == [3e-3] * 3
    assert member_hyperparameters(ens_config(), TrainConfig()) is None


def test_lr_draws_are_log_uniform():
    cfg = ens_config(num_members=4000, lr_range=[1e-4, 1e-2])
    lr = member_hyperparameters(cfg, TrainConfig()).lr.numpy()
    # log10(lr) is uniform on [-4, -2]: its median is -3 and a quarter lies below -3.5.
    assert abs(np.median(np.log10(lr)) + 3) < 0.05
    assert abs(np.mean(np.log10(lr) < -3.5) - 0.25) < 0.03


def test_member_steps_equal_adamw_run_on_each_member_alone():
    """Five steps with a warmup/decay schedule: the stacked parameter, rescaled per member, equals
    torch's AdamW(lr_k, weight_decay_k) run on member k's slice by itself."""
    m, base_lr = 3, 1e-2
    cfg = ens_config(num_members=m, lr_range=[1e-3, 5e-2], weight_decay_range=[0.0, 2.0])
    hyper = member_hyperparameters(cfg, TrainConfig(lr=base_lr))
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(m, 4, 5, generator=gen)
    grads = [torch.randn(m, 4, 5, generator=gen) for _ in range(5)]
    stacked = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([stacked], lr=base_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(5, 2))
    alone = [torch.nn.Parameter(init[k].clone()) for k in range(m)]
    refs = [torch.optim.AdamW([p], lr=float(hyper.lr[k]), weight_decay=float(hyper.weight_decay[k]))
            for k, p in enumerate(alone)]
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(o, linear_schedule(5, 2)) for o in refs]
    for g in grads:
        stacked.grad = g.clone()
        before = [stacked.detach().clone()]
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        apply_member_hyperparameters([stacked], before, lr_now, base_lr, hyper)
        sched.step()
        for k in range(m):
            alone[k].grad = g[k].clone()
            refs[k].step()
            ref_scheds[k].step()
    for k in range(m):
        torch.testing.assert_close(stacked[k].detach(), alone[k].detach(), atol=1e-6, rtol=1e-5)
    # The members really moved by different amounts (the lever does something).
    moved = (stacked.detach() - init).abs().mean(dim=(1, 2))
    assert len(set(np.round(moved.numpy(), 6).tolist())) == m


def test_each_member_trains_as_it_would_alone_with_its_drawn_settings(make_base, letter_encoder, questions):
    """Training 3 members with drawn lr/wd gives member k the weights of member k trained alone (the
    torchrun shard path, first_member=k) with --train.lr lr_k and --train.weight_decay wd_k."""
    encoded = letter_encoder.encode_all(questions[:8])
    cfg = ens_config(lr_range=[2e-3, 2e-2], weight_decay_range=[0.0, 1.0])
    sc = scorer(Scoring.LETTER, letter_encoder.letter_ids)
    train = TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.25, batch_size=4, bucket_window=1)
    model = make_base()
    attach_members(model, cfg)
    for layer in member_layers(model).values():  # non-zero B, so A moves too
        torch.nn.init.normal_(layer.lora_B, std=0.05, generator=torch.Generator().manual_seed(3))
    start = [p.detach().clone() for p in lora_parameters(model)]
    train_members(model, encoded, train, cfg, sc, progress=False)
    hyper = member_hyperparameters(cfg, train)
    for k in range(3):
        one = make_base()
        single = ens_config(num_members=1)
        attach_members(one, single, first_member=k)
        with torch.no_grad():
            for p, s in zip(lora_parameters(one), start):
                p.copy_(s[k: k + 1])
        own = TrainConfig(epochs=2, lr=float(hyper.lr[k]), weight_decay=float(hyper.weight_decay[k]),
                          warmup_ratio=0.25, batch_size=4, bucket_window=1)
        train_members(one, encoded, own, single, sc, progress=False, first_member=k)
        for p, q in zip(lora_parameters(model), lora_parameters(one)):
            torch.testing.assert_close(p[k].detach(), q[0].detach(), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- per-member targets

def test_member_targets_cycle_over_the_members():
    cfg = ens_config(num_members=5, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                     member_targets=["q_proj+v_proj", "k_proj+o_proj"])
    assert [member_targets(cfg, k) for k in range(5)] == [{"q_proj", "v_proj"}, {"k_proj", "o_proj"}] * 2 + [
        {"q_proj", "v_proj"}]
    assert member_targets(ens_config(), 0) is None


def test_a_member_leaves_the_modules_it_does_not_target_at_the_base(make_base, letter_encoder, questions):
    cfg = ens_config(num_members=2, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                     member_targets=["q_proj+v_proj", "k_proj+o_proj"])
    model = make_base()
    attach_members(model, cfg)
    train = TrainConfig(epochs=2, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, batch_size=4)
    train_members(model, letter_encoder.encode_all(questions[:8]), train, cfg,
                  scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    for name, layer in member_layers(model).items():
        short = name.rsplit(".", 1)[-1]
        for k, own in enumerate(({"q_proj", "v_proj"}, {"k_proj", "o_proj"})):
            if short in own:
                assert layer.lora_B[k].abs().sum() > 0, (name, k)  # it trained
            else:
                assert layer.lora_A[k].abs().sum() == 0 and layer.lora_B[k].abs().sum() == 0, (name, k)


def test_member_targets_keep_the_other_modules_init_unchanged(make_base):
    all_cfg = ens_config(num_members=2, target_modules=["q_proj", "v_proj"])
    some = ens_config(num_members=2, target_modules=["q_proj", "v_proj"], member_targets=["q_proj+v_proj", "v_proj"])
    a, b = make_base(), make_base()
    la, lb = attach_members(a, all_cfg), attach_members(b, some)
    for name in la:
        assert torch.equal(la[name].lora_A[0], lb[name].lora_A[0])
        if name.endswith("v_proj"):
            assert torch.equal(la[name].lora_A[1], lb[name].lora_A[1])
        else:
            assert lb[name].lora_A[1].abs().sum() == 0


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("raw, flag", [
    ({"lr_range": [1e-2, 1e-3]}, "lr_range"),
    ({"lr_range": [0.0, 1e-3]}, "lr_range"),
    ({"lr_range": [1e-3]}, "lr_range"),
    ({"weight_decay_range": [-1.0, 1.0]}, "weight_decay_range"),
    ({"member_targets": ["q_proj+k_proj"]}, "member_targets"),
    ({"member_targets": ["q_proj+"]}, "member_targets"),
])
def test_bad_lever_settings_name_the_flag(raw, flag):
    with pytest.raises(ConfigError, match=f"--ensemble.{flag}"):
        RunConfig.from_dict({"ensemble": raw})


def test_levers_read_from_the_command_line_form():
    cfg = RunConfig.from_dict({"ensemble": {"lr_range": "1e-3,4e-3", "weight_decay_range": "0,0.5",
                                            "member_targets": "q_proj+v_proj,v_proj", "bagging": "true"}})
    assert cfg.ensemble.lr_range == [1e-3, 4e-3] and cfg.ensemble.weight_decay_range == [0.0, 0.5]
    assert cfg.ensemble.member_targets == ["q_proj+v_proj", "v_proj"] and cfg.ensemble.bagging is True
    assert RunConfig.from_dict(cfg.to_dict()).ensemble == cfg.ensemble  # round-trips through YAML


def test_trainable_parameters_count_only_a_members_own_modules(make_base):
    from loraens.diversity import trainable_per_member

    cfg = ens_config(num_members=2, target_modules=["q_proj", "v_proj"], member_targets=["q_proj+v_proj", "v_proj"])
    layers = attach_members(make_base(), cfg)
    size = {n: layer.lora_A[0].numel() + layer.lora_B[0].numel() for n, layer in layers.items()}
    both = sum(size.values())
    v_only = sum(v for n, v in size.items() if n.endswith("v_proj"))
    assert trainable_per_member(layers, cfg) == round((both + v_only) / 2)
    plain = ens_config(num_members=2, target_modules=["q_proj", "v_proj"])
    assert trainable_per_member(attach_members(make_base(), plain), plain) == both
