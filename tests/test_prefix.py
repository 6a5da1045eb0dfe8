"""The frozen-prefix cache gives the full-depth results, runs the bottom once per question, and the
fast path (bf16 + cache) stays within a stated tolerance of the float32 full-depth reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraens.batching import collate
from loraens.config import EnsembleConfig, Normalization, Scoring, TrainConfig
from loraens.ensemble import attach_members, first_lora_layer, lora_parameters
from loraens.fast.prefix import prefix_cache_for
from loraens.metrics import compute_metrics, ensemble_probs
from loraens.predict import predict
from loraens.train import train_members
from tests.conftest import scorer


def cfg(cache: bool, **kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 3, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0,
                             "top_layers": 1, "prefix_cache": cache, **kw})


def pair(make_base, randomize_B, **kw):
    """Two identical models with the same members, and the first one's frozen-prefix cache.

    As the run builder does (`run.build_ensemble`): the cache starts at the lowest LoRA layer.
    """
    models = []
    for cache in (True, False):
        model = make_base()
        randomize_B(attach_members(model, cfg(cache, **kw)), std=0.3, seed=5)
        models.append(model)
    cache = prefix_cache_for(models[0], first_lora_layer(models[0]))
    assert cache is not None and cache.first_lora_layer == 1
    return models[0], models[1], cache


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_cached_scores_and_gradients_equal_full_depth(make_base, randomize_B, letter_encoder, cloze_encoder,
                                                     questions, scoring):
    enc = (letter_encoder if scoring is Scoring.LETTER else cloze_encoder)
    qs = enc.encode_all(questions[:6])  # 3-, 4- and 5-choice questions of different lengths
    fast, ref, cache = pair(make_base, randomize_B)
    chunk = np.array([[0, 1, 2], [3, 4, 5], [1, 3, 5]])  # every member its own questions
    out = []
    for model, c in ((fast, cache), (ref, None)):
        batch = collate([qs[i] for i in chunk.reshape(-1)], num_choices=5)
        lp = scorer(scoring, enc.letter_ids, Normalization.MEAN, cache=c).log_probs(model, batch, 3)
        lp.masked_fill(~torch.isfinite(lp), 0).sum().backward()
        out.append((lp.detach(), [p.grad.clone() for p in lora_parameters(model)]))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_bottom_runs_once_per_question(make_base, randomize_B, cloze_encoder, questions):
    fast, ref, cache = pair(make_base, randomize_B)
    qs = cloze_encoder.encode_all(questions[:10])
    ids = [q.id for q in questions[:10]]
    first = predict(fast, qs, ids, 3, scorer(Scoring.CHOICE_LIKELIHOOD, cache=cache), batch_size=4, progress=False)
    assert cache.misses == 10 and cache.hits == 20 and len(cache) == 10  # 30 member rows, 10 questions
    again = predict(fast, qs, ids, 3, scorer(Scoring.CHOICE_LIKELIHOOD, cache=cache), batch_size=3, progress=False)
    assert cache.misses == 10 and cache.hits == 50  # a second pass (other batches) reads the cache only
    torch.testing.assert_close(first.member_probs, again.member_probs, atol=1e-6, rtol=0)
    full = predict(ref, qs, ids, 3, scorer(Scoring.CHOICE_LIKELIHOOD), batch_size=4, progress=False)
    torch.testing.assert_close(first.member_probs, full.member_probs, atol=1e-5, rtol=0)


def test_training_with_the_cache_equals_full_depth_training(make_base, randomize_B, letter_encoder, questions):
    qs = letter_encoder.encode_all(questions[:12])
    fast, ref, cache = pair(make_base, randomize_B)
    train = TrainConfig(epochs=2, lr=0.02, batch_size=4)
    for model, c in ((fast, cache), (ref, None)):
        train_members(model, qs, train, cfg(True), scorer(Scoring.LETTER, letter_encoder.letter_ids, cache=c),
                      progress=False)
    for a, b in zip(lora_parameters(fast), lora_parameters(ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.misses == 12  # the bottom ran once per question over 2 epochs x 3 members


def test_an_over_full_cache_still_gives_the_right_answer(make_base, randomize_B, cloze_encoder, questions):
    fast, ref, cache = pair(make_base, randomize_B)
    cache.max_bytes = 0  # nothing fits: every batch recomputes its distinct questions
    qs = cloze_encoder.encode_all(questions[:5])
    ids = [q.id for q in questions[:5]]
    a = predict(fast, qs, ids, 3, scorer(Scoring.CHOICE_LIKELIHOOD, cache=cache), progress=False).member_probs
    b = predict(ref, qs, ids, 3, scorer(Scoring.CHOICE_LIKELIHOOD), progress=False).member_probs
    assert len(cache) == 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# Quality guard. The fast path (bfloat16 base + frozen-prefix cache) against the float32
# full-depth reference, on a tiny model with the same members: the member probabilities agree to
# PROB_ATOL, the ensemble's NLL to NLL_RTOL, and the predicted answers wherever the reference's
# top two choices are more than TIE_MARGIN apart (bf16 keeps 8 bits of mantissa: ~0.4% relative).
PROB_ATOL = 0.03
NLL_RTOL = 0.03
TIE_MARGIN = 0.05


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_fast_path_matches_the_float32_reference(make_base, randomize_B, letter_encoder, cloze_encoder,
                                                 questions, scoring):
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    qs = enc.encode_all(questions[:24])
    ids = [q.id for q in questions[:24]]
    fast, ref, cache = pair(make_base, randomize_B)
    fast.to(torch.bfloat16)  # LoRA weights stay float32 as in training (the update runs in float32)
    for layer in (m for m in fast.modules() if hasattr(m, "lora_A")):
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    p_fast = predict(fast, qs, ids, 3, scorer(scoring, enc.letter_ids, cache=cache), progress=False)
    p_ref = predict(ref, qs, ids, 3, scorer(scoring, enc.letter_ids), progress=False)
    assert (p_fast.member_probs - p_ref.member_probs).abs().max() < PROB_ATOL
    ens_fast, ens_ref = ensemble_probs(p_fast.member_probs), ensemble_probs(p_ref.member_probs)
    m_fast, m_ref = compute_metrics(ens_fast, p_ref.targets), compute_metrics(ens_ref, p_ref.targets)
    assert m_fast["nll"] == pytest.approx(m_ref["nll"], rel=NLL_RTOL)
    top2 = ens_ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > TIE_MARGIN
    assert torch.equal(ens_fast.argmax(-1)[clear], ens_ref.argmax(-1)[clear])
