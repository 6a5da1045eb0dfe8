"""Configuration: YAML round trip, validation errors that name the flag, CLI flag resolution."""

from __future__ import annotations

import pytest

from loraens.cli import build_parser, resolve_config
from loraens.config import ConfigError, DType, RunConfig, Scoring


def test_defaults_round_trip_through_yaml(tmp_path):
    config = RunConfig()
    config.save(tmp_path / "c.yaml")
    again = RunConfig.load(tmp_path / "c.yaml")
    assert again == config
    assert again.prompt.scoring is Scoring.CHOICE_LIKELIHOOD
    assert again.model.dtype is DType.BFLOAT16


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        RunConfig.from_dict({"train": {"learning_rate": 1e-3}})


@pytest.mark.parametrize(
    ("raw", "flag", "value"),
    [
        ({"train": {"lr": -1.0}}, "--train.lr", "-1.0"),
        ({"ensemble": {"num_members": 0}}, "--ensemble.num_members", "0"),
        ({"train": {"batch_size": 6, "grad_accum": 4}}, "--train.grad_accum", "4"),
        ({"prompt": {"scoring": "letters"}}, "--prompt.scoring", "'letters'"),
        ({"ensemble": {"dropout": 1.5}}, "--ensemble.dropout", "1.5"),
        ({"train": {"epochs": "two"}}, "--train.epochs", "'two'"),
        ({"train": {"member_chunk": 0}}, "--train.member_chunk", "0"),
        ({"train": {"member_chunk": 2, "compile": True}}, "--train.compile", "2"),
    ],
)
def test_errors_name_flag_and_value(raw, flag, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    assert flag in str(err.value) and value in str(err.value)


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.01\n  epochs: 3\nensemble:\n  num_members: 2\n")
    args = build_parser().parse_args(
        ["train", "--config", str(tmp_path / "c.yaml"), "--train.epochs", "5",
         "--ensemble.target_modules", "q_proj,k_proj,v_proj", "--train.max_steps", "none"]
    )
    config = resolve_config(args)
    assert config.train.lr == 0.01  # from YAML
    assert config.train.epochs == 5  # flag wins over YAML
    assert config.ensemble.num_members == 2
    assert config.ensemble.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert config.train.max_steps is None
    assert config.train.batch_size == RunConfig().train.batch_size  # default untouched


def test_demo_defaults_apply_and_can_be_overridden():
    args = build_parser().parse_args(["demo", "--ensemble.num_members", "2"])
    from loraens.cli import DEMO_DEFAULTS

    config = resolve_config(args, DEMO_DEFAULTS)
    assert config.ensemble.num_members == 2
    assert config.data.dataset == "arc_easy"
    assert config.output_dir == "runs/demo"


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.yaml")


def test_demo_config_file_overrides_only_the_keys_it_sets(tmp_path):
    from loraens.cli import DEMO_DEFAULTS

    (tmp_path / "c.yaml").write_text("ensemble:\n  rank: 4\n")
    config = resolve_config(build_parser().parse_args(["demo", "--config", str(tmp_path / "c.yaml")]), DEMO_DEFAULTS)
    assert config.ensemble.rank == 4
    assert config.train.epochs == DEMO_DEFAULTS["train"]["epochs"]  # not reset to the library default
    assert config.data.train_limit == DEMO_DEFAULTS["data"]["train_limit"]


def test_invalid_yaml_and_empty_eval_splits_are_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--data.eval_splits"):
        RunConfig.from_dict({"data": {"eval_splits": []}})


def test_flags_do_not_change_the_demo_defaults():
    """A demo run with flags must leave DEMO_DEFAULTS as they were (a second run in the same process
    would otherwise start from the first one's flags)."""
    import copy

    from loraens.cli import DEMO_DEFAULTS

    before = copy.deepcopy(DEMO_DEFAULTS)
    config = resolve_config(build_parser().parse_args(["demo", "--data.train_limit", "7", "--train.epochs", "1"]),
                            DEMO_DEFAULTS)
    assert config.data.train_limit == 7 and config.train.epochs == 1
    assert DEMO_DEFAULTS == before
