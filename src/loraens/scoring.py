"""From a padded batch to each member's log-distribution over the choices: the `Scorer`.

Both scoring modes run the decoder once on all member rows and apply the output head only where
it is needed: at the answer position and only for the letter rows (letter mode), or at the
positions that predict choice tokens (choice-likelihood). The full-vocabulary logits at every
position, which a plain HF forward computes, are never formed. The speed levers this forward
uses live in `loraens.fast`; `SpeedConfig` switches them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .batching import Batch
from .config import Normalization, PromptConfig, Scoring, SpeedConfig
from .fast.attention import flex_block_mask
from .fast.head import token_log_probs
from .fast.last_layer import last_layer_at, member_slots, supports_last_layer_at
from .fast.packing import KWARG as PACKING_KWARG
from .fast.packing import pack, padding_mask
from .fast.prefix import PrefixCache, cached_hidden
from .fast.support import FLEX, attention_implementation, can_pack, decoder_of


class HasLetterIds(Protocol):
    """An encoder (`prompts.PromptEncoder`, `member_prompts.MemberEncoder`): its letter token ids."""

    letter_ids: tuple[int, ...]


@dataclass(frozen=True)
class Scorer:
    """How member rows become log-probabilities over the choices; built once per run.

    scoring / letter_ids / normalization: from `PromptConfig` and the encoder (`from_prompt`).
    speed: the levers of `loraens.fast`. prefix_cache: the frozen-prefix cache of this model, or
    None (the run builder creates it for `--ensemble.top_layers`; it holds hidden states, so it
    belongs to one base model).
    """

    scoring: Scoring
    letter_ids: tuple[int, ...] = ()
    normalization: Normalization = Normalization.MEAN
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    prefix_cache: PrefixCache | None = None

    @classmethod
    def from_prompt(cls, prompt: PromptConfig, encoder: HasLetterIds, speed: SpeedConfig | None = None,
                    prefix_cache: PrefixCache | None = None) -> Scorer:
        return cls(prompt.scoring, encoder.letter_ids, prompt.normalization, speed or SpeedConfig(), prefix_cache)

    def log_probs(self, model: nn.Module, batch: Batch, num_members: int, training: bool = False) -> torch.Tensor:
        """Log-probabilities over choices, shape [M, B, C], with masked choices at -inf.

        `batch` holds M*B member-major rows (see `Batch.repeat_members`), so row k*B + i is
        question i as seen by member k. Gradients flow to the members' LoRA weights. `training`:
        the full-vocabulary head of choice-likelihood may take the bf16 logits alone
        (`speed.bf16_train_head`); evaluation keeps the float32-exact logits.
        """
        exact_head = not (training and self.speed.bf16_train_head)
        return member_log_probs(model, batch, num_members, self, exact_head)

    def scores(self, model: nn.Module, batch: Batch, num_members: int) -> torch.Tensor:
        """The choice scores before the softmax over choices, shape [M, B, C], masked choices at -inf.

        `log_probs` is their log-softmax. Letter scoring: the letters' logits; choice-likelihood:
        each choice's summed or mean token log-probability. A Laplace posterior linearises these
        (`loraens.laplace`). Float32-exact head, gradients flow to the LoRA weights.
        """
        return member_scores(model, batch, num_members, self)


def _head_logits(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Output-head logits for `hidden` [..., H], restricted to vocabulary `rows` [C]: [..., C]."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    # float32 logits: bf16 would round them in steps of up to ~0.1 and blur NLL and ECE; with
    # C rows at one position per question this costs nothing (the full-vocabulary head of
    # choice-likelihood scoring is in `fast.head.token_log_probs`).
    logits = F.linear(hidden.float(), head.weight[rows].float(), None if bias is None else bias[rows].float())
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping of the final logits
        logits = torch.tanh(logits / cap) * cap
    return logits


def member_log_probs(model: nn.Module, batch: Batch, num_members: int, scorer: Scorer,
                     exact_head: bool = True) -> torch.Tensor:
    """`Scorer.log_probs`: [M, B, C] log-probabilities of the M*B member-major rows of `batch`.

    `exact_head=False`: a bf16 model's full-vocabulary head of choice-likelihood scoring uses the
    bf16 logits alone, one GEMM fewer (`fast.head.token_log_probs`).
    """
    scores = member_scores(model, batch, num_members, scorer, exact_head)
    return F.log_softmax(scores, dim=-1)


def member_scores(model: nn.Module, batch: Batch, num_members: int, scorer: Scorer,
                  exact_head: bool = True) -> torch.Tensor:
    """`Scorer.scores`: [M, B, C] choice scores before the softmax, masked choices at -inf."""
    scoring, speed = scorer.scoring, scorer.speed
    batch = batch.to(next(model.parameters()).device)
    rows = batch.num_rows
    if rows % num_members:
        raise ValueError(f"A batch of {rows} rows cannot be split among {num_members} members.")
    # The positions the head reads, as flat slots r*T + t of the padded rows [N]; for
    # choice-likelihood also which of them each choice token is scored at, [K].
    needed, token_rows = _head_positions(batch, scoring, speed.shared_head_positions)
    cache = scorer.prefix_cache
    packed = speed.pack_tokens and batch.lengths is not None and can_pack(model)
    mask = padding_mask(batch) if packed else batch.attention_mask
    if mask is not None:
        # An additive float mask works with every attention implementation; with "eager"
        # attention it is also much faster on CPU than SDPA's masked flash kernel (whose
        # backward dominated a training step in our profile).
        dtype = model.dtype
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    decoder = decoder_of(model)
    if packed:  # real tokens only, each member's rows end to end (`loraens.fast.packing`)
        input_ids, position_ids, packing = pack(batch, num_members)
        if attention_implementation(model) == FLEX:  # one block mask for every layer of this forward
            packing = packing._replace(block_mask=flex_block_mask(batch, packing, num_members))
        slots = packing.row_src[needed]  # where the needed positions sit in the packed [M, P]
    else:
        slots = needed
    # The last layer runs its MLP only at those positions (`loraens.fast.last_layer`): out [M, S, H].
    at_positions = speed.last_layer_trim and supports_last_layer_at(model)
    if at_positions:
        member = needed // batch.input_ids.shape[1] // (rows // num_members)  # [N]
        keep, where = member_slots(slots, member, num_members)
    with last_layer_at(decoder, keep) if at_positions else nullcontext():
        if packed and cache is not None:  # frozen bottom layers from the prefix cache
            out = cached_hidden(decoder, cache, batch.input_ids, mask, batch.position_ids, batch.lengths,
                                packed=(position_ids, packing))
        elif packed:
            out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=False, **{PACKING_KWARG: packing}).last_hidden_state  # [M, P, H]
        elif cache is not None and batch.lengths is not None:  # frozen bottom layers from the prefix cache
            out = cached_hidden(decoder, cache, batch.input_ids, mask, batch.position_ids, batch.lengths)
        else:
            out = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                          use_cache=False).last_hidden_state  # [R, T, H]
    hidden = out.reshape(-1, out.shape[-1])[where if at_positions else slots]  # [N, H]
    if scoring is Scoring.LETTER:
        c = batch.choice_mask.shape[1]
        scores = _head_logits(model, hidden, torch.tensor(scorer.letter_ids[:c], device=hidden.device))  # [R, C]
    else:
        scores = _choice_scores(model, hidden, token_rows, batch, scorer.normalization, exact_head)  # [R, C]
    scores = scores.masked_fill(~batch.choice_mask, float("-inf"))
    return scores.view(num_members, rows // num_members, -1)


def _head_positions(batch: Batch, scoring: Scoring, shared: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions whose hidden states the head reads, as flat slots r*T + t: [N], sorted.

    Letter: each row's answer position (N = R). Choice-likelihood: the distinct positions that
    predict a choice token, and for each real choice token (in `score_mask` order) the index of
    its position among them, [K]. The prompt's last token predicts the first token of every
    choice, so one position serves them all. `shared=False` (`--speed.shared_head_positions
    false`): one position per choice token (N = K), the head then runs once per choice token.
    """
    r, t = batch.input_ids.shape
    base = torch.arange(r, device=batch.input_ids.device) * t  # [R]
    if scoring is Scoring.LETTER:
        return base + batch.answer_pos, None
    assert batch.score_pos is not None and batch.score_mask is not None
    slots = (base[:, None, None] + batch.score_pos)[batch.score_mask]  # [K], grouped by row
    if not shared:
        return slots, torch.arange(len(slots), device=slots.device)
    return torch.unique(slots, return_inverse=True)  # [N], [K]


def _choice_scores(model: nn.Module, hidden: torch.Tensor, token_rows: torch.Tensor, batch: Batch,
                   normalization: Normalization, exact_head: bool = True) -> torch.Tensor:
    """Summed or mean log-probability of each choice's tokens, [R, C].

    hidden [N, H]: the final hidden states at `_head_positions`; token_rows [K]: the row of
    `hidden` that scores each real choice token.
    """
    assert batch.score_pos is not None and batch.score_tokens is not None and batch.score_mask is not None
    r, c, length = batch.score_pos.shape
    mask = batch.score_mask.view(r, c * length)
    head = model.get_output_embeddings()
    # [K]: real choice tokens only, float32 (see `fast.head.token_log_probs` for the bf16 fast path)
    token_lp = token_log_probs(hidden, head.weight, batch.score_tokens.view(r, c * length)[mask],
                               getattr(head, "bias", None), getattr(model.config, "final_logit_softcapping", None),
                               exact_head, rows=token_rows)
    per_token = torch.zeros(r, c * length, dtype=token_lp.dtype, device=token_lp.device)  # float32
    per_token = per_token.masked_scatter(mask, token_lp).view(r, c, length)
    total = per_token.sum(-1)  # [R, C]
    if normalization is Normalization.MEAN:
        total = total / batch.score_mask.sum(-1).clamp(min=1)
    return total
