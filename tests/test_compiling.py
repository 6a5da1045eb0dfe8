"""`--train.compile`: compiled decoder layers give the eager model's scores and gradients."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from loraens.batching import collate
from loraens.config import (
    CompileMode,
    ConfigError,
    EnsembleConfig,
    RunConfig,
    Scoring,
    TrainConfig,
)
from loraens.ensemble import attach_members, first_lora_layer, member_layers
from loraens.fast.compiling import (
    compile_decision,
    compile_decoder_layers,
    cpp_compiler,
    layers_to_compile,
)
from loraens.fast.prefix import prefix_cache_for
from loraens.predict import predict
from loraens.train import planned_steps
from tests.conftest import scorer


def scores_and_grads(model, batch, letter_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Member log-probs [M, N, C] and the gradient of their sum w.r.t. every member's A, flattened."""
    lp = scorer(Scoring.LETTER, letter_ids).log_probs(model, batch, 2)
    layers = list(member_layers(model).values())
    grads = torch.autograd.grad(lp[torch.isfinite(lp)].sum(), [layer.lora_A for layer in layers])
    return lp.detach(), torch.cat([g.flatten() for g in grads])


def test_compiled_layers_match_eager_scores_and_gradients(make_base, letter_encoder, questions, randomize_B):
    cfg = EnsembleConfig(num_members=2, rank=4, alpha=8.0, seed=0)
    enc = letter_encoder.encode_all(questions[:4])
    models = []
    for _ in range(2):
        model = make_base()
        randomize_B(attach_members(model, cfg), std=0.2)
        models.append(model.train())
    eager, compiled = models
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    # Two batches of different lengths: the dynamic graph serves both.
    for qs in (enc[:2], enc[1:4]):
        batch = collate(qs, num_choices=5).repeat_members(2)
        lp_e, g_e = scores_and_grads(eager, batch, letter_encoder.letter_ids)
        lp_c, g_c = scores_and_grads(compiled, batch, letter_encoder.letter_ids)
        finite = torch.isfinite(lp_e)
        assert torch.equal(finite, torch.isfinite(lp_c))
        torch.testing.assert_close(lp_c[finite], lp_e[finite], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-3)
    # The module is still the same model: its state dict (members included) is unchanged in keys.
    assert set(compiled.state_dict()) == set(eager.state_dict())

    # Evaluation runs the compiled layers eagerly: no new graph, the eager model's probabilities.
    ids = [str(i) for i in range(len(enc))]
    graphs = counters["stats"]["unique_graphs"]
    want = predict(eager, enc, ids, 2, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False).member_probs
    got = predict(compiled, enc, ids, 2, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False).member_probs
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The eager stance ends with predict, also when it raises (no letter ids: the head has no rows).
    assert torch._dynamo.eval_frame._stance.stance == "default"
    with pytest.raises(IndexError):
        predict(compiled, enc, ids, 2, scorer(Scoring.LETTER), progress=False)
    assert torch._dynamo.eval_frame._stance.stance == "default"
    # ... unless asked to run them compiled, which traces the no_grad forward anew.
    got = predict(compiled, enc, ids, 2, scorer(Scoring.LETTER, letter_encoder.letter_ids), progress=False,
                  compiled=True).member_probs
    assert counters["stats"]["unique_graphs"] > graphs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_with_a_frozen_prefix_only_the_trained_layers_are_compiled(make_base):
    model = make_base()
    attach_members(model, EnsembleConfig(num_members=2, rank=4, alpha=8.0, seed=0, top_layers=1))
    cache = prefix_cache_for(model, first_lora_layer(model))
    bottom, top = model.model.layers
    assert layers_to_compile(model, cache) == (1, 2)
    assert layers_to_compile(model, None) is None  # no prefix cache: every layer compiles
    assert compile_decoder_layers(model, cache) == 1
    assert bottom._compiled_call_impl is None and top._compiled_call_impl is not None


def test_compile_needs_decoder_layers():
    with pytest.raises(ValueError, match="--train.compile"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- --train.compile auto


def _train(**kw) -> TrainConfig:
    return TrainConfig(**kw)


@pytest.mark.parametrize(("kw", "steps", "members", "expected"), [
    ({"batch_size": 8}, 125, 5, True),  # auto: 125 x 5 x 8 = 5000 member-questions, where it pays back
    ({"batch_size": 8}, 124, 5, False),  # 4960: compilation would not pay back
    ({"batch_size": 2}, 250, 2, False),  # many steps, but small ones: 1000
    ({"member_chunk": 2}, 10_000, 5, False),  # auto never combines compilation with member chunks
    ({"gradient_checkpointing": True}, 10_000, 5, False),  # ... or with checkpointing
    ({"compile": "true"}, 1, 1, True),  # explicit: obeyed whatever the length
    ({"compile": "false"}, 10_000, 5, False),
])
def test_compile_decision(monkeypatch, kw, steps, members, expected):
    monkeypatch.setattr("loraens.fast.compiling.cpp_compiler", lambda: "g++")
    use, note = compile_decision(_train(**kw), steps, members)
    assert use is expected
    assert bool(note) is use  # a note whenever the layers are compiled, silence otherwise
    if use and "compile" not in kw:
        assert f"{steps * members * kw['batch_size']:,} member-questions" in note


def test_compile_decision_counts_only_the_compiled_share_of_layers(monkeypatch):
    monkeypatch.setattr("loraens.fast.compiling.cpp_compiler", lambda: "g++")
    # 5,000 member-questions pay back at full depth, but 8 of 30 compiled layers save 8/30 as much.
    assert compile_decision(_train(batch_size=8), 125, 5, (8, 30)) == (False, "")
    use, note = compile_decision(_train(batch_size=8), 469, 5, (8, 30))  # 18,760 x 8/30 = 5,002
    assert use and "x 8/30 compiled layers = 5,002 member-questions" in note
    assert not compile_decision(_train(batch_size=8), 468, 5, (8, 30))[0]  # 4,992


def test_compile_auto_without_a_compiler_runs_eagerly_and_says_how_to_fix(monkeypatch):
    monkeypatch.setattr("loraens.fast.compiling.cpp_compiler", lambda: None)
    use, note = compile_decision(_train(batch_size=8), 600, 5)
    assert not use
    assert "600 steps" in note and "g++" in note and "--train.compile false" in note
    assert compile_decision(_train(), 10, 5) == (False, "")  # short run: nothing to say


def test_compile_auto_stays_eager_on_a_gpu_and_says_so(monkeypatch):
    monkeypatch.setattr("loraens.fast.compiling.cpp_compiler", lambda: "g++")
    use, note = compile_decision(_train(batch_size=8), 600, 5, device_type="cuda")
    assert not use and "on cuda the layers run eagerly" in note and "--train.compile true" in note
    assert compile_decision(_train(batch_size=8, compile="true"), 600, 5, device_type="cuda")[0]  # forced
    assert compile_decision(_train(batch_size=8), 600, 5, device_type="cpu")[0]  # the same run on a CPU


def test_cpp_compiler_prefers_cxx(monkeypatch, tmp_path):
    fake = tmp_path / "my-cxx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert cpp_compiler() == str(fake)


@pytest.mark.parametrize(("raw", "mode"), [(True, CompileMode.TRUE), (False, CompileMode.FALSE),
                                           ("auto", CompileMode.AUTO), (None, CompileMode.AUTO)])
def test_compile_flag_reads_yaml_booleans(raw, mode):
    """Old run folders say `compile: true/false`; they load as the matching mode, and the default is auto."""
    config = RunConfig.from_dict({"train": {} if raw is None else {"compile": raw}})
    assert config.train.compile is mode
    assert RunConfig.from_dict(config.to_dict()).train.compile is mode  # round trip through the run folder


def test_compile_flag_rejects_other_values():
    with pytest.raises(ConfigError, match="--train.compile.*auto, true, false"):
        RunConfig.from_dict({"train": {"compile": "sometimes"}})


def test_planned_steps():
    assert planned_steps(17, _train(batch_size=8, epochs=3)) == 9  # ceil(17 / 8) = 3 per epoch
    assert planned_steps(17, _train(batch_size=8, epochs=3, max_steps=4)) == 4


@pytest.mark.parametrize(("mode", "suppressed"), [("auto", True), ("true", False)])
def test_auto_compiled_run_falls_back_to_eager_only_inside_the_run(tiny_setup, tmp_path, monkeypatch, mode,
                                                                    suppressed):
    """Under `auto`, dynamo's eager fallback on compiler errors is on while the run trains and
    evaluates, and back off afterwards; an explicit `true` keeps errors loud."""
    import torch._dynamo

    from loraens import run as run_mod

    model_dir, mirror = tiny_setup
    seen: dict[str, object] = {}
    real_train_members = run_mod.train_members

    def recording_train_members(*args, **kwargs):
        seen["during"] = torch._dynamo.config.suppress_errors
        return real_train_members(*args, **kwargs)

    monkeypatch.setattr(run_mod, "compile_decision",
                        lambda train, steps, members, layers=None, device_type="cpu": (True, "compiling"))
    monkeypatch.setattr(run_mod, "compile_decoder_layers", lambda model, cache: seen.setdefault("compiled", True))
    monkeypatch.setattr(run_mod, "train_members", recording_train_members)
    before = torch._dynamo.config.suppress_errors
    config = RunConfig.from_dict({"output_dir": str(tmp_path / "run"),
                                  "model": {"name": str(model_dir), "dtype": "float32"},
                                  "data": {"data_dir": str(mirror), "eval_splits": ["validation"]},
                                  "ensemble": {"num_members": 2, "rank": 2},
                                  "train": {"epochs": 1, "batch_size": 4, "compile": mode}})
    run_mod.train_run(config, progress=False)
    assert seen == {"compiled": True, "during": suppressed}
    assert torch._dynamo.config.suppress_errors is before
