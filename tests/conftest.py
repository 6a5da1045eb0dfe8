"""Shared fixtures: a tiny random Llama, a tiny in-memory tokenizer, synthetic questions, references.

Nothing here touches the network or the real default model: the tokenizer is a byte-level BPE
trained in memory on a few sentences, and the model is a 2-layer, 32-wide Llama built from a
config with seeded random weights (STYLE.md point 6). Every test gets a FRESH model, because
`attach_members` replaces its layers in place; the weights come from one cached state dict.

The unpacked reference scorers (`letter_reference`, `choice_reference`) run the plain HF model
on one question (or one prompt + choice) at a time and read its full-vocabulary logits, so they
share no code with `loraens.scoring` / `loraens.batching` beyond the token ids.

Device. `LORAENS_TEST_DEVICE` (cpu, the default; cuda; cuda:N) says where the tiny models run:
`DEVICE` (a `torch.device`, CUDA with its index) and the session fixture `device`. `make_base`,
`base_model` and the tests' own tiny models are built on the CPU from seeded weights (the same
weights on every device) and then moved to `DEVICE`. A CUDA device on a machine without one
stops the run at start-up with a usage error. On CUDA, TF32 is switched off for matmuls and
cuDNN, so float32 stays float32 and the CPU tolerances hold as they are.

The placement convention: a tensor lives where the model that made it lives. The reference
scorers build their inputs on the model's device and return their log-probabilities there, like
`Scorer.log_probs` (so a test compares a scorer's output with a reference on one device);
`predict()` returns CPU `Predictions`, whatever the device, so a test that compares predictions
with a model output moves the model output to the CPU (`.cpu()`). Random tensors are drawn on the
CPU from seeded generators (the same numbers on every device) and then moved (`randomize_lora_B`).
Tests that run loraens end to end (`tiny_setup`, `loraens.run`, the CLI) pick their device
themselves (`--model.device auto`); the model folder `tiny_setup` saves is written from the CPU.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraens.config import Normalization, PromptConfig, Scoring, SpeedConfig
from loraens.data import MCQAExample
from loraens.fast.prefix import PrefixCache
from loraens.prompts import LETTERS, EncodedQuestion, PromptEncoder
from loraens.scoring import Scorer

# The models here are tiny: intra-op threads only add synchronisation, and on a busy 2-core CI
# machine two spinning threads made a training step ~25x slower than one thread.
torch.set_num_threads(1)

WORDS = ("red blue green black white sky sea tree stone water fire cat dog bird fish sun moon "
         "small large hot cold fast slow what which is the of a colour animal lives in").split()


# ---------------------------------------------------------------- device

DEVICE_ENV = "LORAENS_TEST_DEVICE"


def _device_from_env() -> tuple[torch.device, str | None]:
    """(`LORAENS_TEST_DEVICE` as a torch.device, None), or (cpu, what is wrong with it)."""
    raw = os.environ.get(DEVICE_ENV, "").strip() or "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", raw):
        return torch.device("cpu"), (f"{DEVICE_ENV}={raw!r} is not a test device: give cpu (the default), cuda "
                                     "or cuda:N.")
    if raw == "cpu":
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        build = "a CPU-only build of torch" if cuda is None else f"torch built for CUDA {cuda}"
        return torch.device("cpu"), (f"{DEVICE_ENV}={raw} asks for a CUDA GPU, but none is visible here ({build}, "
                                     "torch.cuda.is_available() is False). Unset it, or set it to cpu, to run the "
                                     "tests on the CPU.")
    count = torch.cuda.device_count()
    index = int(raw.split(":")[1]) if ":" in raw else torch.cuda.current_device()
    if index >= count:
        return torch.device("cpu"), (f"{DEVICE_ENV}={raw} names GPU {index}, but only {count} GPU(s) are visible "
                                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}).")
    # With its index: a tensor's `.device` is cuda:N, never bare "cuda", so placement checks compare equal.
    return torch.device("cuda", index), None


DEVICE, _DEVICE_ERROR = _device_from_env()

if DEVICE.type == "cuda":
    # float32 matmuls (and cuDNN) in full float32, not TF32's 10-bit mantissa: the tests' float32
    # tolerances are set from float32 rounding (Inductor's FlexAttention kernel follows this too).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config: pytest.Config) -> None:
    if _DEVICE_ERROR is not None:
        raise pytest.UsageError(_DEVICE_ERROR)


def pytest_report_header(config: pytest.Config) -> str:
    if DEVICE.type == "cuda":
        return (f"loraens test device: {DEVICE} ({torch.cuda.get_device_name(DEVICE)}; TF32 off) "
                f"from {DEVICE_ENV}")
    return f"loraens test device: cpu ({DEVICE_ENV}=cuda runs the tiny-model tests on a GPU)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tiny models run (`LORAENS_TEST_DEVICE`)."""
    return DEVICE


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of `model`'s (first) parameters."""
    return next(model.parameters()).device


# ---------------------------------------------------------------- tokenizer


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, like SmolLM2's): " A" .. " J" become single tokens because the
    training text is full of them, and the ByteLevel pre-tokenizer splits "Answer: A" into
    "Answer", ":", " A", so the letter token is the same with or without "Answer:" before it."""
    letters = " ".join(LETTERS)
    corpus = []
    for _ in range(20):
        corpus += [
            "Question: What is the colour of the sky?\nA. red\nB. blue\nC. green\nD. black\nE. white\nAnswer: B",
            *(f"Answer: {c}" for c in LETTERS),
            f" {letters}",
            " ".join(WORDS),
        ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, special_tokens=["<s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    # A BOS token on prompts (add_special_tokens=True), as real chat models have.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>",
                                                                                         tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="session")
def _tiny_llama(tokenizer) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        # Larger than the default 0.02 so the random model's distributions are far from uniform
        # and the equivalence tests compare informative numbers.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fresh_llama(config: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A frozen fp32 copy of the tiny Llama on the CPU (eval mode)."""
    model = LlamaForCausalLM(config).float()
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture
def make_base(_tiny_llama) -> Callable[[], LlamaForCausalLM]:
    """Factory of fresh, identical, frozen fp32 copies of the tiny Llama (eval mode, SDPA) on `DEVICE`."""
    config, state = _tiny_llama

    def make() -> LlamaForCausalLM:
        return _fresh_llama(config, state).to(DEVICE)

    return make


@pytest.fixture
def base_model(make_base) -> LlamaForCausalLM:
    return make_base()


# ---------------------------------------------------------------- questions


def make_questions(n: int, seed: int = 0, choice_counts: tuple[int, ...] = (3, 4, 5)) -> list[MCQAExample]:
    """`n` synthetic questions with 3, 4 and 5 choices in turn, of varied lengths (seeded)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = choice_counts[i % len(choice_counts)]
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + "?"
        choices = tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(c))
        out.append(MCQAExample(id=f"q{i}", question=question, choices=choices, answer=rng.randrange(c)))
    return out


@pytest.fixture(scope="session")
def questions() -> list[MCQAExample]:
    return make_questions(12)


def encoder(tokenizer, scoring: Scoring, **prompt) -> PromptEncoder:
    return PromptEncoder(tokenizer, PromptConfig(scoring=scoring, **prompt))


@pytest.fixture(scope="session")
def letter_encoder(tokenizer) -> PromptEncoder:
    return encoder(tokenizer, Scoring.LETTER)


@pytest.fixture(scope="session")
def cloze_encoder(tokenizer) -> PromptEncoder:
    return encoder(tokenizer, Scoring.CHOICE_LIKELIHOOD)


def scorer(scoring: Scoring, letter_ids: tuple[int, ...] = (), normalization: Normalization = Normalization.MEAN,
           cache: PrefixCache | None = None, **speed) -> Scorer:
    """A `Scorer` for the tests: `speed` sets `SpeedConfig` fields, `cache` a frozen-prefix cache."""
    return Scorer(scoring, tuple(letter_ids), normalization, SpeedConfig(**speed), cache)


# ---------------------------------------------------------------- references that share no code


def letter_reference(model, q: EncodedQuestion, letter_ids: tuple[int, ...]) -> torch.Tensor:
    """Log-distribution [num_choices] from a plain HF forward of the prompt alone (on the model's device)."""
    ids = torch.tensor([q.prompt_ids], device=model_device(model))
    logits = model(ids).logits[0, -1]  # [V]
    return F.log_softmax(logits[list(letter_ids[: q.num_choices])].float(), dim=-1)


def choice_reference(model, q: EncodedQuestion, normalization: Normalization) -> torch.Tensor:
    """Log-distribution [num_choices]: each choice scored by its own plain HF forward of prompt + choice
    (on the model's device)."""
    device = model_device(model)
    p = len(q.prompt_ids)
    scores = []
    for cont in q.continuations:
        logits = model(torch.tensor([list(q.prompt_ids) + list(cont)], device=device)).logits[0]  # [p + n, V]
        lp = F.log_softmax(logits[p - 1: p - 1 + len(cont)].float(), dim=-1)
        tok = lp.gather(1, torch.tensor(cont, device=device)[:, None]).squeeze(1)
        scores.append(tok.sum() if normalization is Normalization.SUM else tok.mean())
    return F.log_softmax(torch.stack(scores), dim=-1)


def reference_log_probs(model, q: EncodedQuestion, scoring: Scoring, letter_ids=(), normalization=Normalization.MEAN):
    if scoring is Scoring.LETTER:
        return letter_reference(model, q, letter_ids)
    return choice_reference(model, q, normalization)


@pytest.fixture(scope="session")
def reference() -> Callable[..., torch.Tensor]:
    """`reference(model, encoded_question, scoring, letter_ids, normalization)` -> [num_choices] log-probs,
    on the model's device."""
    return reference_log_probs


def randomize_lora_B(layers, std: float = 0.1, seed: int = 1) -> None:
    """Give every member a non-zero B (the default init has B = 0), so members differ and A gets gradients.

    Drawn on the CPU from a seeded generator (the same B on every device), then copied to each layer's device.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_((torch.randn(layer.lora_B.shape, generator=gen) * std).to(layer.lora_B.device))


@pytest.fixture(scope="session")
def randomize_B() -> Callable[..., None]:
    return randomize_lora_B


def _arc_row(q, i: int) -> dict:
    labels = "ABCDE"[: len(q.choices)]
    return {"id": f"q{i}", "question": q.question, "choices": {"text": list(q.choices), "label": list(labels)},
            "answerKey": labels[q.answer]}


@pytest.fixture
def tiny_setup(tmp_path, _tiny_llama, tokenizer):
    """A saved tiny model folder and a local mirror with arc_easy train/validation/test in the hub schema.

    The folder is written from the CPU; runs load it where `--model.device` says (auto: a GPU if there is one).
    """
    model_dir = tmp_path / "tiny-model"
    _fresh_llama(*_tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    mirror = tmp_path / "mirror" / "arc_easy"
    mirror.mkdir(parents=True)
    for split, n, seed in (("train", 12, 0), ("validation", 7, 1), ("test", 9, 2)):
        rows = [_arc_row(q, i) for i, q in enumerate(make_questions(n, seed=seed))]
        (mirror / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, mirror.parent
