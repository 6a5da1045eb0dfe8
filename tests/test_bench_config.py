"""bench/config.py: the flags of bench/bench.py keep their names and defaults, and each has a help text."""

from bench.config import BenchConfig, parse_config, parser


def test_flags_keep_their_names_and_defaults():
    cfg = parse_config([])
    assert cfg == BenchConfig()
    assert (cfg.members, cfg.sweep, cfg.batch_size, cfg.mfu_batches, cfg.warmup, cfg.reps) == (5, [1, 2, 4, 8], 8,
                                                                                                 [8], 1, 3)
    assert (cfg.modes, cfg.eval_questions, cfg.eval_batch_size, cfg.eval_reps) == ("letter,choice-likelihood", 32,
                                                                                    16, 3)
    assert (cfg.memory_members, cfg.memory_rows, cfg.memory_modes, cfg.memory_lean) == ([1, 5, 16], 20, "letter",
                                                                                         (16, 4))
    assert (cfg.dataset, cfg.data_dir, cfg.eval_split, cfg.train_pool, cfg.threads) == ("arc_easy", None,
                                                                                         "validation", 256, None)
    assert (cfg.baseline_attn, cfg.prefix_fraction, cfg.compile_steps) == ("eager", 0.25, 4)
    assert (cfg.quality_mode, cfg.quality_train, cfg.quality_eval, cfg.quality_epochs, cfg.quality_lr,
            cfg.quality_members, cfg.quality_peft) == ("choice-likelihood", 0, 200, 2, 1e-3, 4, False)
    assert cfg.out.endswith("BENCHMARKS.md") and not cfg.quick
    options = {a.dest: a.option_strings for a in parser("")._actions if a.dest != "help"}
    assert options == {name: ["--" + name.replace("_", "-")] for name in BenchConfig.__dataclass_fields__}
    assert all(a.help for a in parser("")._actions)  # --help explains every flag


def test_flags_parse_lists_and_m_x_b():
    cfg = parse_config(["--sweep", "", "--mfu-batches", "8,16", "--memory-lean", "8X2", "--data-dir", "/d",
                        "--quality-peft"])
    assert (cfg.sweep, cfg.mfu_batches, cfg.memory_lean, cfg.data_dir, cfg.quality_peft) == ([], [8, 16], (8, 2),
                                                                                             "/d", True)
    assert parse_config(["--memory-lean", ""]).memory_lean is None
    assert BenchConfig().sweep is not BenchConfig().sweep  # no list shared between configurations


def test_quick_drops_the_sweep_the_large_batches_and_m16():
    cfg = parse_config(["--quick", "--eval-questions", "64"])
    assert (cfg.sweep, cfg.mfu_batches, cfg.eval_questions, cfg.memory_members, cfg.memory_lean) == ([], [], 16,
                                                                                                      [1, 5], None)
    assert parse_config(["--quick", "--eval-questions", "4"]).eval_questions == 4
