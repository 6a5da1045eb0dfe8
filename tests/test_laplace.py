"""Laplace-LoRA (`loraens.laplace`): against laplace-torch, against brute-force references, and its
properties.

References, each sharing no code with `loraens.laplace`:

- a PEFT member (`export_member` -> `PeftModel`) wrapped as a module that returns one question's
  C choice scores (as laplace-lora wraps its LLM), run as a plain HF forward, one question at a
  time (no member axis, no padding, no `Scorer`);
- K-FAC factors from that wrapper by hooks on PEFT's lora_A / lora_B modules, with the output
  Jacobian and Lambda = diag(p) - p p^T (no square-root columns);
- the exact GGN J^T Lambda J from autograd Jacobians (one backward per choice), and the dense
  posterior precision kron(G, F) + delta I (its inverse and log-determinant by torch.linalg);
- laplace-torch 0.3 itself (`KronLaplace`, its default curvlinops backend) when it is installed;
  those tests skip without it, the references above always run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from loraens.batching import collate
from loraens.config import EnsembleConfig, Scoring
from loraens.ensemble import attach_members, export_member, member_layers
from loraens.fast.prefix import prefix_cache_for
from loraens.laplace import (
    DEFAULT_GRID,
    MemberLaplace,
    fit_laplace,
    kron_eigh,
    log_marginal_likelihood,
    marglik_prior_precision,
    mc_probs,
    probit_probs,
)
from loraens.predict import predict
from loraens.prompts import EncodedQuestion
from tests.conftest import DEVICE, encoder, make_questions, randomize_lora_B, scorer

M = 2
RANK = 4
TARGETS = ["q_proj", "v_proj"]


def _ensemble(make_base, m: int = M, targets: list[str] = TARGETS, seed: int = 3, top_layers: int | None = None):
    model = make_base()
    config = EnsembleConfig(num_members=m, rank=RANK, alpha=8.0, target_modules=targets, seed=seed,
                            top_layers=top_layers)
    layers = attach_members(model, config)
    randomize_lora_B(layers, std=0.3, seed=seed)
    return model, config


def _encoded(tokenizer, scoring: Scoring, n: int = 8, seed: int = 0):
    enc = encoder(tokenizer, scoring)
    return enc.encode_all(make_questions(n, seed=seed)), scorer(scoring, enc.letter_ids)


# ---------------------------------------------------------------- the reference: a PEFT member as a module


class ChoiceScores(nn.Module):
    """One PEFT member as laplace-torch sees it: a question (a dict of one row) -> its C choice scores [1, C].

    Letter scoring: the letters' logits at the prompt's last token. Choice-likelihood: the question's
    row (prompt + every choice, the block mask) through the plain HF forward, each choice's mean
    token log-probability. The scores `Scorer.scores` returns, from another code path.
    """

    def __init__(self, peft_model: nn.Module, scoring: Scoring, letter_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.model = peft_model
        self.scoring = scoring
        self.letter_ids = letter_ids
        self.center = False  # True: the scores minus their mean (the GGN and the loss stay the same)

    def forward(self, data: dict) -> torch.Tensor:
        ids = data["input_ids"]
        if self.scoring is Scoring.LETTER:
            logits = self.model(input_ids=ids).logits[0, -1].float()
            f = logits[list(self.letter_ids[: data["num_choices"]])]
        else:
            logits = self.model(input_ids=ids, attention_mask=data["mask"], position_ids=data["position_ids"]).logits
            lp = F.log_softmax(logits[0].float(), dim=-1)  # [T, V]
            tok = lp[data["score_pos"][0], data["score_tokens"][0]]  # [C, L]
            sm = data["score_mask"][0].float()
            f = (tok * sm).sum(-1) / sm.sum(-1)
        return (f - f.mean() if self.center else f)[None]


def _question_data(q: EncodedQuestion, device: torch.device) -> dict:
    """One question as one unpadded row, with the additive block mask (choice-likelihood)."""
    b = collate([q])
    data = {"input_ids": b.input_ids, "position_ids": b.position_ids, "labels": b.targets,
            "num_choices": q.num_choices}
    if b.attention_mask is not None:
        data["mask"] = torch.zeros(b.attention_mask.shape).masked_fill(~b.attention_mask,
                                                                        torch.finfo(torch.float32).min)
        data["score_pos"], data["score_tokens"], data["score_mask"] = b.score_pos, b.score_tokens, b.score_mask
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}


def _peft_member(make_base, model, config, member: int, tmp_path, scoring, letter_ids) -> ChoiceScores:
    folder = export_member(model, member, tmp_path / f"member_{member}", config)
    peft = PeftModel.from_pretrained(make_base(), folder, is_trainable=True).eval()
    return ChoiceScores(peft, scoring, letter_ids)


def _lora_modules(wrapper: nn.Module) -> dict[str, nn.Linear]:
    """PEFT's trainable lora_A / lora_B linears, by loraens block name, in named_modules order."""
    out = {}
    for name, mod in wrapper.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.requires_grad:
            short = name.removeprefix("model.base_model.model.").replace(".default", "")
            out[short] = mod
    return out


def _reference_kfac(wrapper: ChoiceScores, data: list[dict], kfac: str):
    """K-FAC factors {block: (F, G)} and sum log p(y) of one PEFT member, one question at a time.

    F: the block's input moment (expand: 1/N sum_n 1/T_n sum_t x x^T; reduce: 1/N sum_n xbar xbar^T);
    G: sum_n sum_t J_t Lambda_n J_t^T (expand) or sum_n Jbar Lambda_n Jbar^T (reduce), where J_t
    [d_out, C] is the Jacobian of the scores in the block's output at position t.
    """
    mods = _lora_modules(wrapper)
    n = len(data)
    fs = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in mods.items()}
    gs = {k: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for k, m in mods.items()}
    log_lik = 0.0
    for d in data:
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def record(mod: nn.Module, args: tuple, out: torch.Tensor, k: str, inputs=inputs, outputs=outputs) -> None:
            inputs[k], outputs[k] = args[0], out

        hooks = [m.register_forward_hook(lambda mod, a, o, k=k: record(mod, a, o, k)) for k, m in mods.items()]
        with torch.enable_grad():
            f = wrapper(d)[0]  # [C]
        for h in hooks:
            h.remove()
        p = f.softmax(-1).detach().double().cpu()
        lam = torch.diag(p) - torch.outer(p, p)
        log_lik += float(F.log_softmax(f, -1)[int(d["labels"][0])])
        names = list(mods)
        jac = [torch.autograd.grad(f[c], [outputs[k] for k in names], retain_graph=True) for c in range(len(f))]
        for i, k in enumerate(names):
            x = inputs[k][0].detach().double().cpu()  # [T, d_in]
            j = torch.stack([jac[c][i][0].detach().double().cpu() for c in range(len(f))], -1)  # [T, d_out, C]
            if kfac == "expand":
                fs[k] += x.T @ x / (n * x.shape[0])
                gs[k] += torch.einsum("toc,cd,tpd->op", j, lam, j)
            else:
                xbar = x.mean(0)
                jbar = j.sum(0)
                fs[k] += torch.outer(xbar, xbar) / n
                gs[k] += jbar @ lam @ jbar.T
    return {k: (fs[k], gs[k]) for k in mods}, log_lik


def _reference_jacobian(wrapper: ChoiceScores, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [C] and the Jacobian [C, P] in the member's LoRA weights (lora_A, lora_B of each layer,
    row-major), by one backward pass per choice."""
    params = [m.weight for m in _lora_modules(wrapper).values()]
    with torch.enable_grad():
        f = wrapper(d)[0]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(f[c], params, retain_graph=True)])
                for c in range(len(f))]
    return f.detach().double().cpu(), torch.stack(rows).double().cpu()


def _dense_precision(factors: dict, delta: float) -> torch.Tensor:
    """blockdiag(kron(G_b, F_b)) + delta I, float64."""
    return torch.block_diag(*(torch.kron(g, f) for f, g in factors.values())) + delta * torch.eye(
        sum(f.shape[0] * g.shape[0] for f, g in factors.values()), dtype=torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|actual - expected| <= rtol * max|expected| (a tolerance relative to the tensor's scale)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} against scale {scale:.3g}"


# ---------------------------------------------------------------- brute-force references (always run)


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
@pytest.mark.parametrize("scoring", [Scoring.CHOICE_LIKELIHOOD, Scoring.LETTER])
def test_factors_match_a_per_question_peft_reference(make_base, tokenizer, tmp_path, kfac, scoring):
    model, config = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, scoring, n=7)
    post = fit_laplace(model, sc, qs, kfac=kfac, batch_size=3, progress=False)
    for k in range(M):
        wrapper = _peft_member(make_base, model, config, k, tmp_path, scoring, sc.letter_ids)
        ref, log_lik = _reference_kfac(wrapper, [_question_data(q, DEVICE) for q in qs], kfac)
        assert list(ref) == list(post.blocks)  # the same blocks, in PEFT's parameter order
        for name, (f_ref, g_ref) in ref.items():
            f, g = post.factors(name)
            _close(f[k], f_ref, 1e-4, f"{name} input factor, member {k}")
            _close(g[k], g_ref, 1e-4, f"{name} output-gradient factor, member {k}")
        assert post.log_likelihood[k].item() == pytest.approx(log_lik, rel=1e-5)


def test_kfac_is_the_exact_ggn_for_one_question_of_one_token(make_base, tokenizer, tmp_path):
    # With one question and one position, J = g x^T per block, so K-FAC's G (x) F IS the GGN block:
    # J^T Lambda J from autograd Jacobians, with no K-FAC code in the reference.
    targets = ["v_proj", "o_proj", "down_proj"]  # with one token q/k get no gradient (softmax over one key)
    model, config = _ensemble(make_base, targets=targets)
    sc = scorer(Scoring.LETTER, encoder(tokenizer, Scoring.LETTER).letter_ids)
    q = EncodedQuestion((tokenizer.bos_token_id,), (), 4, 2)
    for kfac in ("expand", "reduce"):
        post = fit_laplace(model, sc, [q], kfac=kfac, progress=False)
        for k in range(M):
            wrapper = _peft_member(make_base, model, config, k, tmp_path, Scoring.LETTER, sc.letter_ids)
            f, jac = _reference_jacobian(wrapper, _question_data(q, DEVICE))
            p = f.softmax(-1)
            ggn = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac  # [P, P], the exact GGN
            start = 0
            for name, block in post.blocks.items():
                f_in, g_out = (t[k].double() for t in block.factors())
                size = f_in.shape[0] * g_out.shape[0]
                _close(torch.kron(g_out, f_in), ggn[start: start + size, start: start + size], 1e-4,
                       f"{kfac} {name}, member {k}")
                start += size
            assert start == ggn.shape[0]


@pytest.mark.parametrize("scoring", [Scoring.CHOICE_LIKELIHOOD, Scoring.LETTER])
def test_moments_and_marglik_match_the_dense_posterior(make_base, tokenizer, tmp_path, scoring):
    model, config = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, scoring, n=6)
    post = fit_laplace(model, sc, qs, batch_size=4, progress=False)
    tests, _ = _encoded(tokenizer, scoring, n=5, seed=9)
    ids = [str(i) for i in range(len(tests))]
    for delta in (0.3, float(post.prior_precision[0])):
        f_mu, f_var = post.glm_moments(model, sc, tests, prior_precision=delta)  # [N, M, C], [N, M, C, C]
        lml = post.log_marginal_likelihood(delta)
        post.prior_precision = torch.full((M,), delta, dtype=torch.float64)
        probit = post.predict(model, sc, tests, ids, link="probit_centred", progress=False).member_probs
        raw = post.predict(model, sc, tests, ids, link="probit", progress=False).member_probs
        for k in range(M):
            wrapper = _peft_member(make_base, model, config, k, tmp_path, scoring, sc.letter_ids)
            factors = {name: tuple(t[k].double() for t in b.factors()) for name, b in post.blocks.items()}
            precision = _dense_precision(factors, delta)
            theta = torch.cat([post.mean[name][k].double().flatten().cpu() for name in post.blocks])
            logdet = torch.linalg.slogdet(precision)[1] - len(theta) * math.log(delta)
            expected = post.log_likelihood[k].double() - 0.5 * (logdet + delta * theta @ theta)
            assert lml[k].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
            for i, q in enumerate(tests):
                f, jac = _reference_jacobian(wrapper, _question_data(q, DEVICE))
                c = q.num_choices
                cov = jac @ torch.linalg.solve(precision, jac.T)
                _close(f_mu[i, k, :c], f, 1e-5, f"f_mu q{i} member {k}")
                _close(f_var[i, k, :c, :c], cov, 1e-3, f"f_var q{i} member {k} delta {delta}")
                assert torch.isinf(f_mu[i, k, c:]).all() and (f_var[i, k, c:] == 0).all()
                # The probit by hand: on f as given, and on f - mean(f) (Jacobian (I - 11^T/C) J).
                kappa = 1 / torch.sqrt(1 + math.pi / 8 * cov.diagonal())
                _close(raw[i, k, :c], torch.softmax(kappa * f, -1), 1e-4, f"raw probit q{i} member {k}")
                center = torch.eye(c, dtype=torch.float64) - 1.0 / c
                cov_c = center @ cov @ center.T
                kappa = 1 / torch.sqrt(1 + math.pi / 8 * cov_c.diagonal())
                _close(probit[i, k, :c], torch.softmax(kappa * (f - f.mean()), -1), 1e-4, f"probit q{i} member {k}")


# ---------------------------------------------------------------- laplace-torch (skipped without it)


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_matches_laplace_torch(make_base, tokenizer, tmp_path, kfac):
    laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed (pip install --no-deps "
                                                    "laplace-torch and its curvlinops backend)")
    from torch.utils.data import DataLoader

    scoring = Scoring.CHOICE_LIKELIHOOD
    model, config = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, scoring, n=7)
    tests, _ = _encoded(tokenizer, scoring, n=5, seed=9)
    post = fit_laplace(model, sc, qs, kfac=kfac, batch_size=3, progress=False)
    train = [_question_data(q, DEVICE) for q in qs]
    for k in range(M):
        wrapper = _peft_member(make_base, model, config, k, tmp_path, scoring, sc.letter_ids)
        la = laplace.Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure="kron",
                             asdl_fisher_kwargs={"kfac_approx": kfac})
        la.fit(DataLoader(train, batch_size=1, collate_fn=lambda b: b[0]))
        # The factors: laplace-torch keeps [G, F] per weight, in the model's module order.
        assert len(la.H_facs.kfacs) == len(post.blocks)
        for (g_ref, f_ref), name in zip(la.H_facs.kfacs, post.blocks):
            f, g = post.factors(name)
            _close(f[k], f_ref, 1e-4, f"{name} input factor vs laplace-torch, member {k}")
            _close(g[k], g_ref, 1e-4, f"{name} output-gradient factor vs laplace-torch, member {k}")
        assert -post.log_likelihood[k].item() == pytest.approx(float(la.loss), rel=1e-5)
        # The log marginal likelihood, over three decades of prior precision.
        for delta in (0.01, 1.0, 100.0):
            expected = float(la.log_marginal_likelihood(torch.tensor(delta)))
            assert post.log_marginal_likelihood(delta)[k].item() == pytest.approx(expected, rel=1e-5)
        # Our exact maximiser is at least as good as any other prior precision under laplace-torch's marglik.
        best = float(post.prior_precision[k])
        at_best = float(la.log_marginal_likelihood(torch.tensor(best)))
        for other in (best * 0.8, best * 1.25):
            assert at_best >= float(la.log_marginal_likelihood(torch.tensor(other)))
        # The GLM predictive: moments, probit (raw and centred) and MC.
        la.prior_precision = best
        ids = [str(i) for i in range(len(tests))]
        f_mu, f_var = post.glm_moments(model, sc, tests)
        raw = post.predict(model, sc, tests, ids, link="probit", progress=False)
        probit = post.predict(model, sc, tests, ids, link="probit_centred", progress=False)
        mc = post.predict(model, sc, tests, ids, n_samples=40000, progress=False)  # link="mc", the default
        for i, q in enumerate(tests):
            d, c = _question_data(q, DEVICE), q.num_choices
            wrapper.center = False
            mu_ref, var_ref = la._glm_predictive_distribution(d)
            _close(f_mu[i, k, :c], mu_ref[0], 1e-5, f"f_mu vs laplace-torch q{i}")
            _close(f_var[i, k, :c, :c], var_ref[0], 1e-3, f"f_var vs laplace-torch q{i}")
            p_ref = la(d, pred_type="glm", link_approx="probit")[0]
            _close(raw.member_probs[i, k, :c], p_ref, 1e-4, f"raw probit vs laplace-torch q{i}")
            torch.manual_seed(i)
            p_mc = la(d, pred_type="glm", link_approx="mc", n_samples=40000)[0]
            assert (mc.member_probs[i, k, :c] - p_mc.cpu()).abs().max() < 0.01  # two Monte-Carlo estimates
            wrapper.center = True  # the same posterior (same GGN and loss), centred outputs
            p_ref = la(d, pred_type="glm", link_approx="probit")[0]
            _close(probit.member_probs[i, k, :c], p_ref, 1e-4, f"centred probit vs laplace-torch q{i}")
            assert (probit.member_probs[i, k, :c] - raw.member_probs[i, k, :c]).abs().max() > 1e-3


# ---------------------------------------------------------------- properties


def test_zero_posterior_variance_gives_the_map_prediction(make_base, tokenizer):
    # The link functions themselves: f_var = 0 is softmax(f_mu), exactly.
    gen = torch.Generator().manual_seed(0)
    f_mu = torch.randn(3, 2, 4, generator=gen)
    f_mu[0, 1, 3] = float("-inf")  # a masked choice
    zero = torch.zeros(3, 2, 4, 4)
    assert torch.equal(probit_probs(f_mu, zero), torch.softmax(f_mu, -1))
    assert torch.allclose(probit_probs(f_mu, zero, center=True), torch.softmax(f_mu, -1), atol=1e-7, rtol=0)
    assert torch.allclose(mc_probs(f_mu, zero, 7, gen), torch.softmax(f_mu, -1), atol=1e-7, rtol=0)
    # End to end: an overwhelming prior leaves no posterior variance, and the predictive is `predict`'s.
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=6)
    ids = [f"q{i}" for i in range(len(qs))]
    post = fit_laplace(model, sc, qs, prior_precision=1e12, progress=False)
    plain = predict(model, qs, ids, M, sc, progress=False)
    for link in ("mc", "probit", "probit_centred"):
        lap = post.predict(model, sc, qs, ids, link=link, progress=False)
        assert lap.member_probs.shape == plain.member_probs.shape
        assert torch.equal(lap.choice_mask, plain.choice_mask) and torch.equal(lap.targets, plain.targets)
        assert (lap.member_probs - plain.member_probs).abs().max() < 1e-5, link
    # ... while a weak prior does move it (the check above can fail).
    post.prior_precision = torch.full((M,), 1.0, dtype=torch.float64)
    lap = post.predict(model, sc, qs, ids, progress=False)
    assert (lap.member_probs - plain.member_probs).abs().max() > 1e-2


def test_raising_the_prior_precision_moves_the_predictive_towards_the_map(make_base, tokenizer):
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=6)
    tests, _ = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=6, seed=5)
    post = fit_laplace(model, sc, qs, progress=False)
    deltas = torch.logspace(-2, 4, 13, dtype=torch.float64)
    f_mu, f_var = post.glm_moments(model, sc, tests, prior_precision=deltas[:, None].expand(-1, M))
    map_probs = torch.softmax(f_mu, -1)
    trace = f_var.diagonal(dim1=-2, dim2=-1).sum((-1, -2, -3))  # [G]
    assert (trace[1:] < trace[:-1]).all()
    links = {"mc": lambda v: mc_probs(f_mu, v, 4000, torch.Generator().manual_seed(0)),
             "probit_centred": lambda v: probit_probs(f_mu, v, center=True),
             "probit": lambda v: probit_probs(f_mu, v)}
    kl = {}
    for link, probs_at in links.items():
        kl[link] = []
        for var in f_var:
            probs = probs_at(var)
            terms = map_probs * (map_probs.clamp(min=1e-30).log() - probs.clamp(min=1e-30).log())
            kl[link].append(float(terms.nan_to_num(0.0).sum(-1).mean()))  # mean KL(MAP || Laplace)
    for link in ("mc", "probit_centred"):
        assert all(a > b for a, b in zip(kl[link], kl[link][1:])), (link, kl[link])
        assert kl[link][0] > 1e-2 and kl[link][-1] < 1e-5, (link, kl[link])
    # laplace-torch's probit is not: on the raw choice-likelihood scores (all < 0) it first moves
    # away from the MAP as the prior precision grows (`loraens.laplace.center_scores` says why).
    assert max(kl["probit"]) > 1.5 * kl["probit"][0] and kl["probit"][-1] < 1e-4


def test_the_mc_link_matches_an_independent_sampler(make_base, tokenizer):
    gen = torch.Generator().manual_seed(1)
    f_mu = torch.randn(4, 3, generator=gen) * 2
    f_mu[1, 2] = float("-inf")  # a masked choice: zero row and column
    root = torch.randn(4, 3, 3, generator=gen)
    f_var = root @ root.transpose(1, 2)
    f_var[1, 2, :] = f_var[1, :, 2] = 0
    ours = mc_probs(f_mu, f_var, 100000, torch.Generator().manual_seed(2))
    for i in range(4):
        c = 2 if i == 1 else 3
        dist = torch.distributions.MultivariateNormal(f_mu[i, :c].double(), f_var[i, :c, :c].double())
        torch.manual_seed(3)
        expected = torch.softmax(dist.sample((100000,)), -1).mean(0)
        assert (ours[i, :c] - expected).abs().max() < 0.01
    assert ours[1, 2] == 0
    # `predict(link="mc")` is that sampler on the moments, seeded.
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=5)
    post = fit_laplace(model, sc, qs, progress=False)
    f_mu, f_var = post.glm_moments(model, sc, qs)
    preds = post.predict(model, sc, qs, [str(i) for i in range(5)], link="mc", n_samples=300, seed=7, progress=False)
    assert torch.equal(preds.member_probs, mc_probs(f_mu, f_var, 300, torch.Generator().manual_seed(7)))


def test_vectorised_factors_equal_those_of_one_member_at_a_time(make_base, tokenizer):
    model, _ = _ensemble(make_base, m=3)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=7)
    together = fit_laplace(model, sc, qs, batch_size=3, progress=False)
    for chunk in (1, 2):
        apart = fit_laplace(model, sc, qs, batch_size=3, member_chunk=chunk, progress=False)
        for name in together.blocks:
            for a, b, which in zip(together.factors(name), apart.factors(name), ("input", "output-gradient")):
                _close(b, a, 1e-5, f"{name} {which} factor, member_chunk={chunk}")
        assert torch.allclose(apart.log_likelihood, together.log_likelihood, rtol=1e-6)
        assert torch.allclose(apart.prior_precision, together.prior_precision, rtol=1e-4)
    # Each member alone, in a model that holds only that member, gives that member's slice.
    for k in range(3):
        single, _ = _ensemble(make_base, m=1)
        with torch.no_grad():
            for layer, one in zip(member_layers(model).values(), member_layers(single).values()):
                one.lora_A.copy_(layer.lora_A[k: k + 1])
                one.lora_B.copy_(layer.lora_B[k: k + 1])
        alone = fit_laplace(single, sc, qs, batch_size=3, progress=False)
        for name in together.blocks:
            for a, b in zip(together.factors(name), alone.factors(name)):
                _close(b[0], a[k], 1e-5, f"{name}, member {k} alone")
    # The predictive too: one member at a time equals all at once.
    ids = [str(i) for i in range(len(qs))]
    whole = together.predict(model, sc, qs, ids, progress=False)
    parts = together.predict(model, sc, qs, ids, member_chunk=1, progress=False)
    assert torch.allclose(whole.member_probs, parts.member_probs, atol=1e-6)


def test_the_marglik_prior_precision_is_the_maximum(make_base, tokenizer):
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=8)
    post = fit_laplace(model, sc, qs, progress=False)
    best = post.prior_precision
    at_best = post.log_marginal_likelihood()
    grid = torch.logspace(-3, 3, 601, dtype=torch.float64)[:, None].expand(-1, M)
    assert (post.log_marginal_likelihood(grid) <= at_best + 1e-9).all()
    for factor in (0.99, 1.01):
        assert (post.log_marginal_likelihood(best * factor) < at_best).all()
    # MacKay's fixed point: delta ||theta||^2 = the effective number of parameters.
    lam = torch.cat([e.flatten(1).double() for e in post.eigenvalues()], 1)
    gamma = (lam / (lam + best[:, None])).sum(1)
    assert torch.allclose(best * post.sq_norm(), gamma, rtol=1e-6)
    # The pure function agrees with a brute-force grid on made-up spectra.
    eig = [torch.tensor([[5.0, 1.0, 0.1, 0.0], [50.0, 0.0, 0.0, 0.0]])]
    sq = torch.tensor([2.0, 0.5])
    found = marglik_prior_precision(eig, sq)
    fine = torch.logspace(-4, 4, 80001, dtype=torch.float64)[:, None].expand(-1, 2)
    ll = torch.zeros(2, dtype=torch.float64)
    brute = fine[log_marginal_likelihood(ll, eig, sq, fine).argmax(0), 0]
    assert torch.allclose(found, brute, rtol=1e-3)


def test_val_nll_picks_each_members_best_grid_value(make_base, tokenizer):
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=8)
    val, _ = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=6, seed=4)
    ids = [str(i) for i in range(len(val))]
    post = fit_laplace(model, sc, qs, progress=False)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    picked = post.optimize_prior_precision("val_nll", model, sc, val, grid=grid)
    nll = []
    for delta in grid:  # the brute force: a full predict at every grid value
        post.prior_precision = torch.full((M,), delta, dtype=torch.float64)
        probs = post.predict(model, sc, val, ids, progress=False)
        p = probs.member_probs.gather(-1, probs.targets[:, None, None].expand(-1, M, 1)).squeeze(-1)
        nll.append(-p.log().mean(0))
    expected = torch.tensor(grid, dtype=torch.float64)[torch.stack(nll).argmin(0)]
    assert torch.equal(picked, expected)
    assert torch.equal(post.optimize_prior_precision("val_nll", model, sc, val, grid=grid), expected)
    assert len(DEFAULT_GRID) == 41 and DEFAULT_GRID[0] == pytest.approx(1e-4) and DEFAULT_GRID[-1] == pytest.approx(1e4)


def test_fit_over_the_frozen_prefix_cache_equals_the_full_forward(make_base, tokenizer):
    # LoRA in the top layer only: the member forward reads the bottom layer from the prefix cache.
    model, _ = _ensemble(make_base, top_layers=1)
    enc = encoder(tokenizer, Scoring.CHOICE_LIKELIHOOD)
    qs = enc.encode_all(make_questions(6))
    plain = scorer(Scoring.CHOICE_LIKELIHOOD)
    cached = scorer(Scoring.CHOICE_LIKELIHOOD, cache=prefix_cache_for(model, 1))
    assert cached.prefix_cache is not None
    a = fit_laplace(model, plain, qs, progress=False)
    b = fit_laplace(model, cached, qs, progress=False)
    assert len(cached.prefix_cache) > 0  # the cache was used
    assert list(a.blocks) and all(".layers.1." in name for name in a.blocks)
    for name in a.blocks:
        for x, y in zip(a.factors(name), b.factors(name)):
            _close(y, x, 1e-4, name)


def test_save_and_load_round_trip(make_base, tokenizer, tmp_path):
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.LETTER, n=5)
    post = fit_laplace(model, sc, qs, kfac="reduce", progress=False)
    post.save(tmp_path / "laplace.safetensors")
    back = MemberLaplace.load(tmp_path / "laplace.safetensors")
    assert list(back.blocks) == list(post.blocks) and back.kfac == "reduce" and back.n_data == 5
    assert torch.equal(back.prior_precision, post.prior_precision)
    assert torch.equal(back.log_marginal_likelihood(), post.log_marginal_likelihood())
    ids = [str(i) for i in range(len(qs))]
    assert torch.equal(back.predict(model, sc, qs, ids, progress=False).member_probs,
                       post.predict(model, sc, qs, ids, progress=False).member_probs)


def test_kron_eigh_rebuilds_its_factors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen)
    f = x.transpose(1, 2) @ x  # [2, 3, 3], PSD
    y = torch.randn(2, 6, 4, generator=gen)
    g = y.transpose(1, 2) @ y
    eig = kron_eigh(f, g)
    f2, g2 = eig.factors()
    _close(f2, f, 1e-5, "F")
    _close(g2, g, 1e-5, "G")
    lam = eig.eigenvalues()  # [2, 4, 3]
    dense = torch.linalg.eigvalsh(torch.kron(g[0].double(), f[0].double()))
    _close(lam[0].flatten().sort().values, dense, 1e-5, "eigenvalues of G (x) F")


# ---------------------------------------------------------------- errors that name the bad value


def test_errors_name_the_bad_value(make_base, tokenizer):
    model, _ = _ensemble(make_base)
    qs, sc = _encoded(tokenizer, Scoring.CHOICE_LIKELIHOOD, n=4)
    ids = [str(i) for i in range(len(qs))]
    with pytest.raises(ValueError, match="'bogus'"):
        fit_laplace(model, sc, qs, kfac="bogus", progress=False)
    with pytest.raises(ValueError, match="'val_nll'"):
        fit_laplace(model, sc, qs, prior_precision="val_nll", progress=False)
    with pytest.raises(ValueError, match="-1"):
        fit_laplace(model, sc, qs, prior_precision=-1.0, progress=False)
    with pytest.raises(ValueError, match="member_chunk .* 0"):
        fit_laplace(model, sc, qs, member_chunk=0, progress=False)
    with pytest.raises(ValueError, match="batch_size .* 0"):
        fit_laplace(model, sc, qs, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no questions"):
        fit_laplace(model, sc, [], progress=False)
    with pytest.raises(ValueError, match="no LoRA member layers"):
        fit_laplace(make_base(), sc, qs, progress=False)
    post = fit_laplace(model, sc, qs, progress=False)
    with pytest.raises(ValueError, match="'logit'"):
        post.predict(model, sc, qs, ids, link="logit", progress=False)
    with pytest.raises(ValueError, match="n_samples .* 0"):
        post.predict(model, sc, qs, ids, link="mc", n_samples=0, progress=False)
    with pytest.raises(ValueError, match="3 ids for 4 questions"):
        post.predict(model, sc, qs, ids[:3], progress=False)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        post.log_marginal_likelihood(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        post.log_marginal_likelihood(torch.ones(3))
    with pytest.raises(ValueError, match="'cv'"):
        post.optimize_prior_precision("cv")
    with pytest.raises(ValueError, match="needs the model"):
        post.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
        probit_probs(torch.zeros(2, 4), torch.zeros(2, 4, 3))
    # The model must hold the weights the posterior was fit at, and the same layers.
    name = next(iter(member_layers(model)))
    with torch.no_grad():
        member_layers(model)[name].lora_B[1, 0, 0] += 1.0
    with pytest.raises(ValueError, match=f"{name}.lora_B is not the weights"):
        post.predict(model, sc, qs, ids, progress=False)
    other, _ = _ensemble(make_base, m=3)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 32\).*\(2, 4, 32\)"):
        post.predict(other, sc, qs, ids, progress=False)
    with pytest.raises(ValueError, match="missing"):
        post.predict(_ensemble(make_base, targets=["k_proj"])[0], sc, qs, ids, progress=False)


def test_predictions_are_distributions_and_the_member_mean_is_the_ensemble(make_base, tokenizer):
    model, _ = _ensemble(make_base, m=3)
    qs, sc = _encoded(tokenizer, Scoring.LETTER, n=6)
    ids = [str(i) for i in range(len(qs))]
    post = fit_laplace(model, sc, qs, progress=False)
    for link in ("mc", "probit", "probit_centred"):
        preds = post.predict(model, sc, qs, ids, link=link, progress=False)
        probs = preds.member_probs  # [N, M, C]
        assert probs.shape == (6, 3, 5) and probs.dtype == torch.float32 and probs.device.type == "cpu"
        assert torch.allclose(probs.sum(-1), torch.ones(6, 3), atol=1e-5)
        assert (probs[~preds.choice_mask[:, None, :].expand_as(probs)] == 0).all()
        assert preds.ids == ids
