"""Pad encoded questions into tensors; for choice-likelihood, all of a question's choices in one row.

For choice-likelihood scoring a question becomes ONE row: the prompt, then every choice's
tokens. A block attention mask lets each choice attend to the prompt and to its own earlier
tokens only, and position ids restart after the prompt for each choice, so every choice is
scored exactly as if it followed the prompt alone, but the prompt is computed once.
For letter scoring a row is the prompt, right-padded; causal attention never looks at the pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .prompts import EncodedQuestion


@dataclass
class Batch:
    """R rows (questions, or member-major M*B rows), T tokens, C choices, L tokens per choice.

    input_ids:       [R, T] long, right-padded with 0.
    position_ids:    [R, T] long.
    attention_mask:  [R, 1, T, T] bool (True = may attend), or None for plain causal attention.
    answer_pos:      [R] long, position whose next-token logits score the letters (letter mode).
    score_pos:       [R, C, L] long, positions whose next-token logits score choice tokens (choice-likelihood).
    score_tokens:    [R, C, L] long, the choice tokens being scored (choice-likelihood).
    score_mask:      [R, C, L] bool, which (choice, token) slots are real (choice-likelihood).
    choice_mask:     [R, C] bool, which choices exist (questions may have 3, 4 or 5).
    targets:         [R] long, index of the correct choice.
    lengths:         [R] long, number of real (non-padding) tokens of each row.
    segments:        [R, T] long, what each token is: -1 the prompt, k choice k (choice-likelihood),
                     -2 padding. With the rows' order it fixes the attention mask: a token sees the
                     earlier tokens of its own segment and of the prompt (`attention_mask`).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    answer_pos: torch.Tensor
    score_pos: torch.Tensor | None
    score_tokens: torch.Tensor | None
    score_mask: torch.Tensor | None
    choice_mask: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device` (a no-op when it is already there)."""
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device) for f in fields(self)})

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def repeat_members(self, num_members: int) -> Batch:
        """The same questions for every member: [R, ...] -> [M*R, ...], member-major."""
        if num_members == 1:
            return self
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else
                        v.repeat(num_members, *([1] * (v.dim() - 1))) for f in fields(self)})


def collate(questions: list[EncodedQuestion], num_choices: int | None = None) -> Batch:
    """Pad `questions` into one `Batch`; `num_choices` pads C beyond the batch's own maximum."""
    if not questions:
        raise ValueError("collate() needs at least one question.")
    c = max(max(q.num_choices for q in questions), num_choices or 0)
    likelihood = bool(questions[0].continuations)
    r = len(questions)
    t = max(q.num_tokens for q in questions)
    input_ids = torch.zeros(r, t, dtype=torch.long)
    position_ids = torch.zeros(r, t, dtype=torch.long)
    answer_pos = torch.zeros(r, dtype=torch.long)
    choice_mask = torch.zeros(r, c, dtype=torch.bool)
    targets = torch.tensor([q.answer for q in questions], dtype=torch.long)
    lengths = torch.tensor([q.num_tokens for q in questions], dtype=torch.long)
    for i, q in enumerate(questions):
        choice_mask[i, : q.num_choices] = True
    if not likelihood:
        for i, q in enumerate(questions):
            n = len(q.prompt_ids)
            input_ids[i, :n] = torch.tensor(q.prompt_ids)
            answer_pos[i] = n - 1
        position_ids[:] = torch.arange(t)
        segments = torch.where(torch.arange(t)[None] < lengths[:, None], -1, -2)  # the prompt, then padding
        return Batch(input_ids, position_ids, None, answer_pos, None, None, None, choice_mask, targets, lengths,
                     segments)

    longest = max(len(cont) for q in questions for cont in q.continuations)
    score_pos = torch.zeros(r, c, longest, dtype=torch.long)
    score_tokens = torch.zeros(r, c, longest, dtype=torch.long)
    score_mask = torch.zeros(r, c, longest, dtype=torch.bool)
    # segment[i, j] = -1 for the prompt, k for choice k, -2 for padding.
    segment = torch.full((r, t), -2, dtype=torch.long)
    for i, q in enumerate(questions):
        p = len(q.prompt_ids)
        input_ids[i, :p] = torch.tensor(q.prompt_ids)
        position_ids[i, :p] = torch.arange(p)
        segment[i, :p] = -1
        start = p
        for k, cont in enumerate(q.continuations):
            n = len(cont)
            input_ids[i, start: start + n] = torch.tensor(cont)
            position_ids[i, start: start + n] = torch.arange(p, p + n)
            segment[i, start: start + n] = k
            # Token j of the choice is predicted from the position before it: the prompt's last
            # token for j = 0, else the choice's own token j - 1.
            score_pos[i, k, :n] = torch.tensor([p - 1] + list(range(start, start + n - 1)))
            score_tokens[i, k, :n] = torch.tensor(cont)
            score_mask[i, k, :n] = True
            start += n
    idx = torch.arange(t)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, T(query), T(key)]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    same = (seg_q == seg_k) & (seg_q >= -1)
    to_prompt = (seg_k == -1) & (seg_q >= 0)
    allowed = causal & (same | to_prompt)
    # Padding rows attend to themselves only: a query row with no key at all makes SDPA
    # return NaN, which would leak into gradients even though the row is never scored.
    allowed |= torch.eye(t, dtype=torch.bool)[None] & (seg_q == -2)
    return Batch(input_ids, position_ids, allowed[:, None], answer_pos, score_pos, score_tokens, score_mask,
                 choice_mask, targets, lengths, segment)


def length_sorted_batches(questions: Sequence[EncodedQuestion], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to keep padding small."""
    order = sorted(range(len(questions)), key=lambda i: -questions[i].num_tokens)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
