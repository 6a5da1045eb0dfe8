"""Command line: thin verbs over the library (`loraens train | evaluate | report | demo`).

Every field of `RunConfig` is a flag named after its section (``--train.lr``, ``--ensemble.num_members``);
values come from the defaults, then an optional YAML file (``--config``), then the flags.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import os
import re
import sys
import typing
import warnings
from enum import Enum as Enum_
from pathlib import Path
from typing import Any

from .config import PROMPT_STYLES, ConfigError, PromptConfig, RunConfig, read_yaml, section_fields, with_saved_defaults
from .distributed import world_from_env
from .model import ModelError
from .train import NonFiniteError

DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/demo",
    "data": {"dataset": "arc_easy", "train_limit": 300, "eval_splits": ["validation"]},
    # LoRA in the top 10 of the 30 layers with the frozen-prefix cache: the bottom 20 run once per
    # question, so the demo fits in minutes on 2 CPU cores. Bagging (each member on its own
    # bootstrap resample) is the lever that made the ensemble's gain over its members clearest in
    # the diversity-small study (EXPERIMENTS.md): the demo is there to show that gain.
    "ensemble": {"num_members": 4, "top_layers": 10, "bagging": True},
    # Three epochs at this rate make single members over-confident by the end (ECE grows with
    # training, as in the paper), which is the regime where the ensemble's calibration shows.
    "train": {"epochs": 3, "lr": 4e-3},
}


DEMO_RESAMPLES = 1000  # bootstrap resamples of the demo's paired intervals


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is list:
        return "a,b,..."
    if args:
        return _describe(args[0])
    if isinstance(hint, type) and issubclass(hint, Enum_):
        return "{" + ",".join(m.value for m in hint) + "}"
    return getattr(hint, "__name__", str(hint)).upper()


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]+=[^#]*(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the dataclass source, for --help.

    A trailing comment documents its own line; a comment block documents the fields right below
    it (up to a blank line), so one block can explain a pair of related settings.
    """
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    block: list[str] = []
    block_open = False
    for line in lines:
        if (c := _COMMENT_LINE.match(line)) is not None:
            block = block + [c.group(1).strip()] if block_open else [c.group(1).strip()]
            block_open = True
        elif (f := _FIELD_LINE.match(line)) is not None:
            text = (f.group(2) or "").strip() or " ".join(block)
            if text:
                docs[f.group(1)] = text
            block_open = False  # the block also documents the next field lines, until a blank line
        elif not line.strip():
            block, block_open = [], False
    return docs


def add_config_flags(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """One flag per config field; the default shown in --help is the effective default."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below")
    parser.add_argument("--output_dir", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"run folder to write (default: {defaults.output_dir})")
    for section in dataclasses.fields(RunConfig):
        cls = section_fields(RunConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        group = parser.add_argument_group(f"{section.name} settings", (cls.__doc__ or "").strip().splitlines()[0])
        current = getattr(defaults, section.name)
        docs = field_docs(cls)
        for name, hint in section_fields(cls).items():
            value = getattr(current, name)
            shown = value.value if isinstance(value, Enum_) else value
            # argparse formats help with %: a literal percent sign in a comment must be doubled.
            text = docs.get(name, "").replace("%", "%%")
            group.add_argument(f"--{section.name}.{name}", dest=f"{section.name}.{name}", default=argparse.SUPPRESS,
                               metavar=_describe(hint), help=f"{text} (default: {shown})".strip())


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then `base`, then the YAML file, then the flags."""
    raw: dict[str, Any] = _merge({}, base or {})
    if getattr(args, "config", None):
        # Only the keys the file sets: a file that sets the rank must not reset the demo's epochs.
        raw = _merge(raw, read_yaml(args.config))
    flags = {k: v for k, v in vars(args).items() if "." in k or k == "output_dir"}
    for key, value in flags.items():
        node = raw
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return RunConfig.from_dict(raw)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b` merged into a copy of `a`, section by section. Nested dicts are copied, never shared, so
    the flags written into the result cannot change `b` (e.g. the module-level DEMO_DEFAULTS)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraens",
        description="Fine-tune a causal LM as an ensemble of LoRA members on one frozen base model, "
                    "and measure how far its answers can be trusted (accuracy, NLL, ECE, Brier).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an ensemble and write a run folder",
                           description="Train M LoRA members together on one frozen base model, evaluate them "
                                       "on the eval splits after every epoch, and write the run folder.")
    add_config_flags(train, RunConfig())
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_run_folder_flags(train)

    demo = sub.add_parser("demo", help="the minutes-long demo: 4 members on ARC-Easy, mean member vs ensemble",
                          description="Train 4 LoRA members of the default model (SmolLM2-135M; LoRA in its top 10 "
                                      "layers) for 3 epochs on 300 ARC-Easy training questions, each member with its "
                                      "own prompt and on its own bootstrap resample, and compare single members "
                                      "with the ensemble on the 570 validation questions after every epoch; then "
                                      "print the ensemble's "
                                      "gain over the mean member with paired-bootstrap 95% intervals. Any setting "
                                      "can be changed with the flags below.")
    add_config_flags(demo, RunConfig.from_dict(DEMO_DEFAULTS))
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_run_folder_flags(demo)

    ev = sub.add_parser("evaluate", help="score a saved run on any dataset and split",
                        description="Load a run folder's members and score them on a dataset split; writes "
                                    "predictions/<dataset>_<split>.safetensors and updates results.json.")
    ev.add_argument("run", metavar="RUN", help="run folder written by `loraens train` or `loraens demo`")
    ev.add_argument("--dataset", help="built-in dataset, mmlu:<subjects>, or a .jsonl/.csv file "
                                      "(default: the run's training dataset)")
    ev.add_argument("--split", default="validation", help="split to score (default: validation)")
    ev.add_argument("--limit", type=int, help="score a seeded random subset of this many questions (of every set)")
    ev.add_argument("--ood", nargs="+", default=[], metavar="D",
                    help="out-of-distribution datasets: report how well each uncertainty score separates "
                         "them from --dataset (AUROC, AUPR, FPR at 95%% TPR)")
    ev.add_argument("--ood_split", metavar="S", help="split of the --ood datasets (default: --split)")
    ev.add_argument("--method", default="ensemble", choices=("ensemble", "laplace"),
                    help="ensemble: the members as trained; laplace: each member's Laplace-LoRA predictive (K-FAC, "
                         "fit on the run's training questions first; recorded under <key>_laplace, where 'ensemble' "
                         "is ensemble + Laplace) (default: ensemble)")
    ev.add_argument("--device", default="auto", type=_device_flag,
                    help="where to load the model and members: auto (a GPU if there is one), cpu, cuda, cuda:N; "
                         "any device scores a run trained on any other (default: auto)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="HTML + Markdown report comparing one or more runs",
                         description="Compute every metric from the runs' prediction files, with bootstrap "
                                     "intervals, and write a self-contained HTML file and a Markdown summary "
                                     "with plots (reliability, selective prediction, OOD ROC, ensemble size).")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with predictions/)")
    rep.add_argument("--output", metavar="PATH", help="output path without suffix (default: <first run>/report)")
    rep.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    rep.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")

    sw = sub.add_parser(
        "sweep", help="run a grid of datasets x variants x seeds (resumable) and aggregate it",
        description="Train every cell of a sweep file (datasets x training variants x seeds) as a run folder, "
                    "derive the methods (single LoRA, ensemble, temperature scaling, checkpoint ensemble, "
                    "weight averaging, MC dropout, early stopping, Laplace-LoRA, ensemble + Laplace), score the "
                    "transfer / OOD sets a dataset names, and write summary.md/summary.html with the paper's "
                    "tables and figures (intervals over seeds and questions). Finished cells are skipped, so after "
                    "an interruption the same command resumes. Presets (the default model on 2 CPU cores, times "
                    "in EXPERIMENTS.md): paper-small (single vs ensemble vs Laplace vs the chosen diversity lever), "
                    "diversity-small (which diversity lever pays), ablations-small (regularisers and randomness); "
                    "paper (a 7B model, GPU). --gpus 0,1,2,3 runs one worker per GPU; --workers N runs N worker "
                    "processes on one machine.")
    sw.add_argument("sweep", metavar="SWEEP",
                    help="sweep YAML file, or a preset name: paper-small, diversity-small, ablations-small, paper")
    sw.add_argument("--output_dir", metavar="DIR",
                    help="where the cells and summary go (default: the file's output_dir)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and whether each is complete; train nothing")
    sw.add_argument("--report-only", action="store_true",
                    help="rebuild summary.md/html from the complete cells without training")
    sw.add_argument("--report-to", metavar="PATH",
                    help="write the summary as PATH.md / PATH.html / PATH_files/ (default: <output_dir>/summary)")
    sw.add_argument("--notes", metavar="FILE", help="Markdown file inserted at the top of the summary (e.g. a reading)")
    sw.add_argument("--gpus", metavar="LIST", type=_gpu_list,
                    help="spread the cells over one worker process per GPU, e.g. 0,1,2,3 (each worker sees only its "
                         "GPU through CUDA_VISIBLE_DEVICES)")
    sw.add_argument("--workers", metavar="W", type=int,
                    help="spread the cells over W worker processes that share the device setting (with --gpus: "
                         "must equal the number of GPUs)")
    sw.add_argument("--worker", metavar="I/W", type=_worker_flag, help=argparse.SUPPRESS)  # one worker's share
    sw.add_argument("--claims", metavar="DIR", help=argparse.SUPPRESS)  # the workers' shared claims folder
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_answer_verbs(sub)
    return parser


def _add_run_folder_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the interrupted run in RUN from its last checkpoint, with its config.yaml (the "
                             "same command again does this too, and says so); the result is the uninterrupted run's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output_dir holds (a complete, failed or interrupted run) and start over; "
                             "without it a complete run is never replaced")


# ---------------------------------------------------------------- calibrate | predict | serve


def _add_answer_verbs(sub: Any) -> None:
    """The verbs that answer new questions: calibrate (fit the decisions), predict (a file), serve (HTTP)."""
    from .calibration import DEFAULT_ALPHAS, DEFAULT_COVERAGES, DEFAULT_DELTA, DEFAULT_RISKS, DEFAULT_SCORE
    from .uncertainty import SCORE_NAMES

    cal = sub.add_parser(
        "calibrate", help="fit the decision rules (temperature, risk-controlled abstention, conformal sets)",
        description="Score a labelled split the members never trained on and store in RUN/calibration.json "
                    "what decisions need: the ensemble temperature; for each target risk r, the threshold on an "
                    "uncertainty score under which the error rate among answered questions is at most r with "
                    "probability 1 - delta (SGR, Geifman & El-Yaniv 2017); plain thresholds that answer the most "
                    "certain 80%% / 90%%; and split-conformal thresholds (LAC, APS) whose answer sets hold the right "
                    "answer with probability at least 1 - alpha.")
    cal.add_argument("run", metavar="RUN", help="run folder written by `loraens train` or `loraens demo`")
    cal.add_argument("--dataset", help="built-in dataset, mmlu:<subjects>, or a labelled .jsonl/.csv file "
                                       "(default: the run's training dataset)")
    cal.add_argument("--split", default="validation", help="labelled split to calibrate on (default: validation)")
    cal.add_argument("--limit", type=int, help="a seeded random subset of this many questions")
    cal.add_argument("--alpha", type=float, nargs="+", default=list(DEFAULT_ALPHAS), metavar="A",
                     help="miscoverages of the conformal sets (default: %(default)s)")
    cal.add_argument("--risk", type=float, nargs="+", default=list(DEFAULT_RISKS), metavar="R",
                     help="target error rates among answered questions (default: %(default)s)")
    cal.add_argument("--coverage", type=float, nargs="+", default=list(DEFAULT_COVERAGES), metavar="C",
                     help="plain coverage thresholds, no guarantee (default: %(default)s)")
    cal.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                     help="1 - delta is the confidence of the risk guarantee (default: %(default)s)")
    cal.add_argument("--score", default=DEFAULT_SCORE, choices=SCORE_NAMES, metavar="SCORE",
                     help=f"uncertainty score of the abstention rule: {', '.join(SCORE_NAMES)} (default: %(default)s)")
    cal.add_argument("--set", default="lac", choices=("lac", "aps"), help="default conformal set (default: lac)")
    cal.add_argument("--rescore", action="store_true",
                     help="score the split again even when predictions/<key>.safetensors already holds it")
    cal.add_argument("--device", default="auto", type=_device_flag, help="auto, cpu, cuda, cuda:N (default: auto)")
    cal.add_argument("--quiet", action="store_true", help="no progress bars")

    pr = sub.add_parser(
        "predict", help="answer unlabelled questions from a file: answer, probabilities, uncertainty, decision, set",
        description="Answer every question of a JSONL or CSV file (the formats `loraens train` reads; no answer "
                    "field needed). Each output line holds the id, the chosen answer, the ensemble's and every "
                    "member's probabilities, the uncertainty scores, and with a calibration.json the decision "
                    "(answer or abstain) and the conformal answer set.")
    pr.add_argument("run", metavar="RUN", help="run folder (calibrated with `loraens calibrate` for decisions)")
    pr.add_argument("--input", required=True, metavar="FILE", help="questions: .jsonl or .csv")
    pr.add_argument("--output", required=True, metavar="FILE", help="answers file, or - for standard output")
    pr.add_argument("--format", choices=("jsonl", "csv"),
                    help="output format (default: from the --output suffix, else jsonl)")
    pr.add_argument("--limit", type=int, help="answer only the first N questions")
    rule = pr.add_mutually_exclusive_group()
    rule.add_argument("--risk", type=float, help="decide at this calibrated target risk (default: calibration's)")
    rule.add_argument("--coverage", type=float, help="decide by a calibrated plain coverage instead (no guarantee)")
    pr.add_argument("--alpha", type=float, help="conformal sets at this calibrated alpha (default: calibration's)")
    pr.add_argument("--set", choices=("lac", "aps"), help="conformal set method (default: calibration's)")
    pr.add_argument("--batch_size", type=int, help="questions per forward pass (default: the run's eval batch size)")
    pr.add_argument("--device", default="auto", type=_device_flag, help="auto, cpu, cuda, cuda:N (default: auto)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")

    sv = sub.add_parser(
        "serve", help="serve the ensemble over HTTP (POST /predict, GET /health, a UI at /)",
        description="Load the run once and answer questions over HTTP: POST /predict with one question or many, "
                    "GET /health, and a one-page UI at /. Requests that arrive together are scored in one batch.")
    sv.add_argument("run", metavar="RUN", help="run folder (calibrated with `loraens calibrate` for decisions)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--max_batch", type=int, default=16, help="most questions scored in one batch (default: 16)")
    sv.add_argument("--batch_wait_ms", type=float, default=5.0,
                    help="how long a batch waits for more requests once one arrived (default: 5)")
    sv.add_argument("--device", default="auto", type=_device_flag, help="auto, cpu, cuda, cuda:N (default: auto)")
    sv.add_argument("--quiet", action="store_true", help="log warnings only")


def _calibrate(args: argparse.Namespace) -> int:
    from .answer import calibrate_run, describe_calibration

    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"RUN {args.run!r} is not a folder; give a run folder such as runs/demo.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of questions, but got {args.limit}.")
    cal, reused = calibrate_run(args.run, args.dataset, args.split, args.limit, alphas=args.alpha, risks=args.risk,
                                coverages=args.coverage, delta=args.delta, score=args.score, set_method=args.set,
                                device=args.device, progress=not args.quiet, rescore=args.rescore)
    if reused:
        print(f"(used the saved predictions of {cal.dataset} {cal.split}; --rescore scores them again)")
    print(describe_calibration(cal))
    print(f"\nWrote {Path(args.run) / 'calibration.json'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .answer import load_answerer, read_questions, write_answers
    from .calibration import NO_CALIBRATION, DecisionSettings

    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"RUN {args.run!r} is not a folder; give a run folder such as runs/demo.")
    questions = read_questions(args.input, args.limit)
    fmt = args.format or ("csv" if str(args.output).lower().endswith(".csv") else "jsonl")
    answerer = load_answerer(args.run, args.device, args.batch_size)
    settings = DecisionSettings(risk=args.risk, coverage=args.coverage, alpha=args.alpha, set_method=args.set)
    if answerer.calibration is None:
        if (args.risk, args.coverage, args.alpha, args.set) != (None,) * 4:
            raise ValueError(f"{NO_CALIBRATION}; --risk, --coverage, --alpha and --set need it.")
        print(f"loraens predict: {NO_CALIBRATION}.", file=sys.stderr)
    else:
        settings.resolve(answerer.calibration)  # an uncalibrated --risk / --alpha fails before any work
    counts = {"answer": 0, "abstain": 0}
    sizes: list[int] = []

    def tally(records):
        for rec in records:
            if rec["decision"] in counts:
                counts[rec["decision"]] += 1
            if rec["conformal_set"] is not None:
                sizes.append(len(rec["conformal_set"]))
            yield rec

    n = write_answers(tally(answerer.answer_all(questions, settings, progress=not args.quiet)), args.output, fmt)
    where = "standard output" if args.output == "-" else args.output
    line = f"Wrote {n} answers to {where}"
    if answerer.calibration is not None:
        rule, _, alpha, method = settings.resolve(answerer.calibration)
        what = (f"error rate <= {rule['target']:g} with probability >= {1 - rule['delta']:g}"
                if rule["kind"] == "risk" else f"the most certain {100 * rule['target']:g}%")
        line += (f": answered {counts['answer']}, abstained on {counts['abstain']} ({what}); "
                 f"{method.upper()} sets at alpha {alpha:g}, mean size {sum(sizes) / max(len(sizes), 1):.2f}")
    print(line, file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as err:
        raise ValueError(f"`loraens serve` needs FastAPI and uvicorn ({err}): pip install 'loraens[serve]'") from None
    from .answer import load_answerer

    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"RUN {args.run!r} is not a folder; give a run folder such as runs/demo.")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, but got {args.port}.")
    answerer = load_answerer(args.run, args.device, args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"loraens serve: binding {args.host}: the server has no authentication; anyone who can reach this "
              "address can use it.", file=sys.stderr)
    print(f"loraens serve: {answerer.num_members} members of {args.run} on http://{args.host}:{args.port}/ "
          f"({'calibrated' if answerer.calibration else 'not calibrated: no decisions or answer sets'})", flush=True)
    serve(answerer, args.host, args.port, args.max_batch, args.batch_wait_ms, "warning" if args.quiet else "info")
    return 0


def _device_flag(value: str) -> str:
    from .config import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, but got {value!r}")
    return value


def _gpu_list(value: str) -> list[str]:
    gpus = [g.strip() for g in value.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(
            f"must be distinct GPU indices separated by commas (e.g. 0,1), but got {value!r}")
    return gpus


def _worker_flag(value: str) -> tuple[int, int]:
    try:
        i, w = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be I/W (worker I of W), but got {value!r}") from None
    if not 0 <= i < w:
        raise argparse.ArgumentTypeError(f"worker index {i} is not in 0..{w - 1}")
    return i, w


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*GGUF.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "quiet", False):
        # --quiet also silences transformers' own bars (GGUF conversion, "Loading weights").
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        if args.command in ("train", "demo"):
            config = _train_config(args)
            return _train(config, progress=not args.quiet, demo=args.command == "demo",
                          resume=True if args.resume else (False if args.overwrite else None),
                          overwrite=args.overwrite)
        if args.command == "report":
            return _report(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command in ("calibrate", "predict", "serve"):
            return {"calibrate": _calibrate, "predict": _predict, "serve": _serve}[args.command](args)
        return _evaluate(args)
    except (ConfigError, FileNotFoundError, ValueError, ModelError, RuntimeError) as err:
        if (isinstance(err, RuntimeError) and not isinstance(err, (ModelError, NonFiniteError))
                and not _is_user_error(err)):
            raise
        rank, world = world_from_env()
        where = f" (process {rank} of {world})" if world > 1 else ""
        print(f"loraens {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = (" rerun the same command (or `loraens train --resume RUN`) to continue from the last checkpoint."
                if args.command in ("train", "demo") else "")
        if args.command == "sweep":
            kept = " finished cells are kept; rerun the same command to resume (only the interrupted cell is redone)."
        print(f"\nInterrupted;{kept}" if kept else "\nInterrupted.", file=sys.stderr)
        return 130
    finally:
        from .distributed import teardown

        teardown()  # leave torchrun's process group, if this command joined one


def _is_user_error(err: RuntimeError) -> bool:
    """RuntimeErrors that carry a message for the user, not a bug's traceback: a failed sweep
    worker, and running out of GPU memory (with what to change, added here)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        err.args = (f"{err.args[0].splitlines()[0] if err.args else 'out of memory'}\nThe GPU ran out of memory. Lower "
                    "--train.batch_size or --train.eval_batch_size, train the members a few at a time "
                    "(--train.member_chunk), or recompute activations (--train.gradient_checkpointing true).",)
        return True
    from .sweep import SweepWorkerError

    return isinstance(err, SweepWorkerError)


def prompts_note(config: RunConfig) -> str:
    """What prompts the members read, when they differ (--ensemble.member_prompts); "" when they share one."""
    read = [config.ensemble.member_prompt(k) for k in range(config.ensemble.num_members)]
    if len(set(read)) <= 1:
        return ""
    entries = list(config.ensemble.member_prompts or [])[: config.ensemble.num_members]
    shown = ", ".join(e if e in PROMPT_STYLES or e == "default" else repr(e) for e in entries)
    note = f"member k reads prompt k mod {len(entries)} of {shown} (--ensemble.member_prompts)"
    custom = any(getattr(config.prompt, f) != getattr(PromptConfig(), f)
                 for f in ("letter_template", "likelihood_template"))
    if custom and "default" in entries:
        note += ("; your --prompt templates are the 'default' entry, the other members read built-in styles: "
                 "pass --ensemble.member_prompts default to give every member yours")
    return note


def _train_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings: the defaults (the demo's), or with --resume RUN that run's config.yaml;
    then --config; then the flags."""
    if args.resume is None:
        return resolve_config(args, DEMO_DEFAULTS if args.command == "demo" else None)
    if args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over; give one of them.")
    run = Path(args.resume)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {args.resume}: {run / 'config.yaml'} does not exist, so there is no run "
                                "to resume there.")
    given = getattr(args, "output_dir", None)
    if given is not None and Path(given).resolve() != run.resolve():
        raise ConfigError(f"--resume {args.resume} continues the run in that folder; --output_dir {given} names "
                          "another. Drop --output_dir.")
    config = resolve_config(args, with_saved_defaults(read_yaml(run / "config.yaml")))
    config.output_dir = str(run)
    return config


def _train(config: RunConfig, progress: bool, demo: bool, resume: bool | None = None, overwrite: bool = False) -> int:
    from .bootstrap import ensemble_gain
    from .predictions import load_predictions
    from .run import train_run
    from .tables import format_comparison, format_epochs, format_gain, format_table

    m = config.ensemble
    main = world_from_env()[0] == 0  # under torchrun, rank 0 speaks for the run
    if main:
        print(f"loraens: {m.num_members} members (rank {m.rank}, on {','.join(m.target_modules)}) of "
              f"{config.model.name} on {config.data.dataset} -> {config.output_dir}", flush=True)
        note = prompts_note(config)
        if note:
            print(f"loraens: {note}", flush=True)
    result = train_run(config, progress=progress, resume=resume, overwrite=overwrite)
    if not main:
        return 0
    for key, metrics in result.results.items():
        print()
        print(format_table(metrics, title=f"{key}: every member, mean member, ensemble"))
        if demo:
            print()
            print(format_comparison(metrics, title=f"{key}: mean member vs ensemble"))
            preds = load_predictions(result.run_dir, key)
            print()
            print(format_gain(key, ensemble_gain(preds.member_probs, preds.targets, DEMO_RESAMPLES),
                              len(preds.ids), DEMO_RESAMPLES))
    if demo:
        print()
        print(format_epochs(result.run_dir / "metrics.jsonl"))
    print(f"\nRun folder: {result.run_dir} (config.yaml, members/, metrics.jsonl, predictions/, results.json)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import build_report
    from .runfolder import check_complete

    for run in args.runs:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"RUN {run!r} is not a folder; give run folders such as runs/demo.")
        check_complete(run, "report")  # an unfinished or mixed run is refused, before any figure is drawn
    if args.resamples < 10:
        raise ValueError(f"--resamples must be at least 10, but got {args.resamples}.")
    output = Path(args.output) if args.output else Path(args.runs[0]) / "report"
    if output.suffix in (".html", ".md"):
        output = output.with_suffix("")
    html_path, md_path = build_report(args.runs, output, n_resamples=args.resamples, seed=args.seed)
    print(f"Wrote {html_path} and {md_path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import (
        OutdatedCellsError,
        cells,
        check_outdated,
        collect,
        completeness,
        load_sweep,
        run_sweep,
        run_sweep_workers,
        write_summary,
    )

    spec = load_sweep(args.sweep, args.output_dir)
    if args.dry_run:
        grid = cells(spec)
        for i, cell in enumerate(grid, 1):
            state = {"complete": "complete", "outdated": "outdated"}.get(
                completeness(cell, spec.mc_dropout_passes, spec.resamples), "to run  ")
            print(f"[{i}/{len(grid)}] {state}  {cell.title}  -> {cell.folder}")
        try:
            check_outdated(spec)
        except OutdatedCellsError as err:
            print(f"\n{err}")
        return 0
    notes = ""
    if args.notes:
        if not Path(args.notes).is_file():
            raise FileNotFoundError(f"--notes {args.notes!r} does not exist.")
        notes = Path(args.notes).read_text()
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, but got {args.workers}.")
    if args.gpus and args.workers is not None and args.workers != len(args.gpus):
        raise ValueError(f"--workers {args.workers} does not match --gpus {','.join(args.gpus)} "
                         f"({len(args.gpus)} GPUs: one worker per GPU); drop --workers.")
    if args.worker is not None:  # one worker, started by --gpus / --workers
        if not args.claims:
            raise ValueError("--worker I/W is internal to --workers / --gpus and needs --claims DIR; "
                             "use --workers W instead.")
        run_sweep(spec, progress=not args.quiet, log=log, worker=args.worker, claims=args.claims)
        return 0
    if not args.report_only and (args.gpus or (args.workers or 1) > 1):
        run_sweep_workers(spec, args.gpus or [None] * args.workers, log=log)
    elif not args.report_only:  # run_sweep also writes <output_dir>/summary.md/html
        run_sweep(spec, progress=not args.quiet, log=log)
    if args.report_only or args.report_to or notes:
        html_path, md_path = write_summary(spec, collect(spec), args.report_to, notes)
        print(f"Wrote {md_path} and {html_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .run import evaluate_run
    from .tables import format_ood, format_table

    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"RUN {args.run!r} is not a folder; give a run folder such as runs/demo.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of questions, but got {args.limit}.")
    out = evaluate_run(args.run, args.dataset, args.split, args.limit, args.ood, args.ood_split,
                       progress=not args.quiet, device=args.device, method=args.method)
    if not out:  # a torchrun rank other than 0: rank 0 prints
        return 0
    print(format_table(out["metrics"], title=f"{out['key']}: every member, mean member, ensemble"))
    if out.get("kept"):
        print(f"(the training run scored these same questions; its recorded figures for {out['key']} are kept)")
    if out["ood"]:
        print()
        print(format_ood(out["key"], out["ood"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
