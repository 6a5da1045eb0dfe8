"""bench/ceiling.py: the bare kernels behind the MFU bound do the whole forward and backward work."""

from collections import Counter

import pytest
import torch

from bench.ceiling import attention_bare, lora_bare, required_kernel_seconds
from loraens.config import EnsembleConfig, Scoring
from loraens.ensemble import attach_members

from .conftest import make_questions


@pytest.mark.parametrize("group", [1, 3])  # k/v repeated per head, or a group's query heads stacked
def test_attention_bare_is_softmax_attention_and_its_backward(group):
    gen = torch.Generator().manual_seed(0)
    q, g = (torch.randn(6, group * 5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(6, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.bmm(torch.bmm(leaves[0], leaves[1].transpose(1, 2)).softmax(-1), leaves[2])
    ref.backward(g)
    out, dq, dk, dv = attention_bare(q, k, v, g)
    torch.testing.assert_close(out, ref.detach())
    for got, leaf in zip((dq, dk, dv), leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad)


def test_lora_bare_is_the_member_update_and_its_backward():
    gen = torch.Generator().manual_seed(1)
    m, n, fan_in, fan_out, r = 3, 7, 6, 5, 2
    x = torch.randn(m, n, fan_in, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, fan_out, generator=gen, dtype=torch.float64)
    a = torch.randn(m, r, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(m, fan_out, r, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    # Member k's update, one member at a time: x_k A_k^T B_k^T.
    ref = torch.stack([leaves[0][k] @ leaves[1][k].T @ leaves[2][k].T for k in range(m)])
    ref.backward(g)
    delta, dx, da, db = lora_bare(x, g, a, b)
    torch.testing.assert_close(delta, ref.detach())
    for got, leaf in zip((dx, da, db), leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad)


def test_required_kernel_seconds_parts():
    kwargs = {"linear_groups": Counter({((16, 8), (16, 8)): 2, ((8, 16),): 1}), "lora_layers": Counter({(8, 16): 2}),
              "members": 2, "lengths": [6, 3, 5, 6], "heads": 4, "kv_heads": 2, "head_dim": 2, "layers": 3,
              "rank": 2, "reps": 1}
    letter = required_kernel_seconds(**kwargs)
    assert letter["head"] == 0.0  # no scored tokens: letter scoring's head is not part of the bound
    assert all(0 < letter[part] < 1 for part in ("linear", "attention", "lora"))
    assert letter["attention_impl"] in {"bare", "grouped", "sdpa"}
    choice = required_kernel_seconds(**kwargs, scored_tokens=5, hidden=8, vocab=32)
    assert 0 < choice["head"] < 1
    assert choice["total"] == pytest.approx(sum(choice[p] for p in ("linear", "attention", "lora", "head")))


def test_input_groups_stack_the_weights_that_share_an_input(base_model):
    """q/k/v and gate/up read one input each (LoRA-wrapped q/v included); o and down stand alone,
    and the groups hold every base weight, so their FLOPs are those the MFU estimate counts."""
    from bench.flops import input_groups, linear_params

    attach_members(base_model, EnsembleConfig(num_members=2, rank=2, target_modules=["q_proj", "v_proj"]))
    layers = base_model.model.layers
    groups = input_groups(layers[0])
    # tiny Llama: hidden 32, 4 heads / 2 kv heads of 8, intermediate 64
    assert groups == (((32, 32), (16, 32), (16, 32)), ((64, 32), (64, 32)), ((32, 64),), ((32, 32),))
    weights = sum(o * i for layer in layers for group in input_groups(layer) for o, i in group)
    assert weights == linear_params(base_model)


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_step_bound_times_the_step_that_the_mfu_estimate_counts(base_model, tokenizer, scoring):
    """bench.flops.step_bound on a real (tiny) step: every part timed, the head only for choice-likelihood,
    and its linear FLOPs are those `loraens_step_flops` counts: 4 N per real token, less the last
    layer's MLP (3 x 32 x 64 weights in the tiny Llama) at the positions the head does not read."""
    import numpy as np

    from bench.common import make_task
    from bench.flops import flop_model, head_positions, linear_params, loraens_step_flops, step_bound

    attach_members(base_model, EnsembleConfig(num_members=2, rank=2, target_modules=["q_proj", "v_proj"]))
    questions = make_questions(4)
    task = make_task(tokenizer, scoring, questions, questions)
    chunk = np.array([[0, 1], [2, 3]])  # member k's questions in row k
    bound = step_bound(base_model, task, chunk)
    qs = [task.train_q[i] for i in chunk.reshape(-1)]
    tokens = sum(q.num_tokens for q in qs)
    if scoring is Scoring.LETTER:
        kept = 4  # one answer position per question
    else:  # the prompt's last token, and each choice token but the last
        kept = sum(1 + sum(len(c) - 1 for c in q.continuations) for q in qs)
    assert kept == sum(head_positions(q, scoring) for q in qs) < tokens
    assert bound["linear_flops"] == 4 * linear_params(base_model) * tokens - 4 * 3 * 32 * 64 * (tokens - kept)
    assert (bound["head"] > 0) == (scoring is Scoring.CHOICE_LIKELIHOOD)
    assert all(0 < bound[part] < 1 for part in ("linear", "attention", "lora"))
    fm = flop_model(base_model)
    assert (fm.last_mlp, fm.last_mlp_lora) == (3 * 32 * 64, 0)  # LoRA on q and v only
    lora = fm.lora * tokens  # 6 r (in + out) per token: q 32 -> 32, v 32 -> 16, in 2 layers
    assert fm.lora == 2 * 6 * 2 * ((32 + 32) + (32 + 16))
    head = 4 * 32 * base_model.config.vocab_size * kept if scoring is Scoring.CHOICE_LIKELIHOOD else 0
    assert loraens_step_flops(task, chunk, fm) == bound["linear_flops"] + lora + head
