"""Laplace-LoRA: a post-hoc Gaussian posterior over each member's LoRA weights, and its predictive.

Yang, Robeyns, Wang, Aitchison, "Bayesian low-rank adaptation for large language models" (ICLR
2024). After training, member k gets the posterior N(theta_k, P_k^-1) over its own LoRA weights
theta_k, with P_k = GGN_k + delta_k I (an isotropic prior N(0, 1/delta_k I)). All M members are
handled at once on the member axis (`MemberLoraLinear`), each with its own curvature and prior
precision; the mixture of the members' Laplace predictives is "ensemble + Laplace" (the usual
mean over `Predictions.member_probs`).

Likelihood. The categorical over the C choices that training minimises, with f = the C choice
scores before the softmax (`Scorer.scores`: the letters' logits, or each choice's mean or summed
token log-probability). The GGN is sum_n J_n^T Lambda_n J_n with J_n = df_n/dtheta and
Lambda_n = diag(p_n) - p_n p_n^T, the cross-entropy's Hessian in f.

Curvature: K-FAC per LoRA matrix. A member's LoRA update is two linear maps, u = A x and
v = B u, added as scaling * v (as in PEFT, where lora_A and lora_B are nn.Linear); each matrix
W [d_out, d_in] (A: [r, in], B: [out, r]) is one block, GGN_W ~ G (x) F with W flattened row by
row (`torch.kron(G, F) @ W.flatten()`), the layout laplace-torch's `Kron` uses:

- F [d_in, d_in]: the second moment of the matrix's input (x for A, u = A x for B);
- G [d_out, d_out]: the second moment of the output gradients g_c = d(s_c . f)/d(output) for
  the columns s_c = sqrt(p_c) (e_c - p) of Lambda's square root (the exact "type-2" GGN, one
  backward pass per choice, no sampling).

Token positions share the weights. A question is one row of T_n real tokens (padding excluded;
choice-likelihood: the prompt and every choice, `batching.collate`), and f depends on every
position. `kfac="expand"` (the default) takes the positions as extra examples:
F = 1/N sum_n 1/T_n sum_t x_nt x_nt^T and G = sum_n sum_t sum_c g_ntc g_ntc^T. This is what
laplace-torch 0.3 computes (its default backend, curvlinops' `KFACLinearOperator` with
`kfac_approx="expand"`, `FisherType.TYPE2`, a sum-reduced cross-entropy, its input factor
rescaled to 1/N), and laplace-lora used K-FAC-expand as well, so the factors are checked
against laplace-torch one for one (`tests/test_laplace.py`). `kfac="reduce"` (Eschenhagen et
al., NeurIPS 2023; meant for one loss per sequence, which is our case) first averages the inputs
and sums the gradients over the positions: F = 1/N sum_n xbar_n xbar_n^T, G = sum_n sum_c
gbar_nc gbar_nc^T; also checked against laplace-torch (curvlinops' `kfac_approx="reduce"`).

Prior precision, one per member: `"marglik"` (the default) maximises the Laplace log marginal
likelihood in delta_k. It is concave in log delta_k, so a bisection on its derivative finds the
maximum exactly (laplace-torch runs Adam on log delta instead; same objective). `"val_nll"`
picks, per member, the delta on a log grid with the lowest NLL of that member's predictive on
held-out questions (laplace-torch's "gridsearch"; laplace-lora's validation variant).

Predictive: linearised (GLM) in f, f ~ N(f(theta_k), J Sigma_k J^T) per question and member
(`glm_moments`), then one of three links:

- `"mc"` (the default): the mean of softmax(f) over draws of f with the full C x C covariance
  (laplace-torch's `link_approx="mc"`; laplace-lora's evaluation script defaults to it,
  `mc_corr_100000`). It estimates the linearised predictive itself, and like the softmax it
  ignores a common shift of the C scores.
- `"probit"`: softmax(f / sqrt(1 + pi/8 diag(J Sigma J^T))), laplace-torch's
  `link_approx="probit"` exactly (tested against it). Cheaper, but an approximation of the above
  that is not invariant to a common shift of the scores (the softmax is): it pulls each score
  towards 0. Choice-likelihood scores are mean log-probabilities, all below 0, so a
  high-variance choice is pulled up whatever its score, and on the tiny test model this
  predictive first moves AWAY from the MAP as the prior precision grows.
- `"probit_centred"`: the same formula on the scores centred over each question's choices
  (`center_scores`): shift-invariant and monotone in the prior precision, but not closer to
  `"mc"` in general. On SmolLM2-135M (members with random B, 24 synthetic questions, the
  marglik prior precision and 1/10 and 1/100 of it) the mean L1 distance to `"mc"` was
  0.04-0.22 for `"probit"` and 0.11-0.25 for `"probit_centred"`, each better in some settings.

The forward pass is the member forward of `Scorer`, run on the padded rows without
`--speed.pack_tokens` and `--speed.last_layer_trim` (`_laplace_scorer`): every LoRA layer then
sees each question's real tokens as a plain HF forward does (the positions K-FAC-expand averages
over), with the same scores. The pure math (eigendecompositions, the marginal likelihood and its
maximiser, the functional covariance, the link approximations) is in small functions on tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .batching import Batch, length_sorted_batches
from .ensemble import MemberLoraLinear, active_members, member_layers
from .member_prompts import MemberQuestions, member_batch
from .predictions import Predictions
from .prompts import EncodedQuestion
from .scoring import Scorer

KFAC_APPROXIMATIONS = ("expand", "reduce")
LINKS = ("mc", "probit", "probit_centred")
PRIOR_METHODS = ("marglik", "val_nll")
# The val_nll grid of prior precisions: 10^-4 .. 10^4, as laplace-torch's gridsearch.
DEFAULT_GRID = tuple(float(v) for v in torch.logspace(-4, 4, 41, dtype=torch.float64))


# ---------------------------------------------------------------- the math, on tensors


@dataclass
class KronEigen:
    """One LoRA matrix's K-FAC factors for M members, eigendecomposed.

    in_vals [M, d_in], in_vecs [M, d_in, d_in]: F = in_vecs diag(in_vals) in_vecs^T (input moment);
    out_vals [M, d_out], out_vecs [M, d_out, d_out]: G likewise (output-gradient moment).
    The GGN block G (x) F has eigenvalues out_vals[:, i] * in_vals[:, j] (`eigenvalues`).
    """

    in_vals: torch.Tensor
    in_vecs: torch.Tensor
    out_vals: torch.Tensor
    out_vecs: torch.Tensor

    def eigenvalues(self) -> torch.Tensor:
        """[M, d_out, d_in]: the GGN block's eigenvalues, in the layout of W [d_out, d_in]."""
        return self.out_vals[:, :, None] * self.in_vals[:, None, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [M, d_in, d_in], G [M, d_out, d_out]) rebuilt from the eigendecomposition."""
        def rebuild(vals: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
            return (vecs * vals[:, None, :]) @ vecs.transpose(1, 2)
        return rebuild(self.in_vals, self.in_vecs), rebuild(self.out_vals, self.out_vecs)

    def rotate(self, jac: torch.Tensor) -> torch.Tensor:
        """jac [M, ..., d_out, d_in] -> Q_G^T jac Q_F: coordinates in the GGN block's eigenbasis."""
        m, lead, (o, i) = jac.shape[0], jac.shape[1:-2], jac.shape[-2:]
        k = jac[0].numel() // (o * i)
        # Two plain bmm's over the member axis (broadcasting Q over K would copy it K times).
        right = torch.bmm(jac.reshape(m, k * o, i), self.in_vecs)  # [M, K*d_out, d_in]
        right = right.reshape(m, k, o, i).transpose(1, 2).reshape(m, o, k * i)
        left = torch.bmm(self.out_vecs.transpose(1, 2), right)  # [M, d_out, K*d_in]
        return left.reshape(m, o, k, i).transpose(1, 2).reshape(m, *lead, o, i)


def kron_eigh(f_in: torch.Tensor, g_out: torch.Tensor) -> KronEigen:
    """Eigendecompose one matrix's factors: f_in [M, d_in, d_in], g_out [M, d_out, d_out] (symmetric,
    positive semi-definite). Done in float64 and returned in the factors' dtype; eigenvalues
    below 0 (rounding) become 0."""
    def eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mat.ndim != 3 or mat.shape[1] != mat.shape[2]:
            raise ValueError(f"A Kronecker factor must be [M, d, d], but got shape {tuple(mat.shape)}.")
        if not torch.isfinite(mat).all():
            raise ValueError("A Kronecker factor has NaN or infinite entries; check the model's scores.")
        vals, vecs = torch.linalg.eigh(mat.double())
        return vals.clamp(min=0).to(mat.dtype), vecs.to(mat.dtype)

    in_vals, in_vecs = eigh(f_in)
    out_vals, out_vecs = eigh(g_out)
    return KronEigen(in_vals, in_vecs, out_vals, out_vecs)


def _as_delta(delta: torch.Tensor | float, m: int) -> torch.Tensor:
    """A prior precision as a float64 tensor [..., M]; a scalar or [M] are broadcast."""
    delta = torch.as_tensor(delta, dtype=torch.float64)
    if delta.ndim == 0:
        delta = delta.expand(m)
    if delta.shape[-1] != m:
        raise ValueError(f"A prior precision must be a scalar or have the member axis last ({m} members), "
                         f"but got shape {tuple(delta.shape)}.")
    if not (torch.isfinite(delta) & (delta > 0)).all():
        raise ValueError(f"A prior precision must be positive and finite, but got {delta.tolist()}.")
    return delta


def log_det_ratio(eigenvalues: Sequence[torch.Tensor], delta: torch.Tensor | float) -> torch.Tensor:
    """log det P_k - log det P0_k = sum_i log(1 + lambda_ki / delta_k), per member.

    eigenvalues: the GGN's eigenvalues, one [M, ...] tensor per block (`KronEigen.eigenvalues`);
    delta: prior precision, scalar, [M] or [..., M] -> [..., M] (float64).
    """
    m = eigenvalues[0].shape[0]
    d = _as_delta(delta, m).to(eigenvalues[0].device)
    total = torch.zeros(d.shape, dtype=torch.float64, device=d.device)
    for lam in eigenvalues:
        lam = lam.reshape(m, -1).double()  # [M, P_b]
        total = total + torch.log1p(lam / d[..., None]).sum(-1)
    return total


def log_marginal_likelihood(log_likelihood: torch.Tensor, eigenvalues: Sequence[torch.Tensor],
                            sq_norm: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """The Laplace log marginal likelihood per member, [..., M] (float64):

    log p(D | delta) ~ log p(D | theta) - 1/2 (log det P - log det P0 + delta ||theta||^2),

    with P = GGN + delta I, P0 = delta I and the prior mean 0 (laplace-torch's
    `log_marginal_likelihood`). log_likelihood [M]: sum_n log p(y_n | x_n, theta_k) on the fit
    questions; eigenvalues: per block [M, ...]; sq_norm [M]: ||theta_k||^2; delta: scalar, [M]
    or [..., M]. Computed where the eigenvalues are; returned on the CPU.
    """
    m = log_likelihood.shape[0]
    dev = eigenvalues[0].device
    d = _as_delta(delta, m).to(dev)
    ratio = log_det_ratio(eigenvalues, d)
    return (log_likelihood.double().to(dev) - 0.5 * (ratio + d * sq_norm.double().to(dev))).cpu()


def marglik_prior_precision(eigenvalues: Sequence[torch.Tensor], sq_norm: torch.Tensor,
                            bounds: tuple[float, float] = (1e-12, 1e12), steps: int = 64) -> torch.Tensor:
    """The prior precision [M] that maximises `log_marginal_likelihood`, per member.

    In x = log delta the objective is concave (its second derivative is
    -1/2 (delta ||theta||^2 + sum_i lambda_i delta / (lambda_i + delta)^2) < 0), and its
    derivative vanishes where delta ||theta||^2 = sum_i lambda_i / (lambda_i + delta) (MacKay's
    effective number of parameters), so a bisection in x finds the maximum. Clamped to `bounds`;
    64 halvings of log(1e12 / 1e-12) = 55 leave an interval of 3e-18 in log delta.
    """
    lo_b, hi_b = bounds
    if not 0 < lo_b < hi_b:
        raise ValueError(f"bounds must be 0 < low < high, but got {bounds}.")
    m = sq_norm.shape[0]
    lam = torch.cat([e.reshape(m, -1).double() for e in eigenvalues], 1)  # [M, P]
    sq = sq_norm.double().to(lam.device)
    lo = torch.full((m,), math.log(lo_b), dtype=torch.float64, device=lam.device)
    hi = torch.full((m,), math.log(hi_b), dtype=torch.float64, device=lam.device)
    for _ in range(steps):
        mid = (lo + hi) / 2
        d = mid.exp()
        slope = (lam / (lam + d[:, None])).sum(1) - d * sq  # d(2 log p(D)) / d(log delta), decreasing
        up = slope > 0
        lo = torch.where(up, mid, lo)
        hi = torch.where(up, hi, mid)
    return ((lo + hi) / 2).exp()


def functional_covariance(rotated: torch.Tensor, eigenvalues: torch.Tensor,
                          delta: torch.Tensor | float) -> torch.Tensor:
    """One block's share of J Sigma J^T: [M, B, C, P_b] Jacobians in the block's eigenbasis
    (`KronEigen.rotate`, flattened), eigenvalues [M, P_b] and delta (scalar, [M] or [G, M]) ->
    [G, M, B, C, C] (G = 1 for a scalar or [M] delta), float32. Sum it over the blocks."""
    m = rotated.shape[0]
    d = _as_delta(delta, m)
    d = (d if d.ndim == 2 else d.reshape(1, m)).to(rotated.device, torch.float32)
    inv = 1.0 / (eigenvalues.reshape(m, -1)[None].float() + d[..., None])  # [G, M, P_b]
    return torch.einsum("mbcp,gmp,mbdp->gmbcd", rotated, inv, rotated)


def center_scores(f_mu: torch.Tensor, f_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f - mean over the real choices, and its covariance: (f_mu [..., C], f_var [..., C, C]) -> the same shapes.

    The softmax over the choices ignores a common shift of the scores, and so does the exact
    E[softmax(f)], but the probit approximation does not: choice-likelihood scores are mean
    log-probabilities, all around -5, and softmax(kappa_c f_c) pulls a choice with a larger
    variance towards 0, i.e. up, whatever its score. Centred, a choice is pulled towards the
    question's mean score instead. With P = I - v w^T (v: the real choices, w = v / C_real):
    f -> P f, f_var -> P f_var P^T. Masked choices stay at -inf with zero (co)variance.
    """
    real = torch.isfinite(f_mu)
    v = real.to(f_var.dtype)
    w = v / v.sum(-1, keepdim=True).clamp(min=1)
    proj = torch.eye(f_mu.shape[-1], dtype=f_var.dtype, device=f_var.device) - v[..., :, None] * w[..., None, :]
    mu = torch.where(real, f_mu, 0.0).to(f_var.dtype)
    mu = (proj @ mu.unsqueeze(-1)).squeeze(-1).to(f_mu.dtype).masked_fill(~real, float("-inf"))
    return mu, proj @ f_var @ proj.transpose(-1, -2)


def probit_probs(f_mu: torch.Tensor, f_var: torch.Tensor, center: bool = False) -> torch.Tensor:
    """The probit approximation of E[softmax(f)], f ~ N(f_mu, f_var): softmax(f_mu / sqrt(1 + pi/8 var_c)).

    f_mu [..., C] (masked choices at -inf), f_var [..., C, C] -> probabilities [..., C]. With
    f_var = 0 this is softmax(f_mu) exactly. center=False is laplace-torch's
    `link_approx="probit"`; center=True applies it to the scores centred over the real choices
    (`center_scores`, which says why).
    """
    if f_var.shape != (*f_mu.shape, f_mu.shape[-1]):
        raise ValueError(f"f_var must be [..., C, C] for f_mu [..., C], but got {tuple(f_var.shape)} "
                         f"for {tuple(f_mu.shape)}.")
    if center:
        f_mu, f_var = center_scores(f_mu, f_var)
    var = f_var.diagonal(dim1=-2, dim2=-1).clamp(min=0)
    kappa = torch.rsqrt(1 + math.pi / 8 * var)
    return torch.softmax(kappa * f_mu, dim=-1)


def mc_probs(f_mu: torch.Tensor, f_var: torch.Tensor, n_samples: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte-Carlo E[softmax(f)] over `n_samples` draws f ~ N(f_mu, f_var) with the full covariance.

    f_mu [..., C] (masked choices at -inf and zero rows/columns in f_var), f_var [..., C, C] ->
    [..., C]. The square root of f_var is taken by eigendecomposition (eigenvalues below 0 set to
    0), which also handles singular covariances. The draws come from `generator` on the CPU (the
    same numbers on every device). With f_var = 0 this is softmax(f_mu) exactly.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, but got {n_samples}.")
    if f_var.shape != (*f_mu.shape, f_mu.shape[-1]):
        raise ValueError(f"f_var must be [..., C, C] for f_mu [..., C], but got {tuple(f_var.shape)} "
                         f"for {tuple(f_mu.shape)}.")
    vals, vecs = torch.linalg.eigh(f_var.double())
    root = (vecs * vals.clamp(min=0).sqrt()[..., None, :]).to(f_mu.dtype)  # [..., C, C], root root^T = f_var
    shape, c = f_mu.shape, f_mu.shape[-1]
    finite = torch.isfinite(f_mu).reshape(-1, c)
    mu, root = torch.where(finite, f_mu.reshape(-1, c), 0.0), root.reshape(-1, c, c)
    out = torch.empty_like(mu)
    step = max(1, 2**24 // (n_samples * c))  # rows (question x member) per chunk: about 64 MB of draws
    for i in range(0, len(mu), step):
        rows = slice(i, i + step)
        eps = torch.randn(n_samples, len(mu[rows]), c, generator=generator, dtype=f_mu.dtype).to(f_mu.device)
        draws = mu[rows] + torch.einsum("rcd,srd->src", root[rows], eps)  # [S, rows, C]
        draws = draws.masked_fill(~finite[rows], float("-inf"))
        out[rows] = torch.softmax(draws, dim=-1).mean(0)
    return out.reshape(shape)


# ---------------------------------------------------------------- the posterior


@dataclass
class MemberLaplace:
    """The K-FAC Laplace posterior of each of M members' LoRA weights (`fit_laplace` builds it).

    blocks: "<module>.lora_A" / "<module>.lora_B" -> `KronEigen` ([M, ...] each), in
    `member_layers` order (lora_A before lora_B, like PEFT's parameters). mean: the same names ->
    the weights the posterior is centred on ([M, r, in] / [M, out, r], the MAP). log_likelihood
    [M]: sum_n log p(y_n) on the fit questions at the mean; n_data: N, the fit questions.
    prior_precision [M]: delta_k (float64). kfac: "expand" or "reduce". timings: seconds of the
    fit's stages.
    """

    blocks: dict[str, KronEigen]
    mean: dict[str, torch.Tensor]
    log_likelihood: torch.Tensor
    n_data: int
    prior_precision: torch.Tensor
    kfac: str = "expand"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_members(self) -> int:
        return int(self.log_likelihood.shape[0])

    @property
    def n_params(self) -> int:
        """Parameters of one member's posterior (the LoRA weights of one member)."""
        return sum(int(w[0].numel()) for w in self.mean.values())

    def eigenvalues(self) -> list[torch.Tensor]:
        return [b.eigenvalues() for b in self.blocks.values()]

    def sq_norm(self) -> torch.Tensor:
        """||theta_k||^2 per member, [M] (float64, on the CPU)."""
        return sum((w.double().flatten(1).pow(2).sum(1).cpu() for w in self.mean.values()),
                   torch.zeros(self.num_members, dtype=torch.float64))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [M, d_in, d_in], G [M, d_out, d_out]) of block `name`, rebuilt from the eigendecomposition."""
        if name not in self.blocks:
            raise KeyError(f"No block {name!r}; the blocks are {list(self.blocks)[:4]}...")
        return self.blocks[name].factors()

    def log_marginal_likelihood(self, prior_precision: torch.Tensor | float | None = None) -> torch.Tensor:
        """[..., M] float64, at `prior_precision` (scalar, [M] or [..., M]; default: the current one)."""
        delta = self.prior_precision if prior_precision is None else prior_precision
        return log_marginal_likelihood(self.log_likelihood, self.eigenvalues(), self.sq_norm(), delta)

    def optimize_prior_precision(self, method: str = "marglik", model: nn.Module | None = None,
                                 scorer: Scorer | None = None,
                                 questions: Sequence[EncodedQuestion] | None = None,
                                 grid: Sequence[float] = DEFAULT_GRID, link: str = "mc",
                                 n_samples: int = 10000, batch_size: int = 8, seed: int = 0,
                                 progress: bool = False) -> torch.Tensor:
        """Set and return the prior precision [M], one per member.

        "marglik" (the default): the maximiser of the log marginal likelihood (exact, by bisection;
        `marglik_prior_precision`); needs nothing else. "val_nll": for each member the value in
        `grid` whose predictive (`link`) has the lowest NLL on the held-out `questions`
        (needs model, scorer and questions; the Jacobians are computed once for the whole grid).
        """
        if method not in PRIOR_METHODS:
            raise ValueError(f"method must be one of {PRIOR_METHODS}, but got {method!r}.")
        t0 = time.perf_counter()
        if method == "marglik":
            self.prior_precision = marglik_prior_precision(self.eigenvalues(), self.sq_norm()).cpu()
        else:
            if model is None or scorer is None or not questions:
                raise ValueError("method='val_nll' needs the model, its scorer and held-out questions.")
            values = torch.tensor(list(grid), dtype=torch.float64)
            if values.ndim != 1 or len(values) == 0:
                raise ValueError(f"grid must be a non-empty list of prior precisions, but got {list(grid)}.")
            deltas = values[:, None].expand(-1, self.num_members)  # [G, M]
            probs, targets = self._grid_probs(model, scorer, questions, deltas, link, n_samples, batch_size,
                                              seed, progress)  # [G, N, M, C], [N]
            picked = probs.gather(-1, targets[None, :, None, None].expand(*probs.shape[:3], 1)).squeeze(-1)
            nll = -picked.clamp(min=1e-12).log().mean(1)  # [G, M]
            self.prior_precision = values[nll.argmin(0)]
        self.timings[f"prior_{method}"] = time.perf_counter() - t0
        return self.prior_precision

    def glm_moments(self, model: nn.Module, scorer: Scorer, questions: Sequence[EncodedQuestion],
                    prior_precision: torch.Tensor | float | None = None, batch_size: int = 8,
                    member_chunk: int | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The linearised predictive over the choice scores, per question and member, on the CPU:
        f_mu [N, M, C] (the scores at the mean, masked choices at -inf) and
        f_var [N, M, C, C] = J Sigma J^T (zero rows and columns for masked choices).
        `prior_precision`: scalar or [M] (default: the current one); [G, M] gives f_var [G, N, M, C, C].
        """
        delta = _as_delta(self.prior_precision if prior_precision is None else prior_precision, self.num_members)
        grid = delta.ndim == 2
        mu, var = self._moments(model, scorer, questions, delta if grid else delta[None], batch_size, member_chunk,
                                progress)
        return mu, (var if grid else var[0])

    def predict(self, model: nn.Module, scorer: Scorer, questions: Sequence[EncodedQuestion], ids: Sequence[str],
                link: str = "mc", n_samples: int = 10000, seed: int = 0, batch_size: int = 8,
                member_chunk: int | None = None, progress: bool = True) -> Predictions:
        """Each member's Laplace predictive over the choices: `Predictions` with member_probs [N, M, C].

        link: "mc" (default; `n_samples` draws of f per question and member from a generator
        seeded with `seed`), "probit" (laplace-torch's) or "probit_centred" (module docstring).
        The model must hold the weights the posterior was fit at. The mean over members of
        member_probs is "ensemble + Laplace".
        """
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, but got {link!r}.")
        if len(ids) != len(questions):
            raise ValueError(f"predict() needs one id per question, but got {len(ids)} ids for "
                             f"{len(questions)} questions.")
        f_mu, f_var = self.glm_moments(model, scorer, questions, batch_size=batch_size, member_chunk=member_chunk,
                                       progress=progress)
        probs = _link_probs(f_mu, f_var, link, n_samples, seed)
        return Predictions.from_questions(probs.float(), questions, ids)

    # ------------------------------------------------------------ saving

    def save(self, path: str | Path) -> None:
        """One safetensors file (eigendecompositions, mean, log-likelihood, prior precision); no pickle."""
        tensors: dict[str, torch.Tensor] = {"log_likelihood": self.log_likelihood.cpu(),
                                            "prior_precision": self.prior_precision.cpu()}
        for name, b in self.blocks.items():
            for key in ("in_vals", "in_vecs", "out_vals", "out_vecs"):
                tensors[f"{name}/{key}"] = getattr(b, key).cpu().contiguous()
            tensors[f"{name}/mean"] = self.mean[name].cpu().contiguous()
        meta = {"names": json.dumps(list(self.blocks)), "n_data": str(self.n_data), "kfac": self.kfac,
                "timings": json.dumps(self.timings)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> MemberLaplace:
        """A saved posterior; its eigendecompositions and mean on `device` (where the model is)."""
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "names" not in meta:
                raise ValueError(f"{path} is not a saved MemberLaplace (its metadata has no block names).")
            names = json.loads(meta["names"])
            blocks = {n: KronEigen(*(f.get_tensor(f"{n}/{k}") for k in ("in_vals", "in_vecs", "out_vals",
                                                                          "out_vecs"))) for n in names}
            mean = {n: f.get_tensor(f"{n}/mean") for n in names}
            return cls(blocks, mean, f.get_tensor("log_likelihood").cpu(), int(meta["n_data"]),
                       f.get_tensor("prior_precision").cpu(), meta.get("kfac", "expand"),
                       json.loads(meta.get("timings", "{}")))

    # ------------------------------------------------------------ internals

    def check_model(self, model: nn.Module) -> dict[str, MemberLoraLinear]:
        """The model's member layers, after checking that they hold the weights the posterior is centred on."""
        layers = member_layers(model)
        names = {f"{n}.lora_{w}" for n in layers for w in "AB"}
        if names != set(self.mean):
            missing = sorted(set(self.mean) - names)[:3]
            extra = sorted(names - set(self.mean))[:3]
            raise ValueError(f"The model's LoRA layers differ from the posterior's: missing {missing}, "
                             f"unexpected {extra}.")
        for n, layer in layers.items():
            for w, param in (("A", layer.lora_A), ("B", layer.lora_B)):
                ref = self.mean[f"{n}.lora_{w}"]
                if param.shape != ref.shape:
                    raise ValueError(f"{n}.lora_{w} has shape {tuple(param.shape)}, but the posterior was fit "
                                     f"with {tuple(ref.shape)} ({self.num_members} members).")
                if not torch.equal(param.detach(), ref.to(param.device)):
                    raise ValueError(f"{n}.lora_{w} is not the weights the posterior was fit at; refit the "
                                     "Laplace posterior after changing the members.")
        return layers

    def _moments(self, model: nn.Module, scorer: Scorer, questions: Sequence[EncodedQuestion],
                 deltas: torch.Tensor, batch_size: int, member_chunk: int | None,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """f_mu [N, M, C] and f_var [G, N, M, C, C] (CPU, float32) for prior precisions deltas [G, M]."""
        if not questions:
            raise ValueError("The Laplace predictive got no questions.")
        _check_batch_size(batch_size)
        layers = self.check_model(model)
        m = self.num_members
        _check_member_questions(questions, m)
        chunk = _check_chunk(member_chunk, m)
        scorer = _laplace_scorer(scorer)
        c = max(q.num_choices for q in questions)
        n = len(questions)
        f_mu = torch.zeros(n, m, c)
        f_var = torch.zeros(deltas.shape[0], n, m, c, c)
        device = next(model.parameters()).device
        lam = {name: b.eigenvalues().to(device) for name, b in self.blocks.items()}
        batches = length_sorted_batches(list(questions), batch_size)
        with _eval_mode(model), _lora_grads(model):
            for start in range(0, m, chunk):
                stop = min(start + chunk, m)
                members = slice(start, stop)
                # This chunk's eigenvectors on the model's device once, not once per batch.
                eig = {name: _slice_eigen(b, members, device) for name, b in self.blocks.items()}
                with active_members(model, start, stop):
                    for idx in tqdm(batches, desc="laplace predictive", unit="batch", disable=not progress,
                                    leave=False):
                        batch = member_batch(questions, idx, range(start, stop), c)  # each member's own prompt
                        mu, jac = _jacobians(model, scorer, batch, layers, members)
                        var = torch.zeros(deltas.shape[0], stop - start, len(idx), c, c, device=device)
                        for name, j in jac.items():
                            rotated = eig[name].rotate(j)  # [m, B, C, o, i]
                            rotated = rotated.flatten(3)
                            var += functional_covariance(rotated, lam[name][members], deltas[:, members])
                        f_mu[idx, start:stop] = mu.transpose(0, 1).float().cpu()
                        f_var[:, idx, start:stop] = var.transpose(1, 2).float().cpu()
        return f_mu, f_var

    def _grid_probs(self, model: nn.Module, scorer: Scorer, questions: Sequence[EncodedQuestion],
                    deltas: torch.Tensor, link: str, n_samples: int, batch_size: int, seed: int,
                    progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, but got {link!r}.")
        f_mu, f_var = self._moments(model, scorer, questions, deltas, batch_size, None, progress)
        probs = torch.stack([_link_probs(f_mu, v, link, n_samples, seed) for v in f_var])  # [G, N, M, C]
        targets = torch.tensor([q.answer for q in questions], dtype=torch.long)
        return probs, targets


def _link_probs(f_mu: torch.Tensor, f_var: torch.Tensor, link: str, n_samples: int, seed: int) -> torch.Tensor:
    if link in ("probit", "probit_centred"):
        return probit_probs(f_mu, f_var, center=link == "probit_centred")
    generator = torch.Generator().manual_seed(seed)
    return mc_probs(f_mu, f_var, n_samples, generator)


def _check_member_questions(questions: Sequence[EncodedQuestion], m: int) -> None:
    """Questions encoded per member (`MemberQuestions`) must be for exactly the model's m members."""
    if isinstance(questions, MemberQuestions) and questions.num_members != m:
        raise ValueError(f"The questions were encoded for {questions.num_members} members' prompts, but the model "
                         f"holds {m} members; encode them with this ensemble's encoder.")


def _slice_eigen(b: KronEigen, members: slice, device: torch.device) -> KronEigen:
    return KronEigen(*(getattr(b, k)[members].to(device) for k in ("in_vals", "in_vecs", "out_vals", "out_vecs")))


# ---------------------------------------------------------------- fitting


def fit_laplace(model: nn.Module, scorer: Scorer, questions: Sequence[EncodedQuestion], *,
                kfac: str = "expand", prior_precision: str | float = "marglik", batch_size: int = 8,
                member_chunk: int | None = None, progress: bool = True) -> MemberLaplace:
    """Fit the K-FAC Laplace posterior of every member of `model` on `questions` (the training set).

    model: a model with `MemberLoraLinear` layers (M members; its current weights are the MAP);
    scorer: its `Scorer` (the choice scores f); questions: N encoded questions with answers.
    kfac: "expand" (default, as laplace-torch) or "reduce" (module docstring).
    prior_precision: "marglik" (default) sets it by the marginal likelihood; a positive number
    sets it for every member ("val_nll" needs held-out questions: call
    `MemberLaplace.optimize_prior_precision("val_nll", ...)` afterwards).
    batch_size: questions per forward (each repeated for the members of a chunk);
    member_chunk: members per forward (default: all M in one vectorised pass; 1: one at a time,
    for memory). One forward and C backward passes per batch (C = the batch's choices).
    """
    if kfac not in KFAC_APPROXIMATIONS:
        raise ValueError(f"kfac must be one of {KFAC_APPROXIMATIONS}, but got {kfac!r}.")
    if isinstance(prior_precision, str) and prior_precision != "marglik":
        raise ValueError(f"prior_precision must be 'marglik' or a positive number, but got {prior_precision!r} "
                         "(for 'val_nll' call MemberLaplace.optimize_prior_precision after the fit).")
    if not isinstance(prior_precision, str) and not (math.isfinite(prior_precision) and prior_precision > 0):
        raise ValueError(f"prior_precision must be 'marglik' or a positive number, but got {prior_precision!r}.")
    if not questions:
        raise ValueError("fit_laplace() got no questions; the Laplace posterior is fit on the training set.")
    _check_batch_size(batch_size)
    layers = member_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA member layers; call attach_members (or load a run) first.")
    m = next(iter(layers.values())).num_members
    _check_member_questions(questions, m)
    chunk = _check_chunk(member_chunk, m)
    scorer = _laplace_scorer(scorer)
    device = next(model.parameters()).device
    n = len(questions)
    c = max(q.num_choices for q in questions)
    t0 = time.perf_counter()
    acc: dict[str, list[torch.Tensor]] = {}  # block -> [F, G] accumulators, [M, d, d] each
    for name, layer in layers.items():
        r, d_in, d_out = layer.rank, layer.base.in_features, layer.base.out_features
        acc[f"{name}.lora_A"] = [torch.zeros(m, d_in, d_in, device=device), torch.zeros(m, r, r, device=device)]
        acc[f"{name}.lora_B"] = [torch.zeros(m, r, r, device=device), torch.zeros(m, d_out, d_out, device=device)]
    log_lik = torch.zeros(m, dtype=torch.float64, device=device)
    batches = length_sorted_batches(list(questions), batch_size)
    with _eval_mode(model), _lora_grads(model):
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            with active_members(model, start, stop):
                for idx in tqdm(batches, desc="laplace fit", unit="batch", disable=not progress, leave=False):
                    batch = member_batch(questions, idx, range(start, stop), c)  # each member's own prompt
                    log_lik[start:stop] += _accumulate_kfac(model, scorer, batch, layers, slice(start, stop), acc,
                                                            n, kfac)
    t1 = time.perf_counter()
    blocks = {}
    for name in list(acc):  # one block at a time, so the factors and their eigenvectors are not all held twice
        f_in, g_out = acc.pop(name)
        blocks[name] = kron_eigh(f_in, g_out)
        del f_in, g_out
    mean = {}
    for name, layer in layers.items():
        mean[f"{name}.lora_A"] = layer.lora_A.detach().float().clone()
        mean[f"{name}.lora_B"] = layer.lora_B.detach().float().clone()
    t2 = time.perf_counter()
    start_delta = torch.ones(m, dtype=torch.float64) * (1.0 if isinstance(prior_precision, str) else prior_precision)
    post = MemberLaplace(blocks, mean, log_lik.cpu(), n, start_delta, kfac,
                         {"factors": t1 - t0, "eigendecomposition": t2 - t1})
    if prior_precision == "marglik":
        post.optimize_prior_precision("marglik")
    return post


def _laplace_scorer(scorer: Scorer) -> Scorer:
    """`scorer` on the padded rows, every position through every layer (no packing, no last-layer
    trim): each LoRA layer sees every real token of a question, as in a plain HF forward."""
    speed = dataclasses.replace(scorer.speed, pack_tokens=False, last_layer_trim=False)
    return dataclasses.replace(scorer, speed=speed)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, but got {batch_size}.")


def _check_chunk(member_chunk: int | None, m: int) -> int:
    if member_chunk is None:
        return m
    if member_chunk < 1:
        raise ValueError(f"member_chunk must be at least 1 (or None for all {m} members), but got {member_chunk}.")
    return min(member_chunk, m)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and eager layers for the block; restores the mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.train(was_training)


@contextmanager
def _lora_grads(model: nn.Module) -> Iterator[None]:
    """The LoRA weights require grad inside the block (so the forward builds the graph the
    backward passes need; no .grad is written), and grad mode is on."""
    params = [p for layer in member_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)


class _Tap:
    """Forward hooks on the member layers: each layer's input x and output of the last forward."""

    def __init__(self, layers: dict[str, MemberLoraLinear]) -> None:
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[_Tap]:
        handles = []
        for name, layer in self.layers.items():
            def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
                if name in self.inputs:
                    raise RuntimeError(f"{name} ran twice in one forward; the Laplace fit needs one call per layer.")
                self.inputs[name], self.outputs[name] = args[0], output
            handles.append(layer.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _active(layer: MemberLoraLinear, members: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [m, r, in], B [m, out, r]) of the active members, detached."""
    return layer.lora_A[members].detach(), layer.lora_B[members].detach()


def _forward(model: nn.Module, scorer: Scorer, batch: Batch, layers: dict[str, MemberLoraLinear],
             m: int) -> tuple[torch.Tensor, _Tap, torch.Tensor, torch.Tensor]:
    """Scores [m, B, C] of the m*B member-major rows of `batch` (`member_prompts.member_batch`: member j
    may read its own prompt), the tap, the choice mask [m, B, C] and the token weights [m, B, T]
    (1 at real tokens) on the model's device."""
    tap = _Tap(layers)
    with tap.recording():
        scores = scorer.scores(model, batch, m)
    device = scores.device
    t = batch.input_ids.shape[1]
    lengths = batch.lengths if batch.lengths is not None else torch.full((batch.num_rows,), t)
    weights = (torch.arange(t)[None] < lengths[:, None]).float().to(device).view(m, -1, t)
    return scores, tap, batch.choice_mask.to(device).view(m, -1, batch.choice_mask.shape[-1]), weights


def _sqrt_hessian_column(probs: torch.Tensor, c: int) -> torch.Tensor:
    """Column c of the square root of the cross-entropy's Hessian diag(p) - p p^T: sqrt(p_c) (e_c - p).
    probs [..., C] -> [..., C]; zero where p_c = 0 (a masked choice)."""
    e_c = torch.zeros_like(probs)
    e_c[..., c] = 1
    return probs[..., c: c + 1].sqrt() * (e_c - probs)


def _accumulate_kfac(model: nn.Module, scorer: Scorer, batch: Batch, layers: dict[str, MemberLoraLinear],
                     members: slice, acc: dict[str, list[torch.Tensor]], n_data: int, kfac: str) -> torch.Tensor:
    """Add one batch's K-FAC factors of the active `members` into `acc`; return their log-likelihood [m]."""
    m = members.stop - members.start
    scores, tap, mask, weights = _forward(model, scorer, batch, layers, m)
    _, b, t = weights.shape
    logp = F.log_softmax(scores.float(), dim=-1)  # [m, B, C]
    targets = batch.targets.to(scores.device).view(m, b, 1)
    log_lik = logp.gather(-1, targets).squeeze(-1).double().sum(1)
    probs = logp.exp().detach()
    f = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    count = weights.sum(2).clamp(min=1)  # [m, B]: T_n, real tokens of each member's row
    for name, layer in layers.items():
        a, _ = _active(layer, members)
        x = tap.inputs[name].detach().float().reshape(m, b, t, -1)
        u = x.reshape(m, b * t, -1).bmm(a.transpose(1, 2)).reshape(m, b, t, -1)  # lora_A's output
        acc[f"{name}.lora_A"][0][members] += _input_moment(x, weights, count, n_data, kfac)
        acc[f"{name}.lora_B"][0][members] += _input_moment(u, weights, count, n_data, kfac)
    names = list(layers)
    outputs = [tap.outputs[nm] for nm in names]
    columns = [k for k in range(scores.shape[-1]) if bool(mask[..., k].any())]
    for i, k in enumerate(columns):
        column = _sqrt_hessian_column(probs, k)  # [m, B, C]
        grads = torch.autograd.grad((column * f).sum(), outputs, retain_graph=i < len(columns) - 1)
        for name, g in zip(names, grads):
            layer = layers[name]
            _, bw = _active(layer, members)
            gv = g.float().reshape(m, b, t, -1) * (layer.scaling * weights[..., None])  # d/d(B u)
            gu = gv.reshape(m, b * t, -1).bmm(bw).reshape(m, b, t, -1)  # d/d(A x) = B^T gv
            acc[f"{name}.lora_A"][1][members] += _output_moment(gu, kfac)
            acc[f"{name}.lora_B"][1][members] += _output_moment(gv, kfac)
    return log_lik.detach()


def _input_moment(x: torch.Tensor, weights: torch.Tensor, count: torch.Tensor, n_data: int,
                  kfac: str) -> torch.Tensor:
    """x [m, B, T, d], weights [m, B, T] (0 at padding), count [m, B] (T_n) -> [m, d, d]:
    expand: 1/N sum_n 1/T_n sum_t x x^T; reduce: 1/N sum_n xbar xbar^T, xbar = mean over real t."""
    m, b, t, d = x.shape
    if kfac == "expand":
        xs = x * (weights / (count[..., None] * n_data)).sqrt()[..., None]
        xs = xs.reshape(m, b * t, d)
    else:
        xs = (x * weights[..., None]).sum(2) / count[..., None] / math.sqrt(n_data)  # [m, B, d]
    return xs.transpose(1, 2).bmm(xs)


def _output_moment(g: torch.Tensor, kfac: str) -> torch.Tensor:
    """g [m, B, T, d] (0 at padding) -> [m, d, d]: expand: sum over questions and positions of g g^T;
    reduce: sum over questions of gbar gbar^T, gbar = sum over positions."""
    m, b, t, d = g.shape
    gs = g.reshape(m, b * t, d) if kfac == "expand" else g.sum(2)
    return gs.transpose(1, 2).bmm(gs)


def _jacobians(model: nn.Module, scorer: Scorer, batch: Batch, layers: dict[str, MemberLoraLinear],
               members: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scores [m, B, C] of the active members and, per block, the Jacobian of every choice
    score in the block's weights: "<module>.lora_A" [m, B, C, r, in], "<module>.lora_B" [m, B, C, out, r]
    (zero for masked choices). One forward and one backward pass per choice."""
    m = members.stop - members.start
    scores, tap, mask, weights = _forward(model, scorer, batch, layers, m)
    _, b, t = weights.shape
    c = scores.shape[-1]
    names = list(layers)
    outputs = [tap.outputs[nm] for nm in names]
    xs, us = {}, {}
    for name, layer in layers.items():
        a, _ = _active(layer, members)
        x = tap.inputs[name].detach().float().reshape(m, b, t, -1)
        xs[name] = x
        us[name] = x.reshape(m, b * t, -1).bmm(a.transpose(1, 2)).reshape(m, b, t, -1)
    jac = {}
    for name, layer in layers.items():
        jac[f"{name}.lora_A"] = torch.zeros(m, b, c, layer.rank, layer.base.in_features, device=scores.device)
        jac[f"{name}.lora_B"] = torch.zeros(m, b, c, layer.base.out_features, layer.rank, device=scores.device)
    columns = [k for k in range(c) if bool(mask[..., k].any())]
    f = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    for i, k in enumerate(columns):
        grads = torch.autograd.grad(f[..., k].sum(), outputs, retain_graph=i < len(columns) - 1)
        for name, g in zip(names, grads):
            layer = layers[name]
            _, bw = _active(layer, members)
            gv = g.float().reshape(m, b, t, -1) * (layer.scaling * weights[..., None])  # d f_k / d(B u)
            gu = gv.reshape(m, b * t, -1).bmm(bw).reshape(m, b, t, -1)  # d f_k / d(A x)
            jac[f"{name}.lora_A"][:, :, k] = torch.einsum("mbtr,mbti->mbri", gu, xs[name])
            jac[f"{name}.lora_B"][:, :, k] = torch.einsum("mbto,mbtr->mbor", gv, us[name])
    return scores.detach(), jac
