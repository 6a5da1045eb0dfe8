"""Tests of `loraens.scoring`, `loraens.batching` and `loraens.predict` against unpacked references.

The references (tests/conftest.py) run the plain HF model on ONE question at a time (letter) or on
prompt + ONE choice at a time (choice-likelihood) and read the full-vocabulary logits, so they
check the packing (block attention mask, restarted position ids), the right-padding and the
restricted output head all at once.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraens.batching import collate, length_sorted_batches
from loraens.config import EnsembleConfig, Normalization, PromptConfig, Scoring
from loraens.data import MCQAExample
from loraens.ensemble import attach_members, export_member
from loraens.predict import predict
from loraens.predictions import Predictions
from loraens.prompts import PromptEncoder, PromptError, letter_token_ids
from tests.conftest import DEVICE, scorer

# Packed vs unpacked fp32 forwards differ by summation order only (different sequence lengths,
# SDPA mask layouts, restricted vs full output head). Measured: <= 2e-6 for letter and mean
# scores, up to 8e-6 for summed choice log-probabilities (sums of up to ~10 token log-probs of
# magnitude ~5); 3e-5 leaves room for other CPUs' BLAS kernels, while a wrong mask or wrong
# position ids shift these log-probabilities by 0.1-1.
ATOL = 3e-5


def ens_config(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 2, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0, **kw})


def scored(model, encoded, m, scoring, letter_ids=(), normalization=Normalization.MEAN, c=None):
    """Member log-probs [M, B, C] of `encoded`, on the model's device."""
    with torch.no_grad():
        batch = collate(encoded, num_choices=c).repeat_members(m)
        return scorer(scoring, letter_ids, normalization).log_probs(model, batch, m)


def assert_matches_reference(lp, refs, choice_counts):
    """lp [B, C] against per-question reference log-probs (both on the model's device); masked choices must be -inf."""
    for i, (ref, n) in enumerate(zip(refs, choice_counts)):
        torch.testing.assert_close(lp[i, :n], ref, atol=ATOL, rtol=0)
        assert torch.all(lp[i, n:] == float("-inf"))
        assert lp[i, :n].exp().sum().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- packed vs unpacked


@pytest.mark.parametrize("normalization", [Normalization.SUM, Normalization.MEAN])
def test_packed_choice_likelihood_equals_unpacked(base_model, cloze_encoder, questions, reference, normalization):
    encoded = cloze_encoder.encode_all(questions[:6])  # 3, 4, 5, 3, 4, 5 choices, varied lengths
    assert {q.num_choices for q in encoded} == {3, 4, 5}
    assert len({q.num_tokens for q in encoded}) > 1  # rows are really padded
    assert len({len(c) for q in encoded for c in q.continuations}) > 1  # choices of different lengths
    lp = scored(base_model, encoded, 1, Scoring.CHOICE_LIKELIHOOD, normalization=normalization)[0]
    assert lp.shape == (6, 5)
    refs = [reference(base_model, q, Scoring.CHOICE_LIKELIHOOD, normalization=normalization) for q in encoded]
    assert_matches_reference(lp, refs, [q.num_choices for q in encoded])


def test_choice_head_runs_once_per_distinct_position(base_model, cloze_encoder, questions, monkeypatch):
    """The prompt's last token predicts every choice's first token: one head row for all of them,
    so a question with choices of n_1..n_C tokens needs 1 + sum(n_c - 1) rows, not sum(n_c)."""
    import loraens.scoring as scoring_mod

    seen, original = [], scoring_mod.token_log_probs

    def spy(hidden, weight, targets, *args, **kw):
        seen.append((hidden.shape[0], len(targets)))
        return original(hidden, weight, targets, *args, **kw)

    monkeypatch.setattr(scoring_mod, "token_log_probs", spy)
    encoded = cloze_encoder.encode_all(questions[:6])
    scored(base_model, encoded, 2, Scoring.CHOICE_LIKELIHOOD)
    distinct = sum(1 + sum(len(c) - 1 for c in q.continuations) for q in encoded)
    tokens = sum(len(c) for q in encoded for c in q.continuations)
    assert seen == [(2 * distinct, 2 * tokens)]
    assert distinct < tokens - 6  # every question has 3-5 choices


def test_sum_and_mean_normalization_differ(base_model, cloze_encoder, questions):
    encoded = cloze_encoder.encode_all(questions[:3])
    s = scored(base_model, encoded, 1, Scoring.CHOICE_LIKELIHOOD, normalization=Normalization.SUM)
    m = scored(base_model, encoded, 1, Scoring.CHOICE_LIKELIHOOD, normalization=Normalization.MEAN)
    assert (s.exp() - m.exp()).abs().max() > 1e-3


def test_letter_scoring_equals_full_forward(base_model, letter_encoder, questions, reference):
    encoded = letter_encoder.encode_all(questions[:6])
    assert len({len(q.prompt_ids) for q in encoded}) > 1  # right-padding is exercised
    letter_ids = letter_encoder.letter_ids
    lp = scored(base_model, encoded, 1, Scoring.LETTER, letter_ids)[0]
    refs = [reference(base_model, q, Scoring.LETTER, letter_ids) for q in encoded]
    assert_matches_reference(lp, refs, [q.num_choices for q in encoded])


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_num_choices_pads_beyond_the_batch(base_model, letter_encoder, cloze_encoder, questions, scoring):
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all([questions[0], questions[3]])  # 3 choices each
    lp = scored(base_model, encoded, 1, scoring, enc.letter_ids, c=5)[0]
    lp3 = scored(base_model, encoded, 1, scoring, enc.letter_ids)[0]
    assert lp.shape == (2, 5) and lp3.shape == (2, 3)
    torch.testing.assert_close(lp[:, :3], lp3, atol=ATOL, rtol=0)
    assert torch.all(lp[:, 3:] == float("-inf"))


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_members_match_their_peft_adapters(make_base, letter_encoder, cloze_encoder, questions, reference,
                                           randomize_B, tmp_path, scoring):
    """Members with different (random) B, scored in one packed batch, against PEFT + the unpacked reference."""
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all(questions[:5])
    cfg = ens_config(num_members=2)
    model = make_base()
    randomize_B(attach_members(model, cfg), std=0.2)
    lp = scored(model, encoded, 2, scoring, enc.letter_ids)  # [M, B, C]
    assert (lp[0] - lp[1]).nan_to_num(0.0).abs().max() > 1e-3  # the members really differ
    for k in range(2):
        peft_model = PeftModel.from_pretrained(make_base(), str(export_member(model, k, tmp_path / f"m{k}", cfg)))
        peft_model.to(DEVICE)
        with torch.no_grad():
            refs = [reference(peft_model, q, scoring, enc.letter_ids) for q in encoded]
        assert_matches_reference(lp[k], refs, [q.num_choices for q in encoded])


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_zero_B_members_give_identical_distributions(make_base, letter_encoder, cloze_encoder, questions, scoring):
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all(questions[:4])
    base_lp = scored(make_base(), encoded, 1, scoring, enc.letter_ids)[0]
    model = make_base()
    attach_members(model, ens_config(num_members=3, init_scale=4.0))
    batch = collate(encoded).repeat_members(3)
    assert batch.num_rows == 12
    assert torch.equal(batch.input_ids[8:12], batch.input_ids[:4])
    with torch.no_grad():
        lp = scorer(scoring, enc.letter_ids).log_probs(model, batch, 3)
    assert lp.shape == (3, 4, 5)
    for k in range(3):
        assert torch.equal(lp[k], lp[0])
    torch.testing.assert_close(lp[0], base_lp, atol=ATOL, rtol=0)


def test_rows_not_divisible_by_members_is_an_error(base_model, letter_encoder, questions):
    batch = collate(letter_encoder.encode_all(questions[:3]))
    with pytest.raises(ValueError, match="cannot be split among 2 members"):
        scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(base_model, batch, 2)


def test_collate_block_mask_by_hand():
    """Prompt (p0 p1), choice 0 (a0 a1), choice 1 (b0): each choice sees the prompt and itself only."""
    from loraens.prompts import EncodedQuestion

    q = EncodedQuestion(prompt_ids=(10, 11), continuations=((20, 21), (30,)), num_choices=2, answer=1)
    short = EncodedQuestion(prompt_ids=(12,), continuations=((22,), (32,)), num_choices=2, answer=0)
    batch = collate([q, short])
    assert batch.input_ids[0].tolist() == [10, 11, 20, 21, 30]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert batch.score_pos[0].tolist() == [[1, 2], [1, 0]]
    assert batch.score_tokens[0].tolist() == [[20, 21], [30, 0]]
    assert batch.score_mask[0].tolist() == [[True, True], [True, False]]
    # The shorter row: padding positions attend to themselves only (no all-False rows for SDPA).
    assert batch.input_ids[1].tolist() == [12, 22, 32, 0, 0]
    assert batch.attention_mask[1, 0].sum(-1).tolist() == [1, 2, 2, 1, 1]
    assert batch.targets.tolist() == [1, 0]


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_predict_is_in_input_order(make_base, letter_encoder, cloze_encoder, questions, randomize_B, tmp_path, scoring):
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all(questions[:7])
    ids = [q.id for q in questions[:7]]
    order = [i for b in length_sorted_batches(encoded, 3) for i in b]
    assert order != list(range(7))  # the length-sorted order really differs from the input order
    model = make_base()
    randomize_B(attach_members(model, ens_config(num_members=2)), std=0.2)
    model.train()
    preds = predict(model, encoded, ids, 2, scorer(scoring, enc.letter_ids), batch_size=3, progress=False)
    assert model.training  # restored
    assert preds.member_probs.shape == (7, 2, 5)
    assert preds.ids == ids
    assert preds.targets.tolist() == [q.answer for q in questions[:7]]
    assert preds.choice_mask.sum(1).tolist() == [q.num_choices for q in encoded]
    model.eval()
    for i, q in enumerate(encoded):  # each question scored alone, for both members
        alone = scored(model, [q], 2, scoring, enc.letter_ids)[:, 0].exp().cpu()  # [M, n]; predictions are on the CPU
        torch.testing.assert_close(preds.member_probs[i, :, : q.num_choices], alone, atol=ATOL, rtol=0)
        assert torch.all(preds.member_probs[i, :, q.num_choices:] == 0)
    torch.testing.assert_close(preds.member_probs.sum(-1), torch.ones(7, 2), atol=1e-5, rtol=0)
    assert (preds.member_probs[:, 0] - preds.member_probs[:, 1]).abs().max() > 1e-3

    path = tmp_path / "preds.safetensors"
    preds.save(path)
    loaded = Predictions.load(path)
    assert torch.equal(loaded.member_probs, preds.member_probs)
    assert torch.equal(loaded.targets, preds.targets)
    assert torch.equal(loaded.choice_mask, preds.choice_mask)
    assert loaded.ids == ids


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_long_prompt_is_cut_from_the_left_and_scored(base_model, tokenizer, reference, scoring):
    long_q = MCQAExample(id="long", question=" ".join(["the cat is in the tree"] * 20) + " what is it?",
                         choices=("a cat", "the dog", "sun"), answer=0)
    full = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, max_length=512)).encode(long_q)
    enc = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, max_length=24))
    cut = enc.encode(long_q)
    budget = 24 - sum(len(c) for c in cut.continuations)
    assert len(full.prompt_ids) > 24
    assert cut.prompt_ids == full.prompt_ids[-budget:]  # the END is kept: the answer position survives
    assert cut.continuations == full.continuations
    assert cut.num_tokens <= 24
    lp = scored(base_model, [cut], 1, scoring, enc.letter_ids)[0, 0]
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, reference(base_model, cut, scoring, enc.letter_ids), atol=ATOL, rtol=0)


def test_letter_token_ids_of_the_test_tokenizer(tokenizer):
    ids = letter_token_ids(tokenizer, 10)
    assert len(set(ids)) == 10
    assert tokenizer.convert_ids_to_tokens(list(ids[:3])) == ["ĠA", "ĠB", "ĠC"]


def test_letter_token_ids_rejects_split_letters():
    """A byte-level tokenizer without merges: " A" is two tokens ("Ġ", "A")."""
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert len(hf(" A", add_special_tokens=False)["input_ids"]) == 2
    with pytest.raises(PromptError, match="one token"):
        letter_token_ids(hf, 4)
    with pytest.raises(PromptError):
        PromptEncoder(hf, PromptConfig(scoring=Scoring.LETTER))
    PromptEncoder(hf, PromptConfig(scoring=Scoring.CHOICE_LIKELIHOOD))  # cloze does not need letter tokens
