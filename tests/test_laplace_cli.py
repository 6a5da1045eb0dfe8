"""`loraens evaluate RUN --method laplace`: each member's Laplace-LoRA predictive from a run folder,
recorded under its own key, equal to fitting `loraens.laplace` by hand on the run's members."""

from __future__ import annotations

import json

import torch

from loraens.cli import main
from loraens.data import load_examples
from loraens.laplace import fit_laplace
from loraens.predictions import load_predictions
from loraens.run import load_run


def test_evaluate_laplace_records_its_own_key(tiny_setup, tmp_path, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(["train", "--model.name", str(model_dir), "--model.dtype", "float32", "--data.data_dir", str(mirror),
                 "--ensemble.num_members", "2", "--ensemble.rank", "2", "--train.epochs", "1",
                 "--train.batch_size", "4", "--train.lr", "0.02", "--output_dir", str(run), "--quiet"]) == 0
    before = json.loads((run / "results.json").read_text())["splits"]["arc_easy_validation"]
    assert main(["evaluate", str(run), "--method", "laplace", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "arc_easy_validation_laplace" in out
    results = json.loads((run / "results.json").read_text())
    assert results["splits"]["arc_easy_validation"] == before  # the trained figures stay as they were
    lap = results["splits"]["arc_easy_validation_laplace"]
    assert results["laplace"]["fit_questions"] == 12 and len(results["laplace"]["prior_precision"]) == 2
    got = load_predictions(run, "arc_easy_validation_laplace")
    # The same posterior fitted by hand on the run's members gives the same predictive.
    ens = load_run(run)
    data = ens.config.data
    post = fit_laplace(ens.model, ens.scorer, ens.encoder.encode_all(load_examples(data, "train", None)),
                       batch_size=ens.config.train.eval_batch_size, progress=False)
    val = load_examples(data, "validation", None)
    want = post.predict(ens.model, ens.scorer, ens.encoder.encode_all(val), [e.id for e in val],
                        batch_size=ens.config.train.eval_batch_size, progress=False)
    torch.testing.assert_close(got.member_probs, want.member_probs, atol=1e-5, rtol=1e-5)
    # The Laplace predictive is not the MAP's: it is a different, softer distribution.
    map_probs = load_predictions(run, "arc_easy_validation").member_probs
    assert (got.member_probs - map_probs).abs().max() > 1e-4
    assert lap["ensemble"]["nll"] > 0


def test_evaluate_rejects_an_unknown_method(tmp_path, capsys):
    try:
        main(["evaluate", str(tmp_path), "--method", "swag"])
    except SystemExit as done:
        assert done.code == 2
    assert "invalid choice: 'swag'" in capsys.readouterr().err
