"""Every method and regulariser of the paper's study does what its name says.

MC dropout's passes differ; the KL term is zero at initialisation; weight averaging identical
members equals one member; temperature scaling keeps accuracy and lowers validation NLL; the
L2 penalty is the Frobenius norm of the update; weight decay shrinks A and B; the randomness
switches (init, data order, dropout masks) change what differs between members.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import PeftModel

from loraens.batching import collate
from loraens.config import EnsembleConfig, Normalization, Scoring, TrainConfig
from loraens.ensemble import (
    attach_members,
    delta_sq_norms,
    export_member,
    layer_index,
    lora_disabled,
    mc_dropout,
    member_layers,
    weight_averaged,
)
from loraens.methods import (
    apply_temperature,
    best_epoch,
    checkpoint_ensemble,
    ensemble_temperature_scaled,
    fit_temperature,
    temperature_scaled,
)
from loraens.metrics import accuracy, ensemble_probs, nll
from loraens.predict import predict
from loraens.predictions import Predictions
from loraens.train import base_log_probs, choice_kl, train_members, train_step
from tests.conftest import DEVICE, scorer


def ens_config(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 3, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0, **kw})


def scores(model, encoder, questions, m: int) -> torch.Tensor:
    """Member probabilities [N, M, C] of the letter-scored questions."""
    enc = encoder.encode_all(questions)
    return predict(model, enc, [q.id for q in questions], m, scorer(Scoring.LETTER, encoder.letter_ids),
                   progress=False).member_probs


# --------------------------------------------------------------------------- MC dropout

def test_mc_dropout_passes_differ_and_the_model_is_restored(make_base, letter_encoder, questions, randomize_B):
    model = make_base()
    layers = attach_members(model, ens_config(dropout=0.3))
    randomize_B(layers, std=0.3)
    before = scores(model, letter_encoder, questions[:6], 3)
    torch.manual_seed(0)
    with mc_dropout(model, member=1, passes=4, p=0.3):
        mc = scores(model, letter_encoder, questions[:6], 4)  # [N, 4, C]
        assert all(layer.num_members == 4 for layer in layers.values())
    # Each pass draws its own masks, so the passes differ from one another and from the member.
    for s in range(1, 4):
        assert (mc[:, s] - mc[:, 0]).abs().max() > 1e-4
    assert (mc[:, 0] - before[:, 1]).abs().max() > 1e-4
    # Same seed, same passes.
    torch.manual_seed(0)
    with mc_dropout(model, member=1, passes=4, p=0.3):
        torch.testing.assert_close(scores(model, letter_encoder, questions[:6], 4), mc)
    # Restored: three members, dropout off in eval mode, the same predictions as before.
    assert all(layer.num_members == 3 and not layer.force_dropout for layer in layers.values())
    torch.testing.assert_close(scores(model, letter_encoder, questions[:6], 3), before)


def test_mc_dropout_without_dropout_is_an_error(make_base):
    model = make_base()
    attach_members(model, ens_config())
    with pytest.raises(ValueError, match="dropout rate"), mc_dropout(model, member=0, passes=4, p=0.0):
        pass


# --------------------------------------------------------------------------- weight averaging

def test_weight_average_of_identical_members_equals_one_member(make_base, letter_encoder, questions, randomize_B):
    model = make_base()
    layers = attach_members(model, ens_config())
    randomize_B(layers, std=0.3)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[:] = layer.lora_A[0].clone()
            layer.lora_B[:] = layer.lora_B[0].clone()
    member = scores(model, letter_encoder, questions[:8], 3)[:, 0]
    with weight_averaged(model):
        avg = scores(model, letter_encoder, questions[:8], 1)[:, 0]
    torch.testing.assert_close(avg, member, atol=1e-6, rtol=0)


def test_weight_average_is_the_mean_update_not_the_mean_prediction(make_base, letter_encoder, questions, randomize_B):
    model = make_base()
    layers = attach_members(model, ens_config())
    randomize_B(layers, std=0.3)
    means = {n: torch.stack([layer.lora_B[k] @ layer.lora_A[k] for k in range(3)]).mean(0).detach()
             for n, layer in layers.items()}
    member_probs = scores(model, letter_encoder, questions[:8], 3)
    with weight_averaged(model):
        for name, layer in layers.items():  # one member of rank M*r whose update is the mean update
            assert layer.num_members == 1 and layer.lora_A.shape[1] == 12
            torch.testing.assert_close(layer.lora_B[0] @ layer.lora_A[0], means[name], atol=1e-6, rtol=0)
        avg = scores(model, letter_encoder, questions[:8], 1)[:, 0]
    assert (avg - ensemble_probs(member_probs)).abs().max() > 1e-4  # not the prediction average
    assert all(layer.num_members == 3 for layer in layers.values())


# --------------------------------------------------------------------------- temperature scaling

def _overconfident(n: int = 400, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities from logits scaled by 3 (too sharp) with targets drawn from the unscaled ones."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g)
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    return torch.softmax(3 * logits, -1), targets


def test_temperature_scaling_keeps_accuracy_and_lowers_validation_nll():
    probs, targets = _overconfident()
    t = fit_temperature(probs, targets)
    scaled = apply_temperature(probs, t)
    assert t == pytest.approx(3.0, rel=0.25)  # undoes the factor 3
    assert accuracy(scaled, targets) == accuracy(probs, targets)
    assert torch.equal(scaled.argmax(-1), probs.argmax(-1))
    assert nll(scaled, targets) < nll(probs, targets) - 0.05
    # The fitted T is the minimum of the NLL along T.
    for other in (t * 0.8, t * 1.25):
        assert nll(apply_temperature(probs, other), targets) > nll(scaled, targets)


def test_temperature_by_hand_and_padded_choices_stay_zero():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    out = apply_temperature(probs, 2.0)  # p^(1/2) renormalised
    expected = torch.tensor([[math.sqrt(0.5), 0.5, 0.5, 0.0]])
    torch.testing.assert_close(out, expected / expected.sum())
    assert out[0, 3] == 0


def test_calibrated_probabilities_keep_temperature_near_one():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2000, 4, generator=g), -1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)
    assert fit_temperature(probs, targets) == pytest.approx(1.0, abs=0.15)


def test_temperature_scaled_members_and_ensemble():
    probs, targets = _overconfident(300)
    member_probs = torch.stack([probs, probs.roll(1, 0)], 1)  # [N, 2, C]
    p = Predictions(member_probs, targets, torch.ones(300, 4, dtype=torch.bool), [str(i) for i in range(300)])
    _, scaled_test, temps = temperature_scaled(p, p)
    assert len(temps) == 3 and temps[0] > 2  # member 0 is too sharp
    for k in range(2):
        assert accuracy(scaled_test.member_probs[:, k], targets) == accuracy(member_probs[:, k], targets)
        assert nll(scaled_test.member_probs[:, k], targets) <= nll(member_probs[:, k], targets)
    ens, t = ensemble_temperature_scaled(p, p)
    assert t == pytest.approx(temps[-1])
    assert nll(ens, targets) <= nll(ensemble_probs(member_probs), targets)


# --------------------------------------------------------------------------- checkpoints, early stopping

def test_checkpoint_ensemble_stacks_one_member_over_epochs():
    t, mask = torch.tensor([0, 1]), torch.ones(2, 2, dtype=torch.bool)
    epochs = [Predictions(torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.8], [0.5, 0.5]]]) * 1.0, t, mask, ["a",
                                                                                                              "b"]),
              Predictions(torch.tensor([[[0.7, 0.3], [0.5, 0.5]], [[0.4, 0.6], [0.5, 0.5]]]) * 1.0, t, mask, ["a",
                                                                                                              "b"])]
    snap = checkpoint_ensemble(epochs, member=0)
    assert snap.member_probs.shape == (2, 2, 2)
    torch.testing.assert_close(ensemble_probs(snap.member_probs).float(), torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    with pytest.raises(ValueError, match="different questions"):
        checkpoint_ensemble([epochs[0], Predictions(epochs[1].member_probs, t, mask, ["a", "c"])])


def test_best_epoch_is_the_lowest_validation_nll():
    assert best_epoch([1.0, 0.8, 0.9, 0.8]) == 2  # 1-based, first of ties
    with pytest.raises(ValueError):
        best_epoch([])


# --------------------------------------------------------------------------- KL to the base model

def test_kl_is_zero_at_initialisation_and_positive_after_training(make_base, letter_encoder, questions, randomize_B):
    model = make_base()
    layers = attach_members(model, ens_config())  # B = 0: every member is the base model
    enc = letter_encoder.encode_all(questions[:8])
    ref = base_log_probs(model, enc, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)  # [N, C]
    batch = collate(enc, num_choices=5).repeat_members(3)
    lp = scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(model, batch, 3)  # [M, N, C], model's device
    # `base_log_probs` returns CPU log-probs (as train_step below takes them); compare on the model's device.
    ref_there = ref.to(lp.device)
    kl = choice_kl(lp, ref_there[None].expand(3, -1, -1))
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    # So at init the regularised loss and its gradient equal the plain ones.
    chunk = np.tile(np.arange(8), (3, 1))
    grads = []
    for coef in (0.0, 1.0):
        model.zero_grad()
        train_step(model, enc, chunk, scorer(Scoring.LETTER, letter_encoder.letter_ids, Normalization.MEAN),
                   TrainConfig(kl_coef=coef), 5, ref)
        grads.append([p.grad.clone() for layer in layers.values() for p in (layer.lora_A, layer.lora_B)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    randomize_B(layers, std=0.3)
    lp = scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(model, batch, 3)
    assert (choice_kl(lp, ref_there[None].expand(3, -1, -1)) > 1e-4).all()


def test_choice_kl_by_hand_with_padded_choices():
    p = torch.tensor([[0.5, 0.5, 0.0]]).log()
    q = torch.tensor([[0.25, 0.75, 0.0]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    p.requires_grad_(True)
    kl = choice_kl(p, q)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()  # the padded -inf choice does not poison the gradient


def test_kl_regulariser_keeps_members_closer_to_the_base(make_base, letter_encoder, questions):
    enc = letter_encoder.encode_all(questions[:16])
    cfg = ens_config(num_members=2)
    kls = []
    for coef in (0.0, 5.0):
        model = make_base()
        attach_members(model, cfg)
        train_members(model, enc, TrainConfig(epochs=3, lr=0.05, batch_size=4, kl_coef=coef), cfg,
                      scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
        ref = base_log_probs(model, enc, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
        with torch.no_grad():
            batch = collate(enc, num_choices=5).repeat_members(2)
            lp = scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(model.eval(), batch, 2)
        kls.append(choice_kl(lp, ref.to(lp.device)[None].expand(2, -1, -1)).mean().item())
    assert kls[1] < 0.5 * kls[0]


def test_lora_disabled_is_the_base_model(make_base, letter_encoder, questions, randomize_B):
    model = make_base()
    plain = make_base()
    enc = letter_encoder.encode_all(questions[:4])
    ids = [q.id for q in questions[:4]]
    ref = predict(_attach_zero(plain), enc, ids, 1, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    randomize_B(attach_members(model, ens_config()), std=0.5)
    with lora_disabled(model):
        out = predict(model, enc, ids, 1, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
    torch.testing.assert_close(out.member_probs, ref.member_probs, atol=1e-6, rtol=0)


def _attach_zero(model):
    attach_members(model, ens_config(num_members=1))  # B = 0: the base model
    return model


# --------------------------------------------------------------------------- L2 on the update

def test_delta_sq_norms_is_the_frobenius_norm_of_the_update(make_base, randomize_B):
    model = make_base()
    layers = attach_members(model, ens_config())
    randomize_B(layers, std=0.3)
    by_hand = torch.zeros(3, device=DEVICE)
    for layer in layers.values():
        for k in range(3):
            by_hand[k] += (layer.scaling * layer.lora_B[k] @ layer.lora_A[k]).pow(2).sum()
    torch.testing.assert_close(delta_sq_norms(model).detach(), by_hand.detach(), rtol=1e-5, atol=1e-6)


def lora_sq_norms(model) -> torch.Tensor:
    """Sum of squares of every member's A and B over all layers, [M]."""
    return sum((layer.lora_A.detach() ** 2).sum((1, 2)) + (layer.lora_B.detach() ** 2).sum((1, 2))
               for layer in member_layers(model).values())


@pytest.mark.parametrize("setting, value, size", [
    ("delta_l2", 1.0, delta_sq_norms),  # the L2 penalty shrinks the update dW = scaling * B A
    ("weight_decay", 5.0, lora_sq_norms),  # decoupled decay shrinks the weights A and B themselves
])
def test_regulariser_shrinks_what_it_penalises(make_base, letter_encoder, questions, randomize_B, setting, value, size):
    """The same run with the regulariser on ends with a smaller penalised quantity for every member."""
    enc = letter_encoder.encode_all(questions[:8])
    cfg = ens_config(num_members=2)
    norms = []
    for coef in (0.0, value):
        model = make_base()
        randomize_B(attach_members(model, cfg), std=0.3)
        train_members(model, enc, TrainConfig(epochs=2, lr=0.02, batch_size=4, **{setting: coef}), cfg,
                      scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
        norms.append(size(model).detach())
    assert (norms[1] < 0.8 * norms[0]).all()


def test_dropout_masks_differ_between_members(make_base, tokenizer, randomize_B):
    """Randomness ablation (d): members with identical weights and identical input rows still
    differ in training mode, because each member row draws its own dropout mask."""
    model = make_base()
    layers = attach_members(model, ens_config(num_members=2, dropout=0.3, member_init=False))
    randomize_B(layers, std=0.3)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[1].copy_(layer.lora_B[0])
    ids = tokenizer("Which gas do plants take in?", return_tensors="pt").input_ids.repeat(2, 1)  # one row per member
    ids = ids.to(DEVICE)
    model.eval()
    with torch.no_grad():
        same = model(ids).logits
    assert torch.allclose(same[0], same[1])
    model.train()
    with torch.no_grad():
        masked = model(ids).logits
    assert (masked[0] - masked[1]).abs().max() > 1e-4


# --------------------------------------------------------------------------- randomness switches, top layers

def test_member_init_false_gives_identical_initialisations(make_base):
    same = attach_members(make_base(), ens_config(member_init=False))
    own = attach_members(make_base(), ens_config(member_init=True))
    for layer in same.values():
        assert torch.equal(layer.lora_A[0], layer.lora_A[1]) and torch.equal(layer.lora_A[0], layer.lora_A[2])
    first = next(iter(own.values()))
    assert not torch.equal(first.lora_A[0], first.lora_A[1])
    # Member 0's draw is the same either way.
    assert torch.equal(next(iter(same.values())).lora_A[0], first.lora_A[0])


def test_top_layers_wraps_only_the_top_layers_and_exports_to_peft(make_base, tokenizer, tmp_path, randomize_B):
    model = make_base()
    n = model.config.num_hidden_layers
    cfg = ens_config(num_members=2, top_layers=1)
    layers = attach_members(model, cfg)
    assert {layer_index(name) for name in layers} == {n - 1}
    assert len(layers) == 2  # q_proj and v_proj of the last layer
    randomize_B(layers, std=0.3)
    ids = torch.tensor([tokenizer("Question: why is the sky blue?")["input_ids"]], device=DEVICE)
    with torch.no_grad():
        out = model(ids.repeat(2, 1)).logits
    peft_model = PeftModel.from_pretrained(make_base(), str(export_member(model, 1, tmp_path / "m1", cfg)))
    peft_model.to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(out[1:], peft_model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="more than the model"):
        attach_members(make_base(), ens_config(top_layers=n + 1))


def test_top_layers_trains_without_backward_through_the_frozen_bottom(make_base, letter_encoder, questions):
    model = make_base()
    attach_members(model, ens_config(top_layers=1))
    seen = []
    for layer in model.model.layers:  # does autograd track each layer's MLP output?
        # (The MLP, not the layer: the last layer runs through `loraens.last_layer`'s wrapper.)
        layer.mlp.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    enc = letter_encoder.encode_all(questions[:4])
    lp = scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(model, collate(enc,
                                                                                    num_choices=5).repeat_members(3), 3)
    assert seen == [False] * (len(seen) - 1) + [True]  # only the top layer is part of the backward graph
    lp[..., 0].sum().backward()
    assert all(p.grad is not None for layer in member_layers(model).values() for p in (layer.lora_A, layer.lora_B))


@pytest.mark.parametrize("reg", [{"kl_coef": 1.0}, {"delta_l2": 0.5}])
def test_regularised_gradient_of_a_member_does_not_depend_on_the_others(make_base, letter_encoder, questions,
                                                                       randomize_B, reg):
    """The regularisers are per member, so training M members together stays M separate trainings."""
    enc = letter_encoder.encode_all(questions[:6])
    chunk = np.tile(np.arange(6), (3, 1))
    grads = []
    for perturb in (False, True):
        model = make_base()
        layers = attach_members(model, ens_config())
        randomize_B(layers, std=0.3)
        ref = base_log_probs(model, enc, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False)
        if perturb:  # change members 1 and 2 only
            with torch.no_grad():
                for layer in layers.values():
                    layer.lora_B[1:] += 0.5
        train_step(model, enc, chunk, scorer(Scoring.LETTER, letter_encoder.letter_ids, Normalization.MEAN),
                   TrainConfig(**reg), 5, ref)
        grads.append([p.grad[0].clone() for layer in layers.values() for p in (layer.lora_A, layer.lora_B)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_temperature_with_a_real_choice_at_probability_zero_needs_the_mask():
    probs, targets = _overconfident(200)
    probs = probs.clone()
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # underflowed real choices
    targets[0] = 1
    mask = torch.ones_like(probs, dtype=torch.bool)
    t = fit_temperature(probs, targets, mask)
    assert 2.0 < t < 10.0  # finite NLL: not pushed to the bound (54.6) by one infinite term
    assert apply_temperature(probs, t, mask)[0, 1] > 0


def test_best_epoch_never_picks_a_diverged_epoch():
    assert best_epoch([float("nan"), 0.9, 0.8]) == 3
    assert best_epoch([0.7, float("nan")]) == 1


def test_weight_averaged_checks_the_member_list(make_base):
    model = make_base()
    attach_members(model, ens_config())
    for bad in ([], [3], [-1]):
        with pytest.raises(ValueError, match="members must be"), weight_averaged(model, bad):
            pass
    assert all(layer.num_members == 3 for layer in member_layers(model).values())
