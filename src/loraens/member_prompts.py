"""Per-member prompts (`--ensemble.member_prompts`): member k reads every question through its own template.

A diversity lever: members that see a question put differently differ where the wording, not the
data, decides. With P prompts, member k (its index in the whole ensemble) reads prompt k mod P.

- `MemberEncoder` encodes each question once per prompt; `encode_all` returns a plain list when
  every member shares one prompt, else a `MemberQuestions`.
- `MemberQuestions` holds the P encodings of N questions and which prompt each of this process's
  members reads. `member_batch` turns either kind into member-major rows,
  so training, prediction and the Laplace fit and predictive give member k its own prompt's rows.

The choices, their order and the answer are the same under every prompt; only the prompt's text
(and so its tokens, and the choice tokens' positions) differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from transformers import PreTrainedTokenizerBase

from .batching import Batch, collate
from .config import EnsembleConfig, PromptConfig
from .prompts import EncodedQuestion, PromptEncoder


@dataclass(frozen=True)
class MemberQuestions(Sequence[EncodedQuestion]):
    """N questions encoded under P prompts, for m members.

    per_prompt: P tuples of N `EncodedQuestion`s, question i under prompt p at [p][i].
    prompt_of:  [m], the prompt member j of this process reads (global member k reads k mod P).

    As a sequence, item i is question i under the prompt with its longest row: its choices, answer
    and `num_tokens` (the longest) serve batching by length and the predictions' metadata. Rows fed
    to the model come from `rows` / `member(j)`, never from item i.
    """

    per_prompt: tuple[tuple[EncodedQuestion, ...], ...]
    prompt_of: tuple[int, ...]

    def __post_init__(self) -> None:
        n = {len(qs) for qs in self.per_prompt}
        if len(n) != 1:
            raise ValueError(f"Every prompt must encode the same questions, but the counts are {sorted(n)}.")
        bad = [p for p in self.prompt_of if not 0 <= p < len(self.per_prompt)]
        if bad or not self.prompt_of:
            raise ValueError(f"prompt_of must name prompts 0..{len(self.per_prompt) - 1} for at least one member, "
                             f"but got {list(self.prompt_of)}.")

    def __len__(self) -> int:
        return len(self.per_prompt[0])

    @overload
    def __getitem__(self, i: int) -> EncodedQuestion: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[EncodedQuestion]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return max((qs[i] for qs in self.per_prompt), key=lambda q: q.num_tokens)

    @property
    def num_members(self) -> int:
        return len(self.prompt_of)

    def member(self, j: int) -> list[EncodedQuestion]:
        """All N questions as member j of this process reads them."""
        return list(self.per_prompt[self.prompt_of[j]])

    def rows(self, idx: Sequence[Sequence[int]] | np.ndarray, members: range) -> list[EncodedQuestion]:
        """Member-major rows: for each member j in `members`, its questions idx[j - members.start]."""
        if len(idx) != len(members):
            raise ValueError(f"rows() needs one index row per member, but got {len(idx)} for {len(members)} members.")
        return [self.per_prompt[self.prompt_of[j]][int(i)] for j, row in zip(members, idx) for i in row]

    def select(self, members: range) -> MemberQuestions:
        """The same questions for a sub-range of the members (e.g. one member of several)."""
        return MemberQuestions(self.per_prompt, tuple(self.prompt_of[j] for j in members))


Questions = Sequence[EncodedQuestion]  # a plain list (one prompt for all members) or a MemberQuestions


def member_batch(questions: Questions, idx: Sequence[int] | np.ndarray, members: range,
                 num_choices: int | None = None) -> Batch:
    """Member-major rows of `members` (this process's member indices, m of them) for the questions `idx`.

    idx: [B] (every member scores the same questions) or [m, B] (member j's in row j, as in
    training). Row j*B + i is question idx[i] (or idx[j][i]) as member members[j] reads it: under
    its own prompt for `MemberQuestions`, else the one shared encoding.
    """
    arr = np.asarray(idx)
    m = len(members)
    if arr.ndim == 1:
        if isinstance(questions, MemberQuestions):
            return collate(questions.rows(np.tile(arr, (m, 1)), members), num_choices)
        return collate([questions[int(i)] for i in arr], num_choices).repeat_members(m)
    if arr.shape[0] != m:
        raise ValueError(f"member_batch() got {arr.shape[0]} index rows for {m} members.")
    if isinstance(questions, MemberQuestions):
        return collate(questions.rows(arr, members), num_choices)
    return collate([questions[int(i)] for i in arr.reshape(-1)], num_choices)


def join_questions(parts: Sequence[Questions]) -> Questions:
    """The questions of `parts` end to end (e.g. the requests of one server batch), keeping each
    member's prompt. Every part must be of the same kind, from the same encoder."""
    if not parts:
        return []
    if not any(isinstance(p, MemberQuestions) for p in parts):
        return [q for p in parts for q in p]
    member_parts = [p for p in parts if isinstance(p, MemberQuestions)]
    if len(member_parts) != len(parts):
        raise ValueError("join_questions() got per-member and shared questions together; encode them with one encoder.")
    first = member_parts[0]
    if any(p.prompt_of != first.prompt_of for p in member_parts):
        raise ValueError("join_questions() got questions encoded for different members.")
    per_prompt = tuple(tuple(q for p in member_parts for q in p.per_prompt[k]) for k in range(len(first.per_prompt)))
    return MemberQuestions(per_prompt, first.prompt_of)


class MemberEncoder:
    """The encoders of one ensemble process: member k of the ensemble reads prompt k mod P.

    tokenizer, prompt: the run's; ensemble: its `member_prompts` (None: one prompt, the --prompt
    templates); members: the global indices of this process's members (all of them outside torchrun).
    `letter_ids` are shared by every prompt.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, ensemble: EnsembleConfig,
                 members: range) -> None:
        entries = list(dict.fromkeys(ensemble.member_prompt(k) for k in members)) or ["default"]
        self.encoders = [PromptEncoder(tokenizer, prompt.for_member(e)) for e in entries]
        self.letter_ids = self.encoders[0].letter_ids
        self.prompt_of = tuple(entries.index(ensemble.member_prompt(k)) for k in members)

    @property
    def shared(self) -> bool:
        """True when every member of this process reads the same prompt (plain lists of questions)."""
        return len(set(self.prompt_of)) <= 1

    def encode_all(self, examples: list) -> Questions:
        """Every example under every member's prompt: a list when they share one, else `MemberQuestions`."""
        if self.shared:
            return self.encoders[0].encode_all(examples)
        # Only the prompts this process's members read are encoded (a torchrun share may hold fewer).
        return MemberQuestions(tuple(tuple(e.encode_all(examples)) for e in self.encoders), self.prompt_of)
