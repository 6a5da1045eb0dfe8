"""Member probabilities [N, M, C] for a list of encoded questions (the `Predictions` contract is in
`loraens.predictions`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import length_sorted_batches
from .member_prompts import MemberQuestions, Questions, member_batch
from .predictions import Predictions
from .scoring import Scorer


@torch.no_grad()
def predict(
    model: nn.Module,
    questions: Questions,
    ids: list[str],
    num_members: int,
    scorer: Scorer,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "predict",
    compiled: bool = False,
) -> Predictions:
    """Every member's distribution over the choices of every question, in the input order.

    Questions are batched by length to keep padding small; each batch is repeated for the M
    members and scored in one forward pass. `questions`: a list (one prompt for every member) or
    `MemberQuestions` for exactly these `num_members` members (each reads its own prompt).

    Decoder layers compiled for training (`--train.compile`) run eagerly here unless `compiled`:
    a compiled `no_grad` forward needs a compilation of its own and was still slower than eager
    once compiled (measured: BENCHMARKS.md section (f)).
    """
    if not questions:
        raise ValueError("predict() got no questions; check the dataset, split and --limit.")
    if len(ids) != len(questions):
        raise ValueError(f"predict() needs one id per question, but got {len(ids)} ids for {len(questions)} questions.")
    if isinstance(questions, MemberQuestions) and questions.num_members != num_members:
        raise ValueError(f"predict() got questions encoded for {questions.num_members} members' prompts, but scores "
                         f"{num_members} members; pass MemberQuestions.select(...) or member(j).")
    was_training = model.training
    model.eval()
    c = max(q.num_choices for q in questions)
    out = torch.zeros(len(questions), num_members, c)
    batches = length_sorted_batches(questions, batch_size)
    with nullcontext() if compiled else torch.compiler.set_stance("force_eager"):
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            batch = member_batch(questions, idx, range(num_members), c)
            lp = scorer.log_probs(model, batch, num_members)  # [M, B, C]
            out[idx] = lp.exp().transpose(0, 1).float().cpu()  # predictions live on the CPU, whatever the device
    model.train(was_training)
    return Predictions.from_questions(out, questions, ids)
