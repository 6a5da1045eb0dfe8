"""Per-member prompts (`--ensemble.member_prompts`, loraens.member_prompts): member k reads every
question through prompt k mod P, in training, prediction, the KL reference and the Laplace fit and
predictive, and nothing else changes.

Each path is checked against a reference that shares none of the routing: the same member scored
(or trained, or fit) with its own prompt's plain encoding, as if every member read that prompt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loraens.batching import collate
from loraens.config import PROMPT_STYLES, ConfigError, EnsembleConfig, PromptConfig, RunConfig, Scoring, TrainConfig
from loraens.ensemble import attach_members, lora_parameters
from loraens.laplace import fit_laplace
from loraens.member_prompts import MemberEncoder, MemberQuestions, join_questions, member_batch
from loraens.predict import predict
from loraens.prompts import PromptEncoder
from loraens.train import base_log_probs, train_members
from tests.conftest import make_questions, randomize_lora_B, scorer

PROMPTS = ["default", "quiz"]


def ens_config(m: int = 3, **kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": m, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0,
                             "member_prompts": PROMPTS, **kw})


def prompt_encoder(tokenizer, scoring: Scoring, entry: str) -> PromptEncoder:
    """The plain encoder of one prompt: the reference each member is checked against."""
    return PromptEncoder(tokenizer, PromptConfig(scoring=scoring).for_member(entry))


# ---------------------------------------------------------------- settings


def test_styles_and_templates_become_the_prompt_of_their_scoring_mode():
    likelihood = PromptConfig()
    assert likelihood.for_member("default") is likelihood
    assert likelihood.for_member("quiz").likelihood_template == PROMPT_STYLES["quiz"][0]
    assert likelihood.for_member("quiz").continuation_template == likelihood.continuation_template
    assert likelihood.for_member("Q. {question}\nA.").likelihood_template == "Q. {question}\nA."
    letter = PromptConfig(scoring=Scoring.LETTER)
    assert letter.for_member("exam").letter_template == PROMPT_STYLES["exam"][1]
    assert letter.for_member("{question}\n{choices}\nAnswer:").letter_template == "{question}\n{choices}\nAnswer:"
    cfg = RunConfig.from_dict({"ensemble": {"member_prompts": "default,plain,exam,quiz"}})
    assert cfg.ensemble.member_prompts == ["default", "plain", "exam", "quiz"]
    assert RunConfig.from_dict(cfg.to_dict()).ensemble == cfg.ensemble  # round-trips through YAML


@pytest.mark.parametrize("raw, message", [
    ({"ensemble": {"member_prompts": "default,chatty"}}, "'chatty' is neither"),
    ({"ensemble": {"member_prompts": []}}, "at least one prompt"),
    ({"ensemble": {"member_prompts": ["{question} {choices}"]}}, "used as --prompt.likelihood_template"),
    ({"prompt": {"scoring": "letter"}, "ensemble": {"member_prompts": ["{question} Answer:"]}},
     "used as --prompt.letter_template"),
])
def test_bad_member_prompts_name_the_flag_and_the_entry(raw, message):
    with pytest.raises(ConfigError, match="--ensemble.member_prompts") as err:
        RunConfig.from_dict(raw)
    assert message in str(err.value)


# ---------------------------------------------------------------- encoding and batching


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_member_k_reads_prompt_k_mod_p(tokenizer, scoring):
    examples = make_questions(5)
    enc = MemberEncoder(tokenizer, PromptConfig(scoring=scoring), ens_config(), range(3))
    qs = enc.encode_all(examples)
    assert isinstance(qs, MemberQuestions) and qs.prompt_of == (0, 1, 0) and len(qs) == 5
    ref = [prompt_encoder(tokenizer, scoring, e).encode_all(examples) for e in PROMPTS]
    assert ref[0] != ref[1]  # the two prompts really differ
    for j, p in enumerate((0, 1, 0)):
        assert qs.member(j) == ref[p]
    # As a sequence, item i is its longest encoding (for batching by length), same choices and answer.
    for i in range(5):
        assert qs[i].num_tokens == max(r[i].num_tokens for r in ref)
        assert qs[i].answer == examples[i].answer and qs[i].num_choices == len(examples[i].choices)
    # A torchrun process holding members 1..2 gets their prompts (global k mod P), and only those encoded.
    shard = MemberEncoder(tokenizer, PromptConfig(scoring=scoring), ens_config(), range(1, 3)).encode_all(examples)
    assert isinstance(shard, MemberQuestions)
    assert shard.member(0) == ref[1] and shard.member(1) == ref[0]
    # One member of a per-member ensemble, or no member_prompts: a plain list.
    alone = MemberEncoder(tokenizer, PromptConfig(scoring=scoring), ens_config(), range(1, 2)).encode_all(examples)
    assert alone == ref[1]
    none = MemberEncoder(tokenizer, PromptConfig(scoring=scoring), ens_config(member_prompts=None), range(3))
    assert none.encode_all(examples) == ref[0]


def test_member_batch_gives_each_member_its_own_rows(tokenizer):
    examples = make_questions(6)
    qs = MemberEncoder(tokenizer, PromptConfig(), ens_config(), range(3)).encode_all(examples)
    assert isinstance(qs, MemberQuestions)
    idx = [4, 1, 2]
    batch = member_batch(qs, idx, range(3), num_choices=5)
    assert batch.num_rows == 9
    for j in range(3):  # rows j*3 .. j*3+2 are member j's prompt, padded to the batch's width
        own = collate([qs.member(j)[i] for i in idx], num_choices=5)
        t = own.input_ids.shape[1]
        torch.testing.assert_close(batch.input_ids[j * 3: j * 3 + 3, :t], own.input_ids)
        assert (batch.input_ids[j * 3: j * 3 + 3, t:] == 0).all()
    # Training's [m, b] indices: member j's row j.
    rows = np.array([[0, 1], [2, 3], [4, 5]])
    batch = member_batch(qs, rows, range(3))
    assert torch.equal(batch.targets, torch.tensor([examples[i].answer for i in rows.reshape(-1)]))
    with pytest.raises(ValueError, match="3 index rows for 2 members"):
        member_batch(qs, rows, range(2))


def test_join_questions_keeps_every_members_prompt(tokenizer):
    enc = MemberEncoder(tokenizer, PromptConfig(), ens_config(), range(3))
    examples = make_questions(4)
    whole = enc.encode_all(examples)
    joined = join_questions([enc.encode_all([e]) for e in examples])
    assert joined == whole
    plain = MemberEncoder(tokenizer, PromptConfig(), ens_config(member_prompts=None), range(3))
    assert join_questions([plain.encode_all([e]) for e in examples]) == plain.encode_all(examples)
    with pytest.raises(ValueError, match="per-member and shared"):
        join_questions([whole, plain.encode_all(examples)])


# ---------------------------------------------------------------- the model paths


def _members(make_base, m: int = 3):
    model = make_base()
    layers = attach_members(model, ens_config(m))
    randomize_lora_B(layers, std=0.3, seed=1)
    return model


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_predict_scores_each_member_under_its_own_prompt(make_base, tokenizer, scoring):
    model = _members(make_base)
    examples = make_questions(7)
    enc = MemberEncoder(tokenizer, PromptConfig(scoring=scoring), ens_config(), range(3))
    sc = scorer(scoring, enc.letter_ids)
    ids = [e.id for e in examples]
    got = predict(model, enc.encode_all(examples), ids, 3, sc, batch_size=3, progress=False)
    for p, entry in enumerate(PROMPTS):  # every member under prompt p; keep the members that read it
        ref = predict(model, prompt_encoder(tokenizer, scoring, entry).encode_all(examples), ids, 3, sc,
                      batch_size=3, progress=False)
        for j in (0, 2) if p == 0 else (1,):
            torch.testing.assert_close(got.member_probs[:, j], ref.member_probs[:, j], atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got.member_probs[:, 0], predict(
        model, prompt_encoder(tokenizer, scoring, "quiz").encode_all(examples), ids, 3, sc,
        progress=False).member_probs[:, 0], atol=1e-4)  # member 0 really reads the default prompt
    with pytest.raises(ValueError, match="encoded for 3 members"):
        predict(model, enc.encode_all(examples), ids, 1, sc, progress=False)


def test_training_gives_each_member_its_own_prompts_questions(make_base, tokenizer):
    """Member k of a per-member-prompt ensemble ends at the weights of member k trained alone (the
    torchrun shard path, first_member=k) on its prompt's plain encoding; with the KL regulariser, whose
    reference is then the base under that prompt."""
    examples = make_questions(8)
    cfg = ens_config()
    enc = MemberEncoder(tokenizer, PromptConfig(scoring=Scoring.LETTER), cfg, range(3))
    sc = scorer(Scoring.LETTER, enc.letter_ids)
    train = TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.25, batch_size=4, bucket_window=1, kl_coef=0.5)
    model = _members(make_base)
    start = [p.detach().clone() for p in lora_parameters(model)]
    train_members(model, enc.encode_all(examples), train, cfg, sc, progress=False)
    for k in range(3):
        one = make_base()
        single = ens_config(1, member_prompts=None)
        attach_members(one, single, first_member=k)
        with torch.no_grad():
            for p, s in zip(lora_parameters(one), start):
                p.copy_(s[k: k + 1])
        own = prompt_encoder(tokenizer, Scoring.LETTER, PROMPTS[k % 2]).encode_all(examples)
        train_members(one, own, train, single, sc, progress=False, first_member=k)
        for p, q in zip(lora_parameters(model), lora_parameters(one)):
            torch.testing.assert_close(p[k].detach(), q[0].detach(), atol=2e-5, rtol=1e-4)


def test_the_kl_reference_is_the_base_under_each_members_prompt(make_base, tokenizer):
    model = _members(make_base)
    examples = make_questions(5)
    enc = MemberEncoder(tokenizer, PromptConfig(), ens_config(), range(3))
    sc = scorer(Scoring.CHOICE_LIKELIHOOD)
    ref = base_log_probs(model, enc.encode_all(examples), sc, progress=False)  # [M, N, C]
    assert ref.shape[:2] == (3, 5)
    for k in range(3):
        alone = base_log_probs(model, prompt_encoder(tokenizer, Scoring.CHOICE_LIKELIHOOD, PROMPTS[k % 2])
                               .encode_all(examples), sc, progress=False)
        torch.testing.assert_close(ref[k], alone)


def test_laplace_fits_and_predicts_each_member_under_its_own_prompt(make_base, tokenizer):
    model = _members(make_base)
    examples = make_questions(6)
    enc = MemberEncoder(tokenizer, PromptConfig(), ens_config(), range(3))
    sc = scorer(Scoring.CHOICE_LIKELIHOOD)
    qs = enc.encode_all(examples)
    post = fit_laplace(model, sc, qs, batch_size=4, progress=False)
    ids = [e.id for e in examples]
    lap = post.predict(model, sc, qs, ids, progress=False)
    for p, entry in enumerate(PROMPTS):
        plain = prompt_encoder(tokenizer, Scoring.CHOICE_LIKELIHOOD, entry).encode_all(examples)
        ref = fit_laplace(model, sc, plain, batch_size=4, progress=False)
        ref_lap = ref.predict(model, sc, plain, ids, progress=False)
        for j in (0, 2) if p == 0 else (1,):
            for name in post.blocks:
                for a, b in zip(post.factors(name), ref.factors(name)):
                    torch.testing.assert_close(a[j], b[j], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(post.log_likelihood[j], ref.log_likelihood[j])
            torch.testing.assert_close(lap.member_probs[:, j], ref_lap.member_probs[:, j], atol=2e-5, rtol=1e-4)
    # Questions encoded for another number of members are refused, not read with the wrong prompts.
    with pytest.raises(ValueError, match="encoded for 2 members' prompts, but the model holds 3"):
        fit_laplace(model, sc, qs.select(range(2)), progress=False)
    with pytest.raises(ValueError, match="encoded for 2 members' prompts"):
        post.predict(model, sc, qs.select(range(2)), ids, progress=False)
    # One member at a time (member_chunk=1) routes the prompts the same way.
    apart = fit_laplace(model, sc, qs, batch_size=4, member_chunk=1, progress=False)
    for name in post.blocks:
        for a, b in zip(post.factors(name), apart.factors(name)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- a run, end to end


def test_a_run_with_member_prompts_answers_alike_offline_and_in_server_batches(tmp_path, _tiny_llama, tokenizer):
    """`loraens train --ensemble.member_prompts default,quiz`, loaded back: the answers are the same
    whether the questions are encoded together (offline) or one by one and joined (the server's
    batches), and member 1 really answers under the quiz prompt."""
    from loraens.answer import load_answerer
    from tests.tiny_run import make_tiny_run

    tiny = make_tiny_run(tmp_path, _tiny_llama, tokenizer, calibrate=False,
                         extra=("--ensemble.member_prompts", "default,quiz"))
    answerer = load_answerer(tiny.run)
    ens = answerer.ensemble
    assert ens.config.ensemble.member_prompts == ["default", "quiz"]
    results = json.loads((tiny.run / "results.json").read_text())
    assert results["member_prompts"] == ["default", "quiz", "default"]  # what each member read
    examples = make_questions(6, seed=11)
    offline = answerer.score(examples)
    joined = answerer.score(examples, encoded=join_questions([ens.encoder.encode_all([e]) for e in examples]))
    torch.testing.assert_close(offline.member_probs, joined.member_probs)
    ids = [e.id for e in examples]
    for entry, j in (("default", 0), ("quiz", 1), ("default", 2)):
        plain = prompt_encoder(tokenizer, ens.config.prompt.scoring, entry).encode_all(examples)
        ref = predict(ens.model, plain, ids, 3, ens.scorer, progress=False)
        torch.testing.assert_close(offline.member_probs[:, j], ref.member_probs[:, j], atol=2e-6, rtol=1e-5)


def test_training_batches_sort_each_member_by_its_own_rows(make_base, tokenizer, monkeypatch):
    """With length bucketing on, member k's batches follow its own prompt's lengths: the same as when
    member k trains alone (the torchrun shard path) on its prompt's plain encoding."""
    import loraens.train as train_mod

    examples = make_questions(16)
    # The second prompt repeats the question: its row lengths rank the questions in another order.
    cfg = ens_config(m=2, member_prompts=["default", "{question}\n{question}\nAnswer:"])
    enc = MemberEncoder(tokenizer, PromptConfig(), cfg, range(2))
    seen: list[np.ndarray] = []
    real = train_mod.train_step

    def spy(model, questions, chunk, *a):
        seen.append(chunk.copy())
        return real(model, questions, chunk, *a)

    monkeypatch.setattr(train_mod, "train_step", spy)
    train = TrainConfig(epochs=1, lr=1e-3, batch_size=2, bucket_window=2)
    sc = scorer(Scoring.CHOICE_LIKELIHOOD)
    model = make_base()
    attach_members(model, cfg)
    train_members(model, enc.encode_all(examples), train, cfg, sc, progress=False)
    together = np.stack(seen)  # [steps, M, b]
    for k in range(2):
        seen.clear()
        one = make_base()
        single = ens_config(1, member_prompts=None)
        attach_members(one, single, first_member=k)
        own = prompt_encoder(tokenizer, Scoring.CHOICE_LIKELIHOOD, cfg.member_prompts[k]).encode_all(examples)
        train_members(one, own, train, single, sc, progress=False, first_member=k)
        assert np.array_equal(np.stack(seen)[:, 0], together[:, k]), k


def test_the_default_gives_each_member_its_own_prompt_but_saved_runs_keep_theirs(tmp_path):
    """Per-member prompts are the default for new runs; a config saved before the setting existed
    (no member_prompts key) reloads with one prompt, as it was trained, and `--ensemble.member_prompts
    default` turns the lever off."""
    import yaml

    from loraens.cli import prompts_note
    from loraens.config import DEFAULT_MEMBER_PROMPTS, with_saved_defaults

    assert RunConfig().ensemble.member_prompts == list(DEFAULT_MEMBER_PROMPTS)
    assert "member k reads prompt k mod 4 of default, plain, exam, quiz" in prompts_note(RunConfig())
    old = RunConfig().to_dict()
    del old["ensemble"]["member_prompts"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert RunConfig.load_saved(path).ensemble.member_prompts is None
    assert RunConfig.load(path).ensemble.member_prompts == list(DEFAULT_MEMBER_PROMPTS)  # a user's config file
    assert with_saved_defaults({})["ensemble"] == {"member_prompts": None}
    kept = with_saved_defaults({"ensemble": {"member_prompts": ["quiz"]}})
    assert kept["ensemble"]["member_prompts"] == ["quiz"]
    off = RunConfig.from_dict({"ensemble": {"member_prompts": "default"}})
    assert prompts_note(off) == ""
    custom = RunConfig.from_dict({"prompt": {"likelihood_template": "Q {question} A"}})
    assert "pass --ensemble.member_prompts default to give every member yours" in prompts_note(custom)


def test_old_sweep_cells_without_the_setting_stay_complete(tmp_path):
    """A sweep cell recorded before member_prompts existed is still complete for a base that sets
    member_prompts: null (one prompt, as it was trained), and not for one that leaves the default."""
    import json

    from loraens.sweep import (
        DatasetSpec,
        OutdatedCellsError,
        SweepSpec,
        VariantSpec,
        cells,
        check_outdated,
        completeness,
        is_complete,
        run_sweep,
    )

    def cell_for(base: dict):
        spec = SweepSpec("s", str(tmp_path / "out"), [DatasetSpec("arc_easy")],
                         [VariantSpec("plain", group="base")], seeds=[0], base=base)
        return cells(spec)[0]

    null_base = cell_for({"ensemble": {"member_prompts": None}})
    record = null_base.config.to_dict()
    del record["ensemble"]["member_prompts"]  # as a cell written before the setting existed
    null_base.folder.mkdir(parents=True)
    (null_base.folder / "cell.json").write_text(json.dumps({
        "status": "complete", "methods_requested": null_base.variant.methods, "ood_requested": [],
        "resamples_requested": 200, "config": record}))
    assert is_complete(null_base)
    # A sweep file that leaves the default now means four prompts: that cell is not complete, and
    # running the sweep would retrain and replace it, so the sweep refuses and says what to add.
    default_base = cell_for({})
    assert not is_complete(default_base) and completeness(default_base) == "outdated"
    spec = SweepSpec("s", str(tmp_path / "out"), [DatasetSpec("arc_easy")], [VariantSpec("plain", group="base")],
                     seeds=[0])
    with pytest.raises(OutdatedCellsError, match=r"add ensemble: \{member_prompts: null\} to the sweep's base"):
        check_outdated(spec)
    with pytest.raises(OutdatedCellsError):
        run_sweep(spec, progress=False, log=lambda line: None)
    assert (null_base.folder / "cell.json").is_file()  # nothing was touched
    kept = SweepSpec("s", str(tmp_path / "out"), [DatasetSpec("arc_easy")], [VariantSpec("plain", group="base")],
                     seeds=[0], base={"ensemble": {"member_prompts": None}})
    check_outdated(kept)  # with the old setting in its base, the sweep runs (and finds the cell complete)
