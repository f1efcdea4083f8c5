"""``bench schedules --config FILE --grid ...``: sweeps on any config (bench/sweep.py)."""

import csv
import json
import os

import jax
import pytest
from jax._src import compilation_cache

from nl_jax.__main__ import main as cli_main
from nl_jax.bench import sweep
from nl_jax.errors import ConfigError
from nl_jax.train import loop

TINY = ["--config", "experiments/transformer/tiny.py", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
        "--config.data.seq_len=32", "--config.data.batch_size=8",
        "--config.train.eval_batches=1"]


def test_parse_grid_splits_top_level_semicolons():
    assert sweep.parse_grid('model.cms.periods=(32,"never");(16,64,"x;y")') == (
        "model.cms.periods", ['(32,"never")', '(16,64,"x;y")'])
    assert sweep.parse_grid("levels.default.every=1; 4") == ("levels.default.every",
                                                              ["1", "4"])
    for bad, message in [("train.seed", "expected KEY=V1;V2"), ("train.seed=1;;2", "empty"),
                         ("train.seed=1;1", "listed twice")]:
        with pytest.raises(ConfigError, match=message):
            sweep.parse_grid(bad)


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache for this test only: the points of one seed
    reuse the other seed's programs (the test's cost is compilation)."""
    keys = {"jax_compilation_cache_dir": str(tmp_path / "jax_cache"),
            "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": -1}
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_sweep_writes_results_and_resumes_without_retraining(tmp_path, capsys,
                                                              compile_cache):
    out = tmp_path / "sweep"
    calls = []

    def counting_train(config, workdir):
        calls.append(workdir)
        return loop.train(config, workdir)

    argv = TINY + ["--grid", "train.seed=0;1", "--grid", "levels.default.every=1;2",
                   "--steps", "2", "--out", str(out)]
    assert sweep.main(argv, train_fn=counting_train) == 0
    assert len(calls) == 4
    printed = capsys.readouterr().out
    assert "[4/4] 003-seed=1_every=2 ... done: eval_loss" in printed
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train.seed"], r["levels.default.every"]) for r in rows] == [
        ("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    data = json.loads((out / "sweep.json").read_text())
    assert data["sweep"]["tokens_per_point"] == 2 * 8 * 32
    points = data["points"]
    assert [p["grid"] for p in points][1] == {"train.seed": "0", "levels.default.every": "2"}
    for p in points:
        assert p["status"] == "done" and p["curve"]["step"] == [1, 2]
        assert p["eval_loss"] > 0 and p["tokens_per_s"] > 0 and p["num_params"] > 0
        assert p["step_memory_bytes"] > 0 and "peak_bytes" in p
        assert p["config"]["model"]["d_model"] == 32 and p["config"]["train"]["steps"] == 2
    assert points[3]["config"]["train"]["seed"] == 1
    assert points[3]["config"]["levels"]["default"]["every"] == 2
    for png in ("sweep_loss_curves.png", "sweep_loss_vs_speed.png"):
        assert (out / png).stat().st_size > 1000

    # "killed" after its last step but before its end-of-run outputs: only that point
    # runs again (train finishes it from its checkpoint), the others are re-read.
    dirs = sorted((out / "points").iterdir())
    assert len(dirs) == 4
    mtimes = {d.name: os.stat(d / "metrics.jsonl").st_mtime_ns for d in dirs}
    (dirs[2] / "final_metrics.json").unlink()
    calls.clear()
    assert sweep.main(argv, train_fn=counting_train) == 0
    assert calls == [str(dirs[2])]
    printed = capsys.readouterr().out
    assert printed.count("(done before)") == 3
    for d in (dirs[0], dirs[1], dirs[3]):
        assert os.stat(d / "metrics.jsonl").st_mtime_ns == mtimes[d.name]
    again = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["eval_loss"] for p in again] == pytest.approx([p["eval_loss"] for p in points])

    # a finished point is never reused for another config
    with pytest.raises(ConfigError, match="trained with another config"):
        sweep.main(argv + ["--config.train.grad_clip_norm=0.5"], train_fn=counting_train)


@pytest.mark.parametrize("extra, message", [
    (["--grid", "model.d_modle=32;64"], "--grid model.d_modle: unknown config key"),
    (["--grid", "levels.default.every=1;abc"], "value 'abc': expected an integer"),
    (["--grid", "train.seed=0;1", "--grid", "train.seed=2"], "lists train.seed twice"),
])
def test_bad_grid_is_one_error_line(tmp_path, capsys, extra, message):
    out = tmp_path / "sweep"
    assert cli_main(["bench", "schedules"] + TINY + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench schedules: ") and message in err
    assert err.count("\n") == 1 and not out.exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert cli_main(["bench", "schedules"] + TINY + ["--grid", "train.seed=0;1",
                                                     "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench schedules: --out ") and "is a file" in err
