"""Typed run configuration: one dataclass per concern, validated on construction.

A `RunConfig` is everything needed to rerun an experiment. It round-trips through YAML
(`to_dict` / `from_dict`), and the CLI generates one ``--section.field`` flag per field, so an
error can always name the flag (``--train.lr``) that holds the bad value.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import string
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and the value."""


class Scoring(str, enum.Enum):
    """How a question becomes a distribution over its choices."""

    LETTER = "letter"  # next-token logits of the choice letters (the paper's way)
    CHOICE_LIKELIHOOD = "choice-likelihood"  # log-likelihood of each choice's text (cloze)


class Normalization(str, enum.Enum):
    """How choice-likelihood scores are normalised for the choice's length."""

    SUM = "sum"  # summed log-probability of the choice tokens
    MEAN = "mean"  # mean log-probability per choice token


class CompileMode(str, enum.Enum):
    """Whether `--train.compile` runs the decoder layers through `torch.compile`."""

    AUTO = "auto"  # when the run is long enough to pay the compilation back (loraens.compiling)
    TRUE = "true"
    FALSE = "false"


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check(cond: bool, flag: str, constraint: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"`--{flag}` {constraint}, but got {value!r}.")


def _check_finite(section: Any, name: str) -> None:
    """Every float setting of `section` must be a finite number (inf and nan pass `> 0`-style checks)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`--{name}.{f.name}` must be a finite number, but got {value!r}.")


@dataclass
class DataConfig:
    """Which questions to train and evaluate on."""

    dataset: str = "arc_easy"  # built-in name, "mmlu:<subjects or group>", or a .jsonl/.csv path
    train_split: str = "train"  # the split the members train on
    eval_splits: list[str] = field(default_factory=lambda: ["validation"])  # splits scored after training
    data_dir: str | None = None  # local mirror in the hub schema; else $LORAENS_DATA_DIR, else hub
    source: str = "auto"  # auto | hub | local
    train_limit: int | None = None  # seeded subsample of the training questions
    eval_limit: int | None = None  # seeded subsample of each evaluation split
    seed: int = 0  # seed of the subsamples
    skip_invalid: bool = False  # skip bad rows (and report how many) instead of failing
    # Hold out this many training questions (seeded, disjoint from the training subsample) as an
    # evaluation split named "holdout": a validation set for datasets whose test labels are hidden.
    holdout: int = 0
    # The split that fits temperatures and picks the early-stopping epoch; must be one of eval_splits.
    # Default: "validation" if evaluated, else "holdout" if evaluated, else none (those methods are off).
    val_split: str | None = None

    def __post_init__(self) -> None:
        _check(self.source in ("auto", "hub", "local"), "data.source", "must be auto, hub or local", self.source)
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name}", "must be a positive integer", value)
        if isinstance(self.eval_splits, str):
            self.eval_splits = [s for s in self.eval_splits.split(",") if s]
        _check(len(self.eval_splits) > 0, "data.eval_splits", "must name at least one split to evaluate",
               self.eval_splits)
        _check(self.holdout >= 0, "data.holdout", "must be a non-negative number of questions", self.holdout)
        _check(self.holdout > 0 or "holdout" not in self.eval_splits, "data.eval_splits",
               "names the split 'holdout', which needs --data.holdout N (questions held out of the training split)",
               self.eval_splits)
        _check(self.val_split is None or self.val_split in self.eval_splits, "data.val_split",
               f"must be one of --data.eval_splits {self.eval_splits}", self.val_split)

    @property
    def selection_split(self) -> str | None:
        """The split used for temperature fitting and early stopping (see `val_split`)."""
        if self.val_split is not None:
            return self.val_split
        return next((s for s in ("validation", "holdout") if s in self.eval_splits), None)


@dataclass
class ModelConfig:
    """The frozen base model."""

    name: str = "smollm2-135m"  # alias of the embedded default, a hub id, a local folder or a .gguf file
    gguf_file: str | None = None  # file name inside `name` when `name` is a folder or hub id with GGUF files
    dtype: DType = DType.BFLOAT16  # compute dtype of the frozen base; LoRA weights stay float32
    trust_remote_code: bool = False  # run the model repository's own code (only for models you trust)
    # Where the model, the members and the batches live: auto = the GPU when CUDA is available
    # (under torchrun, each process's own GPU, cuda:$LOCAL_RANK), else the CPU; or cpu, cuda, cuda:N.
    # Run folders are the same whatever the device: members trained on a GPU evaluate on a CPU.
    device: str = "auto"
    # auto: loraens' own attention for the device (docs/design.md says which): "loraens_grouped_eager"
    # (transformers' eager without repeating the key/value heads) on CPU, "loraens_sdpa" (fused SDPA
    # over the members' packed rows) on CUDA; "loraens_flex" (FlexAttention with a block mask) is
    # the third. transformers' "eager" and "sdpa" also work, without token packing. (Choice-likelihood
    # rows need a 4-D block mask, which rules out flash_attention_2.)
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        self.dtype = _enum(DType, self.dtype, "model.dtype")
        _check(bool(DEVICE_PATTERN.fullmatch(str(self.device))), "model.device",
               "must be auto, cpu, cuda or cuda:N (N a GPU index)", self.device)


@dataclass
class PromptConfig:
    """How questions are turned into token sequences and scored."""

    scoring: Scoring = Scoring.CHOICE_LIKELIHOOD  # answer letter logits, or each choice's token likelihood
    normalization: Normalization = Normalization.MEAN  # choice-likelihood only
    # --prompt.scoring letter: the prompt lists the choices, one `choice_template` line each.
    letter_template: str = "Question: {question}\n{choices}\nAnswer:"
    choice_template: str = "{letter}. {choice}"  # one line of {choices} in the letter template
    # --prompt.scoring choice-likelihood: the prompt, then each choice's `continuation_template`.
    likelihood_template: str = "Question: {question}\nAnswer:"
    continuation_template: str = " {choice}"  # appended to the choice-likelihood prompt for each choice
    # Longest row in tokens: the prompt, plus (choice-likelihood) every choice. A longer prompt loses
    # its beginning; choices are cut from their end only when they fill more than 3/4 of the row and
    # the prompt leaves them too little: the longest are cut to one common cap, and a warning says how
    # many were cut.
    max_length: int = 512

    def __post_init__(self) -> None:
        self.scoring = _enum(Scoring, self.scoring, "prompt.scoring")
        self.normalization = _enum(Normalization, self.normalization, "prompt.normalization")
        # The fields each template may use: any other `{name}` is a ConfigError here, not a KeyError
        # once the model has loaded.
        for name, allowed in {"letter_template": ("question", "choices"), "choice_template": ("letter", "choice"),
                              "likelihood_template": ("question",), "continuation_template": ("choice",)}.items():
            self._check_template(name, allowed)
        _check("{question}" in self.letter_template and "{choices}" in self.letter_template,
               "prompt.letter_template", "must contain {question} and {choices}", self.letter_template)
        _check("{letter}" in self.choice_template and "{choice}" in self.choice_template,
               "prompt.choice_template", "must contain {letter} and {choice}", self.choice_template)
        _check("{question}" in self.likelihood_template, "prompt.likelihood_template", "must contain {question}",
               self.likelihood_template)
        _check("{choice}" in self.continuation_template, "prompt.continuation_template",
               "must contain {choice}", self.continuation_template)
        _check(isinstance(self.max_length, int) and not isinstance(self.max_length, bool) and self.max_length >= 8,
               "prompt.max_length", "must be an integer of at least 8", self.max_length)

    def for_member(self, entry: str) -> PromptConfig:
        """These settings with the templates of one `--ensemble.member_prompts` entry: "default" (these
        templates), a `PROMPT_STYLES` name, or a template for this scoring mode (the letter template
        under letter scoring, else the likelihood template). A bad template is a ConfigError."""
        if entry == "default":
            return self
        if entry in PROMPT_STYLES:
            likelihood, letter = PROMPT_STYLES[entry]
            return dataclasses.replace(self, likelihood_template=likelihood, letter_template=letter)
        field = "letter_template" if self.scoring is Scoring.LETTER else "likelihood_template"
        try:
            if self.scoring is Scoring.LETTER:
                return dataclasses.replace(self, letter_template=entry)
            return dataclasses.replace(self, likelihood_template=entry)
        except ConfigError as err:
            raise ConfigError(f"`--ensemble.member_prompts` entry {entry!r} is used as --prompt.{field} (under "
                              f"--prompt.scoring {self.scoring.value}) and is not a valid one: {err}") from None

    def _check_template(self, name: str, allowed: tuple[str, ...]) -> None:
        """A ConfigError naming `--prompt.<name>` unless it is a str.format template of `allowed` fields only."""
        template = getattr(self, name)
        names = ", ".join("{" + f + "}" for f in allowed)
        _check(isinstance(template, str), f"prompt.{name}", "must be text", template)
        try:
            used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:  # an unmatched { or }
            raise ConfigError(f"`--prompt.{name}` is not a valid template ({e}): {template!r}. Its fields are "
                              f"{names}; write a literal brace as {{{{ or }}}}.") from None
        for f in used:
            _check(f in allowed, f"prompt.{name}",
                   f"may use only the fields {names}; {{{f}}} is not one of them (write a literal brace as {{{{ or "
                   "}})", template)
        try:
            template.format(**{f: "x" for f in allowed})
        except (ValueError, KeyError, IndexError, AttributeError) as e:  # e.g. {question:d}
            raise ConfigError(f"`--prompt.{name}` cannot be filled in ({type(e).__name__}: {e}): {template!r}. "
                              f"Use its fields plainly: {names}.") from None


# Built-in prompt styles for `--ensemble.member_prompts`: name -> (likelihood_template, letter_template).
# "default" is the run's own --prompt templates. Letter templates end with "Answer:", after which
# the letter tokens are checked (`prompts.letter_token_ids`).
PROMPT_STYLES: dict[str, tuple[str, str]] = {
    "plain": ("{question}\nAnswer:", "{question}\n{choices}\nAnswer:"),
    "exam": ("The following is a multiple-choice exam question.\n\n{question}\nAnswer:",
             "The following is a multiple-choice exam question.\n\n{question}\n{choices}\nAnswer:"),
    "quiz": ("Q: {question}\nA:", "Q: {question}\n{choices}\nAnswer:"),
}


DEFAULT_MEMBER_PROMPTS = ("default", "plain", "exam", "quiz")


@dataclass
class EnsembleConfig:
    """The LoRA members on the frozen base."""

    num_members: int = 4  # M, the LoRA members of the ensemble
    rank: int = 8  # LoRA rank r of every member
    alpha: float = 16.0  # LoRA scaling is alpha / rank
    dropout: float = 0.0  # LoRA dropout on the members' input; each member draws its own masks
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # linear layers to adapt
    init_scale: float = 4.0  # multiplies PEFT's kaiming-uniform init of A; larger = more diverse members
    seed: int = 0  # member k's LoRA init is drawn from a seed derived from (seed, k)
    member_data_order: bool = True  # each member sees the training questions in its own order
    member_init: bool = True  # each member draws its own LoRA init; false = all share member 0's init
    # LoRA only in the top K decoder layers (null = all layers). The frozen layers below need no
    # backward pass, so training is cheaper; PEFT calls this layers_to_transform.
    top_layers: int | None = None
    # With top_layers: compute the frozen layers below once per question and reuse them for every
    # member and epoch (the frozen-prefix cache). Same results up to bf16 rounding, much faster.
    prefix_cache: bool = True
    # Diversity levers (loraens.diversity), each off by default.
    bagging: bool = False  # each member trains on its own bootstrap resample of the training questions
    # [low, high]: each member's peak learning rate is drawn log-uniformly from this range (replaces
    # --train.lr for the members; hyper-ensembles). Null: every member uses --train.lr.
    lr_range: list[float] | None = None
    # [low, high]: each member's AdamW weight decay is drawn uniformly from this range (replaces
    # --train.weight_decay). Null: every member uses --train.weight_decay.
    weight_decay_range: list[float] | None = None
    # Per-member LoRA targets: member k adapts only entry k mod len, a "+"-joined subset of
    # --ensemble.target_modules (e.g. q_proj+v_proj,k_proj+o_proj). Null: every member adapts all.
    member_targets: list[str] | None = None
    # Per-member prompts: member k reads every question through entry k mod len, a style name
    # ("default" = the --prompt templates; plain, exam, quiz: PROMPT_STYLES) or, in a YAML file, a
    # template with {question} (and {choices} for --prompt.scoring letter). "default" alone (or null):
    # every member reads the --prompt templates. The four prompts are the default because they gave
    # the ensemble a lower NLL and ECE than one shared prompt on held-out data (EXPERIMENTS.md).
    member_prompts: list[str] | None = field(default_factory=lambda: list(DEFAULT_MEMBER_PROMPTS))

    def member_prompt(self, member: int) -> str:
        """The `member_prompts` entry member `member` (its index in the whole ensemble) reads: k mod len."""
        entries = self.member_prompts or ["default"]
        return entries[member % len(entries)]

    def __post_init__(self) -> None:
        _check_finite(self, "ensemble")
        for name, positive in (("lr_range", True), ("weight_decay_range", False)):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [float(v) for v in value.split(",") if v]
                setattr(self, name, value)
            if value is None:
                continue
            ok = (len(value) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                  and value[0] <= value[1] and (value[0] > 0 if positive else value[0] >= 0))
            _check(ok, f"ensemble.{name}", "must be two finite numbers low,high with low <= high"
                   + (" and low > 0" if positive else " and low >= 0"), value)
            setattr(self, name, [float(v) for v in value])
        _check(self.num_members >= 1, "ensemble.num_members", "must be at least 1", self.num_members)
        _check(self.rank >= 1, "ensemble.rank", "must be at least 1", self.rank)
        _check(self.alpha > 0, "ensemble.alpha", "must be positive", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "ensemble.dropout", "must be in [0, 1)", self.dropout)
        _check(self.init_scale > 0, "ensemble.init_scale", "must be positive", self.init_scale)
        _check(self.top_layers is None or self.top_layers >= 1, "ensemble.top_layers",
               "must be at least 1 (or null for every layer)", self.top_layers)
        if isinstance(self.target_modules, str):
            self.target_modules = [s for s in self.target_modules.split(",") if s]
        _check(len(self.target_modules) > 0, "ensemble.target_modules", "must name at least one module",
               self.target_modules)
        if isinstance(self.member_targets, str):
            self.member_targets = [s for s in self.member_targets.split(",") if s]
        if self.member_targets is not None:
            _check(len(self.member_targets) > 0, "ensemble.member_targets",
                   "must name at least one module set (or be null)", self.member_targets)
            for group in self.member_targets:
                names = [n for n in group.split("+")]
                unknown = [n for n in names if n not in self.target_modules]
                _check(bool(names) and all(names) and not unknown, "ensemble.member_targets",
                       f"must hold '+'-joined names from --ensemble.target_modules {self.target_modules} "
                       f"(add {unknown or group!r} there, or fix the entry {group!r})", self.member_targets)
        if isinstance(self.member_prompts, str):
            self.member_prompts = [s for s in self.member_prompts.split(",") if s]
        if self.member_prompts is not None:
            styles = ", ".join(["default", *PROMPT_STYLES])
            _check(isinstance(self.member_prompts, list) and len(self.member_prompts) > 0, "ensemble.member_prompts",
                   f"must list at least one prompt (styles: {styles}), or be null", self.member_prompts)
            for entry in self.member_prompts:
                _check(isinstance(entry, str) and (entry == "default" or entry in PROMPT_STYLES
                                                   or "{question}" in entry), "ensemble.member_prompts",
                       f"entries must be a style ({styles}) or a template with {{question}}; {entry!r} is neither",
                       self.member_prompts)


@dataclass
class TrainConfig:
    """The optimisation of all members at once."""

    epochs: int = 2  # passes over the training questions; 0 = no fine-tuning (every member is the base model)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs if reached first)
    lr: float = 5e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay on A and B
    warmup_ratio: float = 0.1  # share of the steps with linear warmup; then linear decay to 0
    batch_size: int = 8  # questions per member per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide evenly)
    max_grad_norm: float | None = 1.0  # clipped per member, as if each member trained alone
    bucket_window: int = 8  # sort by length within windows of this many batches (less padding); 1 = off
    eval_batch_size: int = 16  # questions per forward pass in evaluation
    eval_every_epoch: bool = True  # score the eval splits after every epoch (else after the last)
    # Regularisers, off at 0.
    kl_coef: float = 0.0  # weight of KL(member || frozen base) over each training question's choices
    delta_l2: float = 0.0  # weight of sum over layers of ||scaling * B A||_F^2, per member
    # Stop when the ensemble's NLL on --data.val_split has not improved for this many epochs, and
    # keep the members of the best epoch. Null = train all epochs.
    early_stopping_patience: int | None = None
    # torch.compile the decoder layers: the first step compiles, later steps run faster (measured:
    # BENCHMARKS.md section (f)). auto: only for runs of at least 5000 member-questions
    # (steps x members x batch_size, x K/L when a frozen-prefix cache leaves K of L layers to compile),
    # without member_chunk or checkpointing, with a C++ compiler. Evaluation always runs eagerly.
    compile: CompileMode = CompileMode.AUTO
    # Members per forward/backward pass; null = all M at once (fastest). A smaller number bounds a
    # step's activation memory to that of member_chunk x batch_size questions; gradients are the same
    # (with LoRA dropout the masks are drawn in another order, so runs differ like two seeds would).
    member_chunk: int | None = None
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # less memory for long prompts or large batches, about a third more compute.
    gradient_checkpointing: bool = False
    # Besides every epoch end, write a checkpoint every N optimizer steps (null: at epoch ends only).
    # A killed run resumes from its last checkpoint (`loraens train --resume RUN`).
    checkpoint_every: int | None = None
    # Warn when the mean training loss stays above its first window's value for this many windows in
    # a row (a window is a quarter epoch); the run goes on. Null turns the check off.
    divergence_patience: int | None = 3

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        self.compile = _enum(CompileMode, self.compile, "train.compile")
        _check(self.member_chunk is None or self.member_chunk >= 1, "train.member_chunk",
               "must be at least 1 (or null for all members at once)", self.member_chunk)
        _check(not (self.compile is CompileMode.TRUE and self.member_chunk is not None), "train.member_chunk",
               "cannot be combined with --train.compile (each member group would compile its own graph); "
               "drop one of the two", self.member_chunk)
        _check(self.epochs >= 0, "train.epochs", "must be at least 0 (0: no fine-tuning, the base model's zero-shot "
               "row)", self.epochs)
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be at least 1",
               self.max_steps)
        _check(self.lr > 0, "train.lr", "must be positive", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be non-negative", self.weight_decay)
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(self.batch_size >= 1, "train.batch_size", "must be at least 1", self.batch_size)
        _check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0, "train.grad_accum",
               f"must be >= 1 and divide --train.batch_size ({self.batch_size})", self.grad_accum)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm",
               "must be positive (or null to disable clipping)", self.max_grad_norm)
        _check(self.bucket_window >= 1, "train.bucket_window", "must be at least 1", self.bucket_window)
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be at least 1", self.eval_batch_size)
        _check(self.kl_coef >= 0, "train.kl_coef", "must be non-negative", self.kl_coef)
        _check(self.delta_l2 >= 0, "train.delta_l2", "must be non-negative", self.delta_l2)
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "train.early_stopping_patience", "must be at least 1 (or null to disable)",
               self.early_stopping_patience)
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1, "train.checkpoint_every",
               "must be at least 1 (or null for epoch ends only)", self.checkpoint_every)
        _check(self.divergence_patience is None or self.divergence_patience >= 1, "train.divergence_patience",
               "must be at least 1 (or null to disable the warning)", self.divergence_patience)


@dataclass
class SpeedConfig:
    """Speed levers of the member forward (loraens.fast); off gives the same results, slower."""

    # The members' low-rank update and its backward as one autograd.Function (fewer passes over
    # the activations); off: plain autograd through the same float32 products.
    fused_update: bool = True
    pack_tokens: bool = True  # run the decoder on each member's real tokens end to end, no padding
    # Choice-likelihood: one full-vocabulary head row per distinct position (the prompt's last token
    # predicts every choice's first token); off: one row per choice token.
    shared_head_positions: bool = True
    last_layer_trim: bool = True  # the last decoder layer's MLP only at the positions the head reads
    # Training's choice-likelihood head takes the bf16 logits alone (one GEMM fewer); evaluation
    # always keeps the float32-exact logits that NLL and ECE are measured on.
    bf16_train_head: bool = True


@dataclass
class RunConfig:
    """Everything one run needs; saved as `config.yaml` in the run folder."""

    output_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self) -> None:
        for entry in self.ensemble.member_prompts or []:
            self.prompt.for_member(entry)  # a template that does not fit --prompt.scoring fails here
        if self.train.early_stopping_patience is not None and not self.train.eval_every_epoch:
            raise ConfigError("`--train.early_stopping_patience` watches the validation NLL after every epoch, "
                              "so it needs --train.eval_every_epoch true, but it is false.")
        if self.train.early_stopping_patience is not None and self.data.selection_split is None:
            raise ConfigError(
                "`--train.early_stopping_patience` needs a validation split to watch: add 'validation' (or "
                "'holdout' with --data.holdout N) to --data.eval_splits, or set --data.val_split, "
                f"but --data.eval_splits is {self.data.eval_splits}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (enums become their values)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown keys are an error naming the key."""
        return _build(cls, raw or {}, prefix="")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_yaml(path))

    @classmethod
    def load_saved(cls, path: str | Path) -> RunConfig:
        """A run's own config.yaml: settings it predates take the value it was trained with
        (`with_saved_defaults`), not today's default."""
        return cls.from_dict(with_saved_defaults(read_yaml(path)))


# Settings whose default changed after runs had been saved without them: (section, key) -> the
# value those runs used. A saved config (a run's config.yaml, a sweep cell's record) that lacks the
# key gets that value, so an old run reloads (and an old sweep cell is recognised) as it was trained.
SAVED_BEFORE: dict[tuple[str, str], Any] = {("ensemble", "member_prompts"): None}


def with_saved_defaults(raw: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of a saved config mapping with the settings it predates (`SAVED_BEFORE`) filled in."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for (section, key), value in SAVED_BEFORE.items():
        node = out.setdefault(section, {})
        if isinstance(node, dict) and key not in node:
            node[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, exactly as written (checked by `RunConfig.from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping, but holds {type(raw).__name__}.")
    RunConfig.from_dict(raw or {})  # fail early, naming the bad key or value
    return raw or {}


def _enum(kind: type[enum.Enum], value: Any, flag: str) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, bool):  # a YAML true/false for an enum with "true"/"false" members
        value = str(value).lower()
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"`--{flag}` must be one of {choices}, but got {value!r}.") from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def section_fields(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass, keyed by field name."""
    return typing.get_type_hints(cls)


# Old config keys still read, with a warning: old key -> new key (both with their section).
RENAMED_KEYS = {"prompt.cloze_template": "prompt.likelihood_template"}


def _renamed(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`raw` with old key names (`RENAMED_KEYS`) replaced by the new ones, warning once per key."""
    out = dict(raw)
    for old, new in RENAMED_KEYS.items():
        section, _, key = old.rpartition(".")
        if f"{section}." != prefix or key not in out:
            continue
        new_key = new.rpartition(".")[2]
        if new_key in out:
            raise ConfigError(f"The config sets both `{old}` (its old name) and `{new}`; keep only `{new}`.")
        warnings.warn(f"The config key `{old}` is now `{new}`; the old name is read for now and will stop "
                      "working in a later version.", FutureWarning, stacklevel=4)
        out[new_key] = out.pop(key)
    return out


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping, but got {raw!r}.")
    raw = _renamed(raw, prefix)
    hints = section_fields(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here are: {', '.join(prefix + n for n in sorted(names))}."
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, flag: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the flag."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], flag)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"`--{flag}` must be a list, but got {value!r}.")
        return [coerce(v, args[0], flag) for v in value]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint, value, flag)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"`--{flag}` must be true or false, but got {value!r}.")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"`--{flag}` must be of type {hint.__name__}, but got {value!r}.") from None
    return value
