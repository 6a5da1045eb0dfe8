"""Turn a question into token ids, for letter scoring or choice-likelihood scoring.

- letter: one prompt that lists the choices as "A. ...", "B. ..."; the distribution over choices
  is the next-token softmax restricted to the letter tokens " A", " B", ... at the answer position.
- choice-likelihood: a prompt with the question only, then each choice as a continuation; a
  choice's score is the (summed or mean) log-probability of its tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from .config import PromptConfig, Scoring

LETTERS = "ABCDEFGHIJ"


class QuestionLike(Protocol):
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class EncodedQuestion:
    """Token ids of one question.

    `prompt_ids` ends right before the answer. For choice-likelihood, `continuations[c]` are the
    token ids of choice c after the prompt; for letter scoring it is empty.
    """

    prompt_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    num_choices: int
    answer: int

    @property
    def num_tokens(self) -> int:
        """Length of the question's row: the prompt, then every continuation (choice-likelihood)."""
        return len(self.prompt_ids) + sum(len(c) for c in self.continuations)


class PromptError(ValueError):
    """The template or tokenizer cannot score these questions; the message says why."""


class PromptEncoder:
    """Encodes questions with one tokenizer and one `PromptConfig`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.letter_ids: tuple[int, ...] = ()
        self._was_cut = False
        if config.scoring is Scoring.LETTER:
            self.letter_ids = letter_token_ids(tokenizer, len(LETTERS))

    def encode(self, example: QuestionLike) -> EncodedQuestion:
        n = len(example.choices)
        if self.config.scoring is Scoring.LETTER:
            if n > len(LETTERS):
                raise PromptError(f"Letter scoring supports at most {len(LETTERS)} choices, but this question has "
                                  f"{n}; use --prompt.scoring choice-likelihood.")
            lines = "\n".join(self.config.choice_template.format(letter=LETTERS[i], choice=c)
                              for i, c in enumerate(example.choices))
            text = self.config.letter_template.format(question=example.question, choices=lines)
            ids = self._tokens(text, special=True)
            return EncodedQuestion(self._cut(ids, 0), (), n, example.answer)
        text = self.config.likelihood_template.format(question=example.question)
        prompt = self._tokens(text, special=True)
        conts = tuple(
            tuple(self._tokens(self.config.continuation_template.format(choice=c), special=False))
            for c in example.choices
        )
        for c, ids in zip(example.choices, conts):
            if not ids:
                raise PromptError(f"Choice {c!r} encodes to no tokens; check --prompt.continuation_template.")
        return EncodedQuestion(self._cut(prompt, sum(map(len, conts))), conts, n, example.answer)

    def encode_all(self, examples: list) -> list[EncodedQuestion]:
        """Encode every example; warns once with the number of prompts cut to `max_length`."""
        out, cut = [], []
        for e in examples:
            try:
                q = self.encode(e)
            except PromptError as err:
                raise PromptError(f"Question {getattr(e, 'id', '?')!r}: {err}") from None
            if self._was_cut:
                cut.append(getattr(e, "id", "?"))
            out.append(q)
        if cut:
            warnings.warn(f"{len(cut)} of {len(examples)} prompts were longer than --prompt.max_length "
                          f"{self.config.max_length} and lost their beginning (first ids: {cut[:3]}); "
                          "raise --prompt.max_length if the questions need it.", stacklevel=2)
        return out

    def _tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _cut(self, ids: list[int], extra: int) -> tuple[int, ...]:
        # Keep the end of an over-long prompt: the answer position and the question's last
        # words matter more than its beginning.
        budget = max(self.config.max_length - extra, 1)
        self._was_cut = len(ids) > budget
        return tuple(ids[-budget:])


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, count: int) -> tuple[int, ...]:
    """Token id of " A", " B", ... ; each must be one token, distinct, and stable after "Answer:"."""
    ids = []
    for letter in LETTERS[:count]:
        toks = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise PromptError(
                f"Letter scoring needs ' {letter}' to be one token, but this tokenizer splits it into {toks}. "
                "Use --prompt.scoring choice-likelihood."
            )
        joint = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        alone = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        if joint[: len(alone)] != alone or joint[len(alone):] != toks:
            raise PromptError(
                f"After 'Answer:' this tokenizer merges ' {letter}' with its neighbours ({joint}), so the letter's "
                "next-token logit is not well defined. Use --prompt.scoring choice-likelihood."
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise PromptError(f"The letter tokens are not distinct: {ids}. Use --prompt.scoring choice-likelihood.")
    return tuple(ids)
