"""`--train.compile`: compiled decoder layers give the eager model's scores and gradients."""

from __future__ import annotations

import pytest
import torch

from loraens.batching import collate
from loraens.compiling import compile_decoder_layers
from loraens.config import EnsembleConfig, Scoring
from loraens.ensemble import attach_members, member_layers
from loraens.scoring import member_log_probs


def scores_and_grads(model, batch, letter_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Member log-probs [M, N, C] and the gradient of their sum w.r.t. every member's A, flattened."""
    lp = member_log_probs(model, batch, 2, Scoring.LETTER, letter_ids)
    layers = list(member_layers(model).values())
    grads = torch.autograd.grad(lp[torch.isfinite(lp)].sum(), [layer.lora_A for layer in layers])
    return lp.detach(), torch.cat([g.flatten() for g in grads])


def test_compiled_layers_match_eager_scores_and_gradients(make_base, letter_encoder, questions, randomize_B):
    cfg = EnsembleConfig(num_members=2, rank=4, alpha=8.0, seed=0)
    enc = letter_encoder.encode_all(questions[:4])
    models = []
    for _ in range(2):
        model = make_base()
        randomize_B(attach_members(model, cfg), std=0.2)
        models.append(model.train())
    eager, compiled = models
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    # Two batches of different lengths: the dynamic graph serves both.
    for qs in (enc[:2], enc[1:4]):
        batch = collate(qs, num_choices=5).repeat_members(2)
        lp_e, g_e = scores_and_grads(eager, batch, letter_encoder.letter_ids)
        lp_c, g_c = scores_and_grads(compiled, batch, letter_encoder.letter_ids)
        finite = torch.isfinite(lp_e)
        assert torch.equal(finite, torch.isfinite(lp_c))
        torch.testing.assert_close(lp_c[finite], lp_e[finite], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-3)
    # The module is still the same model: its state dict (members included) is unchanged in keys.
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_compile_needs_decoder_layers():
    with pytest.raises(ValueError, match="--train.compile"):
        compile_decoder_layers(torch.nn.Linear(2, 2))
