"""The full-vocabulary head's token log-probabilities: exact to float32 level at bf16 speed.

Every tensor is drawn on the CPU from a seeded generator (the same numbers on every device) and
moved to `DEVICE`, where the head runs; the float64 references run there too.
"""

import pytest
import torch

import loraens.fast.head as head_mod
from loraens.fast.head import exact_logits, token_log_probs
from tests.conftest import DEVICE


def on(*values, **kw) -> torch.Tensor:
    """`torch.tensor(values)` on `DEVICE`."""
    return torch.tensor(values, device=DEVICE, **kw)


def set_block_elements(monkeypatch, elements: int) -> None:
    """Vocabulary blocks of `elements` logits on every device (the CUDA size is separate)."""
    monkeypatch.setattr(head_mod, "BLOCK_ELEMENTS", elements)
    monkeypatch.setattr(head_mod, "CUDA_BLOCK_ELEMENTS", elements)


def weights_for(targets: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Weights 0.5 .. 1.5, one per target, on the targets' device: the loss weighs every output differently."""
    return torch.linspace(0.5, 1.5, len(targets), dtype=dtype, device=targets.device)


@pytest.fixture
def head_data():
    """Logits of magnitude ~10-20 (like a real LM's), where bf16 rounding is ~0.03-0.06 per logit."""
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 64, generator=gen) * 2.5).to(torch.bfloat16)
    weight = (torch.randn(3000, 64, generator=gen) * 0.6).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (37,), generator=gen)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def reference(hidden, weight, targets):
    """float64 log-softmax of the same bf16 inputs, and its gradient with respect to `hidden`."""
    h = hidden.double().requires_grad_(True)
    lp = torch.log_softmax(h @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    (lp * weights_for(targets, torch.float64)).sum().backward()
    return lp.detach(), h.grad


def test_bf16_logits_are_exact_to_float32_level(head_data):
    hidden, weight, _ = head_data
    ref = hidden.double() @ weight.double().T
    bf16_err = (torch.nn.functional.linear(hidden, weight).double() - ref).abs().max()
    exact_err = (exact_logits(hidden, weight).double() - ref).abs().max()
    assert exact_logits(hidden, weight).dtype == torch.float32
    assert bf16_err > 0.01  # plain bf16 logits are visibly rounded at this magnitude
    assert exact_err < bf16_err / 50
    assert exact_err < 5e-4


@pytest.mark.parametrize("block_elements", [None, 37 * 256])
def test_token_log_probs_and_gradient_match_float64(head_data, block_elements, monkeypatch):
    """One block, and 12 blocks of 256 columns (the last one short; targets on block edges)."""
    hidden, weight, targets = head_data
    targets = targets.clone()
    targets[:4] = on(255, 256, 2815, 2999)  # the last column of a block, the first of the next...
    if block_elements:
        set_block_elements(monkeypatch, block_elements)
    assert head_mod.vocab_block(len(targets), weight.shape[0], DEVICE) == (256 if block_elements else weight.shape[0])
    ref_lp, ref_grad = reference(hidden, weight, targets)
    h = hidden.clone().requires_grad_(True)
    lp = token_log_probs(h, weight, targets)
    (lp * weights_for(targets)).sum().backward()
    assert lp.dtype == torch.float32
    assert (lp.double() - ref_lp).abs().max() < 5e-4
    assert h.grad.dtype == torch.bfloat16
    # The gradient GEMM runs in bf16: relative error of a few bf16 ulps.
    assert (h.grad.double() - ref_grad).norm() / ref_grad.norm() < 5e-3


@pytest.mark.parametrize("block_elements", [None, 37 * 256])
def test_training_head_is_the_log_softmax_of_the_bf16_logits(head_data, block_elements, monkeypatch):
    """exact=False: the same computation on the bf16-rounded logits, and their gradient."""
    hidden, weight, targets = head_data
    if block_elements:
        set_block_elements(monkeypatch, block_elements)
    h_ref = hidden.clone().requires_grad_(True)
    # float64 log-softmax of the bf16 product, and its gradient through that product (bf16 GEMM)
    logits = torch.nn.functional.linear(h_ref, weight)
    ref = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    weights = weights_for(targets)
    (ref * weights.double()).sum().backward()
    h = hidden.clone().requires_grad_(True)
    lp = token_log_probs(h, weight, targets, exact=False)
    (lp * weights).sum().backward()
    assert (lp.double() - ref.detach()).abs().max() < 5e-5
    assert (h.grad.double() - h_ref.grad.double()).norm() / h_ref.grad.double().norm() < 5e-3
    # ... which differs from the exact log-probabilities by the bf16 rounding of the logits.
    exact_lp, _ = reference(hidden, weight, targets)
    assert 1e-3 < (lp.double() - exact_lp).abs().max() < 0.2
    # float32 inputs have no bf16 product to skip: the exact path either way.
    assert torch.equal(token_log_probs(hidden.float(), weight.float(), targets, exact=False),
                       token_log_probs(hidden.float(), weight.float(), targets))


@pytest.mark.parametrize("block_elements", [None, 8 * 256])
def test_near_certain_tokens_keep_their_small_log_probability(block_elements, monkeypatch):
    """Logits up to ~40 with the target at the argmax: log p is ~-1e-6, never above 0.

    The target's logit and the logsumexp come from the same float32 logits, and the max is
    subtracted before the exponentials, as a log-softmax does.
    """
    if block_elements:
        set_block_elements(monkeypatch, block_elements)
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(2000, 32, generator=gen) * 0.3).to(torch.bfloat16).to(DEVICE)
    hidden = (weight[:8].float() * 25).to(torch.bfloat16)  # row k points at vocabulary row k
    logits = hidden.double() @ weight.double().T
    targets = logits.argmax(-1)
    # log p = -log1p(sum over v != target of exp(l_v - l_target)): float64 without cancellation
    # (a float64 log-softmax is itself off by ~1e-16 absolute, too coarse for 1 - p ~ 1e-15).
    rest = (logits - logits.gather(1, targets[:, None])).exp().scatter(1, targets[:, None], 0.0).sum(-1)
    ref = -torch.log1p(rest)
    assert ref.max() > -1e-3  # near-certain
    lp = token_log_probs(hidden.requires_grad_(True), weight, targets)
    assert (lp <= 0).all()
    assert (lp.double() - ref).abs().max() < 1e-5
    # Row by row, even where 1 - p is far below float32's epsilon: log p ~ -(1 - p) to 1%.
    assert ((lp.double() - ref).abs() <= 1e-2 * ref.abs()).all()
    lp.sum().backward()  # the gradient is ~(1 - p): tiny, and kept to bf16-GEMM accuracy row by row
    # d log p / dh = sum over v != target of p_v (W_target - W_v), again without cancellation.
    p_rest = (logits - logits.gather(1, targets[:, None])).exp().scatter(1, targets[:, None], 0.0) / (1 + rest)[:, None]
    w = weight.double()
    ref_grad = p_rest.sum(1, keepdim=True) * w[targets] - p_rest @ w
    row_err = (hidden.grad.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)
    assert (-ref).min() < 1e-12  # some rows have 1 - p far below float32 resolution of 1
    assert row_err.max() < 2e-2


def test_float64_inputs_pass_gradcheck(monkeypatch):
    set_block_elements(monkeypatch, 5 * 256)  # 3 blocks of the 600 columns
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(600, 8, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE)
    targets = on(0, 300, 599, 255, 256)
    assert torch.autograd.gradcheck(lambda h: token_log_probs(h, weight, targets), (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_backward_with_retained_graph_gives_the_same_gradient(head_data, dtype, monkeypatch):
    set_block_elements(monkeypatch, 37 * 512)  # 6 blocks
    hidden, weight, targets = head_data
    h = hidden.to(dtype).requires_grad_(True)
    lp = token_log_probs(h, weight.to(dtype), targets).sum()
    lp.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    lp.backward()
    assert torch.equal(first, h.grad)


@pytest.mark.parametrize(("use_bias", "softcap", "trainable"),
                         [(True, None, False), (False, 30.0, False), (True, 30.0, False), (False, None, True)])
def test_bias_softcap_or_trainable_weight_take_the_plain_path(head_data, use_bias, softcap, trainable, monkeypatch):
    hidden, weight, targets = head_data
    monkeypatch.setattr(head_mod._TokenLogProb, "apply", None)  # the fast path would fail loudly
    bias = torch.linspace(-1, 1, weight.shape[0], device=DEVICE) if use_bias else None
    weight = weight.float().requires_grad_(trainable)
    logits = hidden.double() @ weight.detach().double().T + (0 if bias is None else bias.double())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    got = token_log_probs(hidden, weight, targets, bias=bias, softcap=softcap)
    assert (got.double() - want).abs().max() < 1e-4
    if trainable:
        got.sum().backward()
        assert weight.grad is not None  # a trainable head gets its gradient


# ---------------------------------------------------------------- positions shared by several targets


def shared_reference(hidden, weight, targets, rows, weights):
    """float64 log-softmax at `hidden[rows]`, and the gradient of sum(weights * lp) to `hidden`."""
    h = hidden.double().requires_grad_(True)
    lp = torch.log_softmax(h @ weight.double().T, -1)[rows, targets]
    (lp * weights.double()).sum().backward()
    return lp.detach(), h.grad


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("block_elements", [None, 8 * 256])
def test_shared_positions_equal_one_row_per_target(head_data, exact, block_elements, monkeypatch):
    """Positions read by 1, 3 or 5 targets (one target twice, one position's targets in two
    blocks): the same values and gradient as giving every target its own copy of the row."""
    if block_elements:
        set_block_elements(monkeypatch, block_elements)
    hidden, weight, _ = head_data
    hidden = hidden[:8]
    rows = on(0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 4, 5, 6, 7, 7)
    targets = on(5, 900, 2999, 17, 3, 256, 3, 1200, 2000, 40, 41, 42, 43, 255, 256)
    weights = weights_for(targets)
    h = hidden.clone().requires_grad_(True)
    lp = token_log_probs(h, weight, targets, rows=rows, exact=exact)
    (lp * weights).sum().backward()
    # The same computation with each target on its own copy of its row (the path before sharing).
    h_rep = hidden.clone().requires_grad_(True)
    lp_rep = token_log_probs(h_rep[rows], weight, targets, exact=exact)
    (lp_rep * weights).sum().backward()
    assert lp.shape == (15,) and lp[4] == lp[6]  # a repeated (position, target) pair reads one value
    assert (lp - lp_rep).abs().max() < 1e-6
    assert (h.grad.double() - h_rep.grad.double()).norm() / h_rep.grad.double().norm() < 5e-3
    if exact:
        ref_lp, ref_grad = shared_reference(hidden, weight, targets, rows, weights)
        assert (lp.double() - ref_lp).abs().max() < 5e-4
        assert (h.grad.double() - ref_grad).norm() / ref_grad.norm() < 5e-3


def test_shared_positions_pass_gradcheck(monkeypatch):
    set_block_elements(monkeypatch, 3 * 256)  # 3 blocks of the 600 columns
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(600, 8, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE)
    rows = on(0, 0, 0, 1, 2, 2)
    targets = on(0, 300, 599, 255, 256, 256)
    assert torch.autograd.gradcheck(lambda h: token_log_probs(h, weight, targets, rows=rows), (hidden,))


def test_near_certain_target_keeps_its_small_log_probability_beside_others_at_its_position():
    """At one position the argmax target has 1 - p ~ 1e-11 while two unlikely targets share the
    row: the likely one's log p stays ~-1e-11 (no cancellation against the others' terms)."""
    gen = torch.Generator().manual_seed(4)
    weight = (torch.randn(2000, 32, generator=gen) * 0.3).to(torch.bfloat16).to(DEVICE)
    hidden = (weight[:2].float() * 25).to(torch.bfloat16)
    logits = hidden.double() @ weight.double().T
    best = logits.argmax(-1)
    rows = on(0, 0, 0, 1)
    targets = torch.stack([best[0], on(1500)[0], on(7)[0], best[1]])
    shifted = logits[rows] - logits[rows, targets][:, None]
    rest = shifted.exp().scatter(1, targets[:, None], 0.0).sum(-1)
    ref = torch.where(rest < 1, -torch.log1p(rest), -(1 + rest).log())  # float64, no cancellation
    lp = token_log_probs(hidden, weight, targets, rows=rows)
    assert (-ref[0]) < 1e-6  # near-certain
    assert ((lp.double() - ref).abs() <= 1e-2 * ref.abs()).all()


def test_exact_logits_hold_at_a_7b_hidden_size():
    """H = 4096 (Llama-2-7B): long reductions, where a GEMM that reduced partial sums in bf16
    (cuBLAS may, on CUDA) would lose the residual; the float32-level accuracy must hold there too."""
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(64, 4096, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    weight = (torch.randn(512, 4096, generator=gen) * 0.05).to(torch.bfloat16).to(DEVICE)
    ref = hidden.double() @ weight.double().T
    bf16_err = (torch.nn.functional.linear(hidden, weight).double() - ref).abs().max()
    exact_err = (exact_logits(hidden, weight).double() - ref).abs().max()
    assert exact_err < bf16_err / 50 and exact_err < 1e-3, (float(exact_err), float(bf16_err))
