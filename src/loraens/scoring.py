"""From a padded batch to each member's log-distribution over the choices.

Both scoring modes run the decoder once on all member rows and apply the output head only where
it is needed: at the answer position and only for the letter rows (letter mode), or at the
positions that predict choice tokens (choice-likelihood). The full-vocabulary logits at every
position, which a plain HF forward computes, are never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batching import Batch
from .config import Normalization, Scoring
from .head import token_log_probs
from .packing import KWARG as PACKING_KWARG
from .packing import can_pack, pack, padding_mask, to_rows
from .prefix import cached_hidden, prefix_cache_of


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of an HF causal LM (without its output head)."""
    return getattr(model, model.base_model_prefix)


def _head_logits(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Output-head logits for `hidden` [..., H], restricted to vocabulary `rows` [C]: [..., C]."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    # float32 logits: bf16 would round them in steps of up to ~0.1 and blur NLL and ECE; with
    # C rows at one position per question this costs nothing (the full-vocabulary head of
    # choice-likelihood scoring is in `head.token_log_probs`).
    logits = F.linear(hidden.float(), head.weight[rows].float(), None if bias is None else bias[rows].float())
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping of the final logits
        logits = torch.tanh(logits / cap) * cap
    return logits


def member_log_probs(
    model: nn.Module,
    batch: Batch,
    num_members: int,
    scoring: Scoring,
    letter_ids: tuple[int, ...] = (),
    normalization: Normalization = Normalization.MEAN,
    exact_head: bool = True,
    pack_tokens: bool = True,
) -> torch.Tensor:
    """Log-probabilities over choices, shape [M, B, C], with masked choices at -inf.

    `batch` holds M*B member-major rows (see `Batch.repeat_members`), so row k*B + i is question
    i as seen by member k. Gradients flow to the members' LoRA weights.

    `exact_head=False` (training): a bf16 model's full-vocabulary head of choice-likelihood
    scoring uses the bf16 logits alone, one GEMM fewer (`head.token_log_probs`); evaluation keeps
    the float32-exact logits that NLL and ECE are measured on.

    `pack_tokens`: run the decoder on the real tokens only (`loraens.packing`) where the model
    supports it; False runs the padded rows (same results up to bf16 rounding).
    """
    batch = batch.to(next(model.parameters()).device)
    rows = batch.num_rows
    if rows % num_members:
        raise ValueError(f"A batch of {rows} rows cannot be split among {num_members} members.")
    cache = prefix_cache_of(model)
    packed = pack_tokens and batch.lengths is not None and can_pack(model)
    mask = padding_mask(batch) if packed else batch.attention_mask
    if mask is not None:
        # An additive float mask works with every attention implementation; with "eager"
        # attention it is also much faster on CPU than SDPA's masked flash kernel (whose
        # backward dominated a training step in our profile).
        dtype = model.dtype
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    if packed:  # real tokens only, each member's rows end to end (`loraens.packing`)
        input_ids, position_ids, packing = pack(batch, num_members)
        if cache is not None:  # frozen bottom layers from the prefix cache
            out = cached_hidden(decoder_of(model), cache, batch.input_ids, mask, batch.position_ids, batch.lengths,
                                packed=(position_ids, packing))
        else:
            out = decoder_of(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False, **{PACKING_KWARG: packing}).last_hidden_state
        hidden = to_rows(out.reshape(-1, out.shape[-1]), packing).view(*batch.input_ids.shape, -1)  # [M, P, H] -> [R, T, H]
    elif cache is not None and batch.lengths is not None:  # frozen bottom layers from the prefix cache
        hidden = cached_hidden(decoder_of(model), cache, batch.input_ids, mask, batch.position_ids, batch.lengths)
    else:
        hidden = decoder_of(model)(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # [R, T, H]
    if scoring is Scoring.LETTER:
        c = batch.choice_mask.shape[1]
        at_answer = hidden[torch.arange(rows), batch.answer_pos]  # [R, H]
        scores = _head_logits(model, at_answer, torch.tensor(letter_ids[:c], device=hidden.device))  # [R, C]
    else:
        scores = _choice_scores(model, hidden, batch, normalization, exact_head)  # [R, C]
    scores = scores.masked_fill(~batch.choice_mask, float("-inf"))
    return F.log_softmax(scores, dim=-1).view(num_members, rows // num_members, -1)


def _choice_scores(model: nn.Module, hidden: torch.Tensor, batch: Batch, normalization: Normalization,
                   exact_head: bool = True) -> torch.Tensor:
    """Summed or mean log-probability of each choice's tokens, [R, C]."""
    assert batch.score_pos is not None and batch.score_tokens is not None and batch.score_mask is not None
    r, c, length = batch.score_pos.shape
    flat_pos = batch.score_pos.view(r, c * length)
    gathered = hidden.gather(1, flat_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [R, C*L, H]
    mask = batch.score_mask.view(r, c * length)
    head = model.get_output_embeddings()
    # [K]: real choice tokens only, float32 (see `head.token_log_probs` for the bf16 fast path)
    token_lp = token_log_probs(gathered[mask], head.weight, batch.score_tokens.view(r, c * length)[mask],
                               getattr(head, "bias", None), getattr(model.config, "final_logit_softcapping", None),
                               exact_head)
    per_token = torch.zeros(r, c * length, dtype=token_lp.dtype, device=token_lp.device)  # float32
    per_token = per_token.masked_scatter(mask, token_lp).view(r, c, length)
    total = per_token.sum(-1)  # [R, C]
    if normalization is Normalization.MEAN:
        total = total / batch.score_mask.sum(-1).clamp(min=1)
    return total
