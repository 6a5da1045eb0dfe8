"""`loraens sweep --workers W` / `--gpus LIST`: the cells spread over worker processes, each with
its own CUDA_VISIBLE_DEVICES, then one summary; the same cells as one process would run."""

from __future__ import annotations

import sys

import pytest

import loraens.sweep as sweep_mod
from loraens.cli import main
from loraens.sweep import cells, is_complete, load_sweep
from tests.test_sweep import write_sweep


def test_workers_share_the_cells_and_one_summary_follows(tmp_path, tiny_setup, monkeypatch, capsys):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror, seeds=[0, 1])
    spec = load_sweep(path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["sweep", path, "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    grid = cells(spec)
    assert all(is_complete(c, spec.mc_dropout_passes) for c in grid)
    for i, cell in enumerate(grid, 1):  # exactly one worker ran cell i, and said so
        said = [w for w in (0, 1) if f"[worker {w}] [{i}/{len(grid)}] {cell.title}: done" in out]
        assert len(said) == 1, (i, said)
    assert (tmp_path / "sweep" / "summary.md").is_file()
    assert not list((tmp_path / "sweep").glob(".claims-*"))  # the claims folder is removed
    # A rerun finds every cell complete and trains nothing.
    assert main(["sweep", path, "--workers", "2", "--quiet"]) == 0
    assert "done in" not in capsys.readouterr().out


def test_gpu_workers_see_only_their_gpu(tmp_path, monkeypatch):
    """--gpus 3,5: worker i runs with CUDA_VISIBLE_DEVICES = the i-th entry (checked on the
    launched commands, without GPUs)."""
    launched = []

    class FakeProc:
        def __init__(self, cmd, env, **kw):
            launched.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))
            self.stdout = iter(())

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    spec = sweep_mod.SweepSpec("s", str(tmp_path / "out"), [sweep_mod.DatasetSpec("arc_easy")],
                               [sweep_mod.VariantSpec("v", group="base")])
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(sweep_mod, "collect", lambda spec: [{}])
    monkeypatch.setattr(sweep_mod, "write_summary", lambda spec, records: ("s.html", "s.md"))
    sweep_mod.run_sweep_workers(spec, ["3", "5"], log=lambda line: None)
    assert [env for _, env in launched] == ["3", "5"]
    assert [cmd[cmd.index("--worker") + 1] for cmd, _ in launched] == ["0/2", "1/2"]
    claims = {cmd[cmd.index("--claims") + 1] for cmd, _ in launched}
    assert len(claims) == 1 and claims.pop().startswith(str(tmp_path / "out" / ".claims-"))
    assert all(cmd[:4] == [sys.executable, "-m", "loraens", "sweep"] for cmd, _ in launched)


def test_a_failing_worker_is_named_and_the_others_finish(tmp_path, monkeypatch):
    class FakeProc:
        def __init__(self, cmd, env, **kw):
            self.code = 1 if cmd[cmd.index("--worker") + 1] == "1/2" else 0
            self.stdout = iter(["oops\n"] if self.code else ())

        def wait(self, timeout=None):
            return self.code

        def poll(self):
            return self.code

    spec = sweep_mod.SweepSpec("s", str(tmp_path / "out"), [sweep_mod.DatasetSpec("arc_easy")],
                               [sweep_mod.VariantSpec("v", group="base")])
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", FakeProc)
    lines = []
    with pytest.raises(RuntimeError, match=r"worker\(s\) 1 \(exit code 1\) failed"):
        sweep_mod.run_sweep_workers(spec, [None, None], log=lines.append)
    assert "[worker 1] oops" in lines


def test_an_interrupted_launch_stops_its_workers_and_drops_its_claims(tmp_path, monkeypatch):
    """Ctrl-C while the workers run: each still-running worker is terminated (its finished cells stay
    on disk) and the launch's claims folder is removed, so the next launch can take every cell."""
    stopped = []

    class FakeProc:
        def __init__(self, cmd, env, **kw):
            self.stdout = iter(())
            self.running = True

        def wait(self, timeout=None):
            if timeout is None and self.running:
                raise KeyboardInterrupt
            return -15

        def poll(self):
            return None if self.running else -15

        def terminate(self):
            self.running = False
            stopped.append(self)

    spec = sweep_mod.SweepSpec("s", str(tmp_path / "out"), [sweep_mod.DatasetSpec("arc_easy")],
                               [sweep_mod.VariantSpec("v", group="base")])
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", FakeProc)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.run_sweep_workers(spec, [None, None], log=lambda line: None)
    assert len(stopped) == 2
    assert not list((tmp_path / "out").glob(".claims-*"))


def test_workers_take_the_incomplete_cells_as_they_free_up(tmp_path, monkeypatch):
    """With claims, a resumed sweep whose missing cells all sit at odd grid positions is still
    shared: a worker takes any cell not yet claimed (round robin over the grid gave one worker all)."""
    spec = sweep_mod.SweepSpec("s", str(tmp_path / "out"), [sweep_mod.DatasetSpec("arc_easy")],
                               [sweep_mod.VariantSpec(f"v{k}", group="base") for k in range(4)])
    grid = cells(spec)
    missing = {2, 4}  # cell numbers (1-based) that a previous run left incomplete
    monkeypatch.setattr(sweep_mod, "is_complete",
                        lambda cell, *a: grid.index(cell) + 1 not in missing and cell not in ran)
    ran: list = []
    monkeypatch.setattr(sweep_mod, "run_cell", lambda cell, *a: ran.append(cell))
    claims = tmp_path / "claims"
    claims.mkdir()
    # Worker 0 claims the first missing cell; worker 1 then finds it claimed and takes the other one.
    sweep_mod.run_sweep(spec, progress=False, log=lambda line: None, worker=(0, 2), claims=claims)
    assert ran == [grid[1], grid[3]]  # alone, worker 0 takes both: nothing is left unclaimed
    ran.clear()
    for f in claims.iterdir():
        f.unlink()
    (claims / "2").touch()  # worker 1 holds cell 2
    sweep_mod.run_sweep(spec, progress=False, log=lambda line: None, worker=(0, 2), claims=claims)
    assert ran == [grid[3]]
    with pytest.raises(ValueError, match="go together"):
        sweep_mod.run_sweep(spec, progress=False, log=lambda line: None, worker=(0, 2))


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--gpus", "0,1", "--workers", "3"], "does not match --gpus 0,1"),
])
def test_worker_flag_errors(tmp_path, tiny_setup, capsys, flags, message):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror)
    assert main(["sweep", path, *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_gpu_list_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "paper-small", "--gpus", "0,x"])
    assert "distinct GPU indices" in capsys.readouterr().err
