"""Tests of `loraens.prompts` bounds and of the prompt templates' checks (issue 19).

`--prompt.max_length` bounds a question's whole row: the prompt is cut from the left as before,
and over-long choices are cut from the right to one common cap (`choice_cap`), with a warning
that counts them. A template with a field it cannot fill is a ConfigError naming its flag.
"""

from __future__ import annotations

import warnings

import pytest

from loraens.config import ConfigError, PromptConfig, Scoring
from loraens.data import MCQAExample
from loraens.prompts import PromptEncoder, choice_cap


def encode_all(tokenizer, examples, **prompt):
    """(encoded questions, warning messages) of one `encode_all`."""
    enc = PromptEncoder(tokenizer, PromptConfig(**prompt))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = enc.encode_all(examples)
    return out, [str(w.message) for w in record]


# ---------------------------------------------------------------- choice_cap


@pytest.mark.parametrize("lengths, prompt, max_length, cap", [
    ([3, 4, 5], 10, 512, 5),  # everything fits: nothing cut
    ([3, 4, 5], 600, 512, 5),  # only the prompt is too long: it is cut, the choices are not
    ([100, 100, 100], 300, 512, 100),  # choices fit in 3/4 of the row: the prompt gives way (as before)
    ([500_000, 2, 1], 10, 512, 499),  # a huge choice: cut so that prompt + choices = 512
    ([500_000, 2, 1], 400, 512, 381),  # long prompt: the choices get 3/4 (384), the prompt keeps 128
    ([300, 300, 10], 5, 512, 248),  # both long ones cut to one cap; the short one stays whole
    ([5] * 20, 100, 8, 1),  # more choices than the budget: one token each
    ([], 100, 8, 0),
])
def test_choice_cap(lengths, prompt, max_length, cap):
    assert choice_cap(lengths, prompt, max_length) == cap
    kept = sum(min(n, cap) for n in lengths)
    row = min(prompt, max(max_length - kept, 1)) + kept  # the prompt then takes what the choices leave
    assert row <= max_length or len(lengths) >= max_length  # only a question of max_length+ choices is longer


# ---------------------------------------------------------------- the encoder


def test_a_megabyte_choice_is_bounded_by_max_length(tokenizer):
    """Before, a 1 MB choice packed to 500,008 tokens."""
    ex = MCQAExample("big", "What is the colour of the sky?", ("blue " * 200_000, "red", "green"), 0)
    (q,), messages = encode_all(tokenizer, [ex])
    assert q.num_tokens == 512
    assert messages == ["1 choice(s) in 1 of 1 questions were too long for --prompt.max_length 512 and were cut to "
                        "their first tokens (first ids: ['big']); their likelihoods cover only those tokens. Raise "
                        "--prompt.max_length, or shorten the choices."]
    full = PromptEncoder(tokenizer, PromptConfig(max_length=10_000_000)).encode(ex)
    assert q.prompt_ids == full.prompt_ids  # the short prompt is whole
    assert q.continuations[0] == full.continuations[0][:len(q.continuations[0])]  # the choice keeps its start
    assert q.continuations[1:] == full.continuations[1:]  # the short choices are whole
    (letter,), messages = encode_all(tokenizer, [ex], scoring=Scoring.LETTER)
    assert letter.num_tokens == 512 and "lost their beginning" in messages[0]


def test_long_prompt_and_long_choices_share_the_row(tokenizer):
    ex = MCQAExample("both", "the cat is in the tree " * 100 + "what?", ("sky sea " * 100, "red blue " * 100), 1)
    (q,), messages = encode_all(tokenizer, [ex], max_length=64)
    assert q.num_tokens == 64 and len(q.prompt_ids) >= 64 // 4
    assert {len(c) for c in q.continuations} == {24}  # 3/4 of 64 = 48, shared equally
    assert len(messages) == 2 and "2 choice(s) in 1 of 1 questions" in messages[1]


def test_questions_that_fit_are_unchanged(tokenizer, questions):
    small, messages = encode_all(tokenizer, questions, max_length=512)
    big, _ = encode_all(tokenizer, questions, max_length=100_000)
    assert small == big and messages == []


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("field, template, problem", [
    ("letter_template", "Q: {question}\n{choices}\n{foo}\nAnswer:",
     "`--prompt.letter_template` may use only the fields {question}, {choices}; {foo} is not one of them"),
    ("choice_template", "{letter}) {choice} [{label}]", "`--prompt.choice_template` may use only the fields "
                                                        "{letter}, {choice}; {label} is not one of them"),
    ("likelihood_template", "{question} {0}", "{0} is not one of them"),
    ("likelihood_template", "{question} {}", "{} is not one of them"),
    ("continuation_template", " {choice.upper}", "{choice.upper} is not one of them"),
    ("likelihood_template", "Question: {question\nAnswer:", "`--prompt.likelihood_template` is not a valid template"),
    ("continuation_template", " {choice} }", "`--prompt.continuation_template` is not a valid template"),
    ("continuation_template", " {choice:d}", "`--prompt.continuation_template` cannot be filled in (ValueError"),
    ("choice_template", "{choice}", "`--prompt.choice_template` must contain {letter} and {choice}"),
    ("letter_template", 5, "`--prompt.letter_template` must be text"),
])
def test_bad_templates_are_config_errors_naming_the_flag(field, template, problem):
    with pytest.raises(ConfigError) as info:
        PromptConfig(**{field: template})
    assert problem in str(info.value)


def test_literal_braces_in_templates(tokenizer):
    config = PromptConfig(likelihood_template="{{json}} Question: {question}\nAnswer:",
                          letter_template="Q {{x}}: {question}\n{choices}\nAnswer:")
    ex = MCQAExample("b", "What {is} it?", ("a {b}", "c"), 0)  # braces in the data are text, never fields
    for scoring in Scoring:
        PromptEncoder(tokenizer, PromptConfig(**{**config.__dict__, "scoring": scoring})).encode(ex)


def test_max_length_must_be_an_integer():
    with pytest.raises(ConfigError, match="`--prompt.max_length` must be an integer of at least 8"):
        PromptConfig(max_length=4)
