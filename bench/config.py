"""`BenchConfig`: the flags of `bench/bench.py`, one field each (flag `--batch-size` is field
`batch_size`), with their defaults and help; `parse_config` reads them from a command line."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .common import REPO


def _ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; "" -> []."""
    return [int(x) for x in text.split(",") if x]


def _m_x_b(text: str) -> tuple[int, ...] | None:
    """"16x4" -> (16, 4); "" -> None."""
    return tuple(int(x) for x in text.lower().split("x")) if text else None


def _flag(default, help: str, **argparse_kwargs):
    """A field of `BenchConfig`: its default, its --help text, and what argparse needs beyond them."""
    meta = {"help": help, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class BenchConfig:
    quick: bool = _flag(False, "M = 5 only (no sweep), 16 eval questions, memory for M = 1 and 5 (letter)",
                        action="store_true")
    members: int = _flag(5, "M of the main comparison", type=int)
    sweep: list[int] = _flag([1, 2, 4, 8], "other M values for the training sweep (comma-separated; empty for none)",
                             type=_ints)
    batch_size: int = _flag(8, "questions per member per optimizer step", type=int)
    mfu_batches: list[int] = _flag(
        [8], "larger B at M = --members for the MFU section (e), beside --batch-size (empty for none; "
        "default 8, loraens' own default; B = 16 at M = 5 holds about 11 GB of activations)", type=_ints)
    warmup: int = _flag(1, "untimed warm-up steps", type=int)
    reps: int = _flag(3, "timed steps (medians are taken over these)", type=int)
    modes: str = _flag("letter,choice-likelihood", "scoring modes, comma-separated")
    eval_questions: int = _flag(32, "eval questions (0 skips the evaluation benchmark)", type=int)
    eval_batch_size: int = _flag(16, "questions per eval forward", type=int)
    eval_reps: int = _flag(3, "timed eval passes (after a warm-up on 2 questions)", type=int)
    memory_members: list[int] = _flag([1, 5, 16], "M values of the memory subprocesses (empty for none); "
                                      "PEFT runs for M <= 5", type=_ints)
    memory_rows: int = _flag(20, "rows (M x B) per training step in the memory runs", type=int)
    memory_modes: str = _flag("letter", "scoring modes of the memory runs")
    memory_lean: tuple[int, ...] | None = _flag(
        (16, 4), "M x B of the member-chunking / gradient-checkpointing memory rows "
        "(chunks of M // 4 members; empty for none)", type=_m_x_b)
    dataset: str = _flag("arc_easy", "dataset of every run (a name `loraens.data.load_mcqa` knows)")
    data_dir: str | None = _flag(None, "root of a local mirror of the datasets (<dir>/<dataset>/<split>.jsonl); "
                                 "None: loraens' own lookup, `load_mcqa`'s: $LORAENS_DATA_DIR if the split is there, "
                                 "else the hub")
    eval_split: str = _flag("validation", "split of the evaluation questions")
    train_pool: int = _flag(256, "training questions drawn (seeded) from the split", type=int)
    threads: int | None = _flag(None, "torch threads (default: torch's default)", type=int)
    baseline_attn: str = _flag("eager", "attention implementation of the PEFT baseline (eager = transformers' "
                               "eager, which loraens' default runs without repeating key/value heads; sdpa = HF "
                               "default)")
    prefix_fraction: float = _flag(0.25, "frozen-prefix mode: LoRA in the top K = fraction x layers (0 skips it)",
                                   type=float)
    compile_steps: int = _flag(4, "timed steps of torch.compile vs eager after the compiling first step (0 skips it)",
                               type=int)
    quality_mode: str = _flag("choice-likelihood", "scoring mode of the quality run")
    quality_train: int = _flag(0, "training questions of the quality run (0 skips it)", type=int)
    quality_eval: int = _flag(200, "evaluation questions of the quality run", type=int)
    quality_epochs: int = _flag(2, "epochs of the quality run", type=int)
    quality_lr: float = _flag(1e-3, "learning rate of the quality run", type=float)
    quality_members: int = _flag(4, "members (M) of the quality run", type=int)
    quality_peft: bool = _flag(False, "also train the PEFT-sequential fp32 baseline (and loraens in fp32, to compare "
                               "the same arithmetic) in the quality run", action="store_true")
    out: str = _flag(str(REPO / "BENCHMARKS.md"), "Markdown file for the report: it replaces the block between "
                     "the file's `<!-- bench.py: begin/end -->` markers, or is appended with them; the rest of the "
                     "file is kept ('' = do not write)")

    def quick_applied(self) -> BenchConfig:
        """The configuration that --quick asks for (itself without --quick)."""
        if not self.quick:
            return self
        return dataclasses.replace(self, sweep=[], eval_questions=min(self.eval_questions, 16), mfu_batches=[],
                                   memory_members=[x for x in self.memory_members if x != 16], memory_lean=None)


def parser(description: str) -> argparse.ArgumentParser:
    """One option per field of `BenchConfig`, named after it (`batch_size`: `--batch-size`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        p.add_argument("--" + f.name.replace("_", "-"), default=getattr(defaults, f.name), help=f.metadata["help"],
                       **f.metadata["argparse"])
    return p


def parse_config(argv: list[str], description: str = "") -> BenchConfig:
    """`BenchConfig` from command-line arguments, with --quick applied."""
    return BenchConfig(**vars(parser(description).parse_args(argv))).quick_applied()
