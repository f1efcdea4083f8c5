"""A workdir's results survive re-runs, kills and failing commands; eval and
generate read a checkpoint without its training data; mistakes exit 2 with one
line and leave nothing behind."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from nl_jax.__main__ import main

TINY = "experiments/transformer/tiny.py"


def tiny_flags(tmp, steps=3, train_files=None):
    flags = ["--config", TINY, f"--config.train.steps={steps}", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.train.eval_batches=1",
             "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
             "--config.data.seq_len=32", "--config.data.batch_size=8",
             f"--config.data.cache_dir={tmp / 'cache'}", "--config.model.d_model=32",
             "--config.model.n_layers=1", "--config.model.n_heads=2",
             "--config.model.d_ff=64",
             "--config.levels.default.optimizer.schedule.warmup_steps=1"]
    if train_files:
        flags.append(f"--config.data.train_files=('{train_files}',)")
    return flags


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(workdir):
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = f.read()
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run whose training text is a copy that the tests then delete."""
    tmp = tmp_path_factory.mktemp("safety")
    corpus = tmp / "corpus.txt"
    shutil.copy("nl_jax/data/assets/corpus/train/pg11_alice_in_wonderland.txt", corpus)
    workdir = str(tmp / "run")
    assert main(["train", *tiny_flags(tmp, train_files=corpus), "--workdir", workdir]) == 0
    return tmp, workdir, corpus


def test_rerunning_a_finished_run_changes_nothing(trained, capsys):
    tmp, workdir, corpus = trained
    before = snapshot(workdir)
    code, out, _ = run(capsys, "train", *tiny_flags(tmp, train_files=corpus),
                       "--workdir", workdir)
    assert code == 0 and "nothing to do" in out and "step 3" in out
    code, out, _ = run(capsys, "train", *tiny_flags(tmp, steps=2, train_files=corpus),
                       "--workdir", workdir)
    assert code == 0 and "nothing to do" in out
    assert snapshot(workdir) == before


def test_eval_and_generate_need_no_training_data(trained, capsys, tmp_path):
    _, workdir, corpus = trained
    moved = tmp_path / "elsewhere.txt"
    shutil.move(corpus, moved)
    try:
        code, out, err = run(capsys, "eval", "--workdir", workdir, "--batches", "1")
        assert code == 0, err
        result = json.loads(out)
        assert result["step"] == 3 and result["tokens"] == 8 * 32
        # another context length and batch size: a read, not a resume
        code, out, err = run(capsys, "eval", "--workdir", workdir, "--batches", "1",
                             "--config.data.seq_len=16", "--config.data.batch_size=16")
        assert code == 0, err
        assert json.loads(out)["tokens"] == 16 * 16
        code, out, err = run(capsys, "generate", "--workdir", workdir, "--prompt", "",
                             "--tokens", "3")
        assert code == 0, err
        assert "<|endoftext|>" not in out
    finally:
        shutil.move(moved, corpus)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--batches", "0"], "--batches must be a positive integer"),
    (["eval", "--config.train.eval_batches=0"], "pass --batches N"),
    (["generate", "--tokens", "0"], "--tokens must be a positive integer"),
    (["generate", "--temperature", "-1"], "--temperature must be >= 0"),
])
def test_bad_eval_and_generate_flags_keep_results(trained, capsys, argv, needle):
    _, workdir, _ = trained
    before = snapshot(workdir)
    code, _, err = run(capsys, *argv, "--workdir", workdir)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert snapshot(workdir) == before


def test_eval_fits_a_mesh_larger_than_this_machine(trained, capsys, tmp_path):
    _, workdir, _ = trained
    copy = tmp_path / "pod_run"
    shutil.copytree(workdir, copy)
    with open(copy / "config.json") as f:
        config = json.load(f)
    config["mesh"] = {"data": 4, "fsdp": 16, "tensor": 2}      # a 128-chip run
    with open(copy / "config.json", "w") as f:
        json.dump(config, f)
    code, out, err = run(capsys, "eval", "--workdir", str(copy), "--batches", "1")
    assert code == 0, err
    assert "does not fit" in err and json.loads(out)["step"] == 3


def test_resume_after_a_kill_logs_each_step_once(capsys, tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", *tiny_flags(tmp_path, steps=2), "--workdir", str(workdir)]) == 0
    # A killed run logged steps past its last checkpoint (2), the last line torn.
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "split": "train", "loss": 1.0}) + "\n")
        f.write('{"step": 4, "spl')
    capsys.readouterr()
    code, out, _ = run(capsys, "train", *tiny_flags(tmp_path, steps=4), "--workdir",
                       str(workdir))
    assert code == 0
    assert ("resuming from step 2 (train.steps 2 -> 4: the learning-rate schedule of "
            "level(s) default now spans 4 steps)") in out
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] != 1.0 for r in records)


def test_unreadable_checkpoint_is_a_clear_error(trained, capsys, tmp_path):
    tmp, workdir, corpus = trained
    copy = tmp_path / "broken"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "3" / "state")
    for argv in (["eval", "--workdir", str(copy), "--batches", "1"],
                 ["train", *tiny_flags(tmp, steps=5, train_files=corpus),
                  "--workdir", str(copy)]):
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert "no checkpoint in" in err and "verifies" in err
        assert "checkpoint step 3" in err and "state/_METADATA missing" in err
        assert "Traceback" not in err and err.count("\n") == 1
    # No good checkpoint to fall back to: nothing is moved, nothing starts afresh.
    assert os.listdir(copy / "checkpoints") == ["3"]
    assert not (copy / "damaged_checkpoints").exists()


def write_config(tmp_path, body):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("make_argv, needle", [
    (lambda t: ["--config.sharding.rules=(('batch', ('dta', 'fsdp')),)"],
     "names mesh axis 'dta', which is not an axis of config.mesh"),
    (lambda t: ["--config.sharding.rules=foo"], "each rule is a pair"),
    (lambda t: ["--config", write_config(t, "def get_config(:\n")], "syntax error"),
    (lambda t: ["--config", f"{TINY}:big"], "takes no argument"),
    (lambda t: ["--config", write_config(
        t, "from experiments.transformer import tiny\n"
           "def get_config(size):\n    return tiny.get_config()\n")],
     "takes an argument: use --config"),
])
def test_config_mistakes_exit_2_and_leave_no_workdir(capsys, tmp_path, make_argv, needle):
    workdir = tmp_path / "w"
    code, _, err = run(capsys, "train", "--config", TINY, *make_argv(tmp_path),
                       "--workdir", str(workdir))
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not workdir.exists()


def test_workdir_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "afile"
    path.write_text("keep me")
    code, _, err = run(capsys, "train", *tiny_flags(tmp_path), "--workdir", str(path))
    assert code == 2 and "is a file" in err
    assert path.read_text() == "keep me"


def test_eval_of_a_missing_workdir_creates_nothing(capsys, tmp_path):
    workdir = tmp_path / "nothing"
    code, _, err = run(capsys, "eval", "--config", TINY, "--workdir", str(workdir))
    assert code == 2 and "does not exist" in err
    assert not workdir.exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: python -m nl_jax {command}")


def test_eval_reads_the_weights_alone(trained, capsys):
    """eval and generate restore step and params, never the optimizer state: another
    optimizer (here a level with every=2, whose state holds an accumulator) reads
    the same weights and gives the same loss."""
    from nl_jax.train.loop import Trainer
    _, workdir, _ = trained
    code, out, err = run(capsys, "eval", "--workdir", workdir, "--batches", "1")
    assert code == 0, err
    loss = json.loads(out)["loss"]
    code, out, err = run(capsys, "eval", "--workdir", workdir, "--batches", "1",
                         "--config.levels.default.every=2")
    assert code == 0, err
    assert json.loads(out)["loss"] == loss
    with open(os.path.join(workdir, "config.json")) as f:
        import ml_collections
        config = ml_collections.ConfigDict(json.load(f))
    trainer = Trainer(config, workdir, write_metrics=False, purpose="generate")
    assert trainer.maybe_restore() == 3
    assert set(trainer.state) == {"step", "params"}
    full = Trainer(config, workdir, write_metrics=False)     # a resume reads it all
    assert full.maybe_restore() == 3
    for a, b in zip(jax.tree.leaves(trainer.state["params"]),
                    jax.tree.leaves(full.state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full.checkpointer.close()


def test_eval_with_another_model_is_refused(trained, capsys):
    _, workdir, _ = trained
    code, _, err = run(capsys, "eval", "--workdir", workdir, "--batches", "1",
                       "--config.model.d_model=48")
    assert code == 2 and "cannot eval" in err
    assert "model.d_model (checkpoint: 32, now: 48)" in err and "new --workdir" not in err


def test_only_schedules_that_span_the_run_are_said_to_stretch():
    import ml_collections

    from nl_jax.train.loop import _levels_spanning_the_run
    levels = ml_collections.ConfigDict(dict(
        a=dict(params="x", every=1, optimizer=dict(name="adamw", schedule=dict(
            name="warmup_cosine", warmup_steps=3))),
        b=dict(params="y", every=2, optimizer=dict(name="sgd", schedule=dict(
            name="constant"))),
        c=dict(params="z", every="never", optimizer=dict(name="adamw", schedule=dict(
            name="warmup_linear"))),
        d=dict(params="w", every=1, optimizer=dict(name="sgd")),
        e=dict(params="v", every=4, optimizer=dict(name="sgd", schedule=dict(
            name="warmup_linear")))))
    assert _levels_spanning_the_run(levels) == ["a", "e"]
