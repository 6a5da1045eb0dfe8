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
    """Encodes questions with one tokenizer and one `PromptConfig`.

    A question's row is at most `max_length` tokens (see `PromptConfig.max_length` for the rule):
    the prompt is cut from the left, and over-long choices from the right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.letter_ids: tuple[int, ...] = ()
        if config.scoring is Scoring.LETTER:
            self.letter_ids = letter_token_ids(tokenizer, len(LETTERS))

    def encode(self, example: QuestionLike) -> EncodedQuestion:
        return self._encode(example)[0]

    def _encode(self, example: QuestionLike) -> tuple[EncodedQuestion, bool, int]:
        """The encoded question, whether its prompt was cut, and how many of its choices were cut."""
        n = len(example.choices)
        if self.config.scoring is Scoring.LETTER:
            if n > len(LETTERS):
                raise PromptError(f"Letter scoring supports at most {len(LETTERS)} choices, but this question has "
                                  f"{n}; use --prompt.scoring choice-likelihood.")
            lines = "\n".join(self.config.choice_template.format(letter=LETTERS[i], choice=c)
                              for i, c in enumerate(example.choices))
            text = self.config.letter_template.format(question=example.question, choices=lines)
            ids = self._tokens(text, special=True)
            budget = self.config.max_length
            return EncodedQuestion(tuple(ids[-budget:]), (), n, example.answer), len(ids) > budget, 0
        text = self.config.likelihood_template.format(question=example.question)
        prompt = self._tokens(text, special=True)
        conts = [self._tokens(self.config.continuation_template.format(choice=c), special=False)
                 for c in example.choices]
        for c, ids in zip(example.choices, conts):
            if not ids:
                raise PromptError(f"Choice {c!r} encodes to no tokens; check --prompt.continuation_template.")
        cap = choice_cap([len(c) for c in conts], len(prompt), self.config.max_length)
        choices_cut = sum(len(c) > cap for c in conts)
        conts = [c[:cap] for c in conts]
        # Keep the end of an over-long prompt: the answer position and the question's last
        # words matter more than its beginning.
        budget = max(self.config.max_length - sum(map(len, conts)), 1)
        question = EncodedQuestion(tuple(prompt[-budget:]), tuple(map(tuple, conts)), n, example.answer)
        return question, len(prompt) > budget, choices_cut

    def encode_all(self, examples: list) -> list[EncodedQuestion]:
        """Encode every example; warns once with the number of prompts, and once with the number of
        choices, cut to fit `max_length`."""
        out, cut, choices_cut = [], [], []
        for e in examples:
            try:
                q, prompt_cut, n_cut = self._encode(e)
            except PromptError as err:
                raise PromptError(f"Question {getattr(e, 'id', '?')!r}: {err}") from None
            if prompt_cut:
                cut.append(getattr(e, "id", "?"))
            if n_cut:
                choices_cut.append((getattr(e, "id", "?"), n_cut))
            out.append(q)
        if cut:
            warnings.warn(f"{len(cut)} of {len(examples)} prompts were longer than --prompt.max_length "
                          f"{self.config.max_length} and lost their beginning (first ids: {cut[:3]}); "
                          "raise --prompt.max_length if the questions need it.", stacklevel=2)
        if choices_cut:
            warnings.warn(f"{sum(k for _, k in choices_cut)} choice(s) in {len(choices_cut)} of {len(examples)} "
                          f"questions were too long for --prompt.max_length {self.config.max_length} and were cut to "
                          f"their first tokens (first ids: {[i for i, _ in choices_cut[:3]]}); their likelihoods "
                          "cover only those tokens. Raise --prompt.max_length, or shorten the choices.", stacklevel=2)
        return out

    def _tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])


def choice_cap(lengths: list[int], prompt_length: int, max_length: int) -> int:
    """Most tokens each choice keeps, so that a choice-likelihood row fits in `max_length`.

    Nothing is cut while the prompt and all choices fit. Otherwise the choices may fill what the
    prompt leaves, but at least `max_length - max_length // 4` tokens (the prompt then keeps at
    least a quarter, cut from the left); if they are longer, the longest are cut to one common
    cap (the largest that fits), so short choices stay whole. Every choice keeps one token, so
    a question with `max_length` or more choices is the one row that can exceed `max_length`.
    """
    total = sum(lengths)
    if not lengths or prompt_length + total <= max_length:
        return max(lengths, default=0)
    budget = max(max_length - prompt_length, max_length - max_length // 4)
    if total <= budget:
        return max(lengths)
    lo, hi = 1, max(lengths)  # the largest cap k with sum(min(length, k)) <= budget (1 at least)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
