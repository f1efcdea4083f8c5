"""Training end to end: resume is exact, outputs exist, bad resume is refused."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import base
from nl_jax.__main__ import main
from nl_jax.train import step as step_lib
from nl_jax.train.loop import Trainer, train

STEPS = 6


def tiny_config(tmp_path, steps):
    c = base.get_config()
    c.train.steps = steps
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.checkpoint_every = 0
    c.train.sample_tokens = 4
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.cache_dir = str(tmp_path / "cache")
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.levels.default.optimizer.schedule.warmup_steps = 2
    return c


def restored(config, workdir):
    trainer = Trainer(config, workdir, devices=jax.devices()[:1], write_metrics=False)
    assert trainer.state is None      # no random state allocated before the restore
    assert trainer.maybe_restore() == config.train.steps
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    one = str(tmp / "one")
    two = str(tmp / "two")
    devices = jax.devices()[:1]
    final = train(tiny_config(tmp, STEPS), one, devices=devices)
    train(tiny_config(tmp, STEPS // 2), two, devices=devices)
    final_two = train(tiny_config(tmp, STEPS), two, devices=devices)  # resumes at STEPS // 2
    return tmp, one, two, (final, final_two)


def test_resume_is_bitwise_exact(runs):
    tmp, one, two, _ = runs
    a, b = restored(tiny_config(tmp, STEPS), one), restored(tiny_config(tmp, STEPS), two)
    assert int(a.state["step"]) == int(b.state["step"]) == STEPS
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    nxt_a, nxt_b = next(a.data), next(b.data)
    for k in ("inputs", "targets"):
        np.testing.assert_array_equal(nxt_a[k], nxt_b[k])
    # A fresh iterator would give a different batch: the data state really restored.
    fresh = Trainer(tiny_config(tmp, STEPS), str(tmp / "fresh"), devices=jax.devices()[:1],
                    write_metrics=False)
    assert not np.array_equal(next(fresh.data)["inputs"], nxt_a["inputs"])


def test_workdir_outputs(runs):
    _, one, _, (final, final_two) = runs
    assert os.path.isdir(os.path.join(one, "checkpoints", str(STEPS)))
    with open(os.path.join(one, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))
    assert {"loss", "perplexity", "tokens_per_s", "step_ms", "grad_norm", "lr"} <= set(records[0])
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(one, "tensorboard")))
    assert os.path.getsize(os.path.join(one, "loss_curve.png")) > 1000
    assert np.isfinite(final["eval_loss"]) and final["train_loss_last"] < final["train_loss_first"]
    assert isinstance(final["sample"], str) and final["sample"].startswith("The")
    # the resumed run reports the run's first loss (step 1), not its invocation's
    assert final_two["train_loss_first"] == final["train_loss_first"]
    assert final_two["train_loss_last"] == final["train_loss_last"]


def test_resume_with_incompatible_config_is_refused(runs, capsys):
    tmp, one, _, _ = runs
    code = main(["train", "--config", "experiments/transformer/tiny.py", "--workdir", one,
                 "--config.train.steps=6", "--config.data.seq_len=32",
                 "--config.data.batch_size=8", f"--config.data.cache_dir={tmp / 'cache'}",
                 "--config.model.d_model=48", "--config.model.n_layers=1",
                 "--config.model.n_heads=2", "--config.model.d_ff=64",
                 "--config.levels.default.optimizer.schedule.warmup_steps=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot resume from" in err and "model.d_model (checkpoint: 32, now: 48)" in err
    assert "Traceback" not in err


def test_resume_may_change_learning_rate_clipping_and_remat_only(runs, capsys):
    """A lower learning rate, another clip norm (once a different optimizer-state
    tree) and remat are accepted on resume and reported; an optimizer hyperparameter
    held in the optimizer state (b1) is refused."""
    import shutil

    tmp, one, _, _ = runs
    work = str(tmp / "changed")
    shutil.copytree(one, work)
    c = tiny_config(tmp, STEPS + 2)
    c.levels.default.optimizer.learning_rate /= 3
    c.levels.default.optimizer.schedule.warmup_steps = 1
    c.train.grad_clip_norm = 0.0 if base.get_config().train.grad_clip_norm else 1.0
    c.model.remat = True
    result = train(c, work, devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert result["step"] == STEPS + 2 and np.isfinite(result["train_loss_last"])
    assert f"resuming from step {STEPS}" in out
    assert "with changed settings: " in out and "levels.default.optimizer.learning_rate" in out
    assert "model.remat (checkpoint: False, now: True)" in out
    assert "train.grad_clip_norm (checkpoint: " in out
    c = tiny_config(tmp, STEPS + 4)
    c.levels.default.optimizer.b1 = 0.5
    with pytest.raises(Exception, match=r"levels\.default\.optimizer\.b1"):
        train(c, work, devices=jax.devices()[:1])


def test_eval_and_checkpoint_time_is_not_step_time(tmp_path, monkeypatch):
    """A slow evaluation and a slow save at every step do not show in step_ms."""
    import time

    from nl_jax.train import loop

    def slow(real):
        def wrapped(*args, **kwargs):
            time.sleep(0.4)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(loop.Trainer, "evaluate", slow(loop.Trainer.evaluate))
    monkeypatch.setattr(loop.Trainer, "save", slow(loop.Trainer.save))
    c = tiny_config(tmp_path, 5)
    c.train.eval_every = 1
    c.train.checkpoint_every = 1
    c.train.sample_tokens = 0
    workdir = str(tmp_path / "w")
    train(c, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    step_ms = [r["step_ms"] for r in records if r["split"] == "train"][1:]  # 1st: compile
    assert len(step_ms) == 4 and max(step_ms) < 400, step_ms
    assert sum(r["split"] == "eval" for r in records) >= 4


def test_a_checkpoint_without_the_clip_step_state_still_restores(runs, tmp_path):
    """Checkpoints written before the optimizer always began with the stateless clip
    step (grad_clip_norm = 0 then gave the levels' state alone) restore bitwise."""
    from nl_jax.train.checkpoint import Checkpointer

    tmp, one, _, _ = runs
    config = tiny_config(tmp, STEPS)
    current = restored(config, one)
    legacy_dir = str(tmp_path / "legacy")
    writer = Checkpointer(legacy_dir, 2, config.to_dict())
    writer.save(STEPS, dict(current.state, opt_state=current.state["opt_state"][1]),
                current.data.get_state(), force=True)
    writer.close()
    again = restored(config, legacy_dir)
    for a, b in zip(jax.tree.leaves(current.state), jax.tree.leaves(again.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(again.state) == jax.tree.structure(current.state)


def nan_from_step_3(make_train_step, metric: str, poison_params: bool = False):
    """``make_train_step`` whose steps 3, 4, ... report ``metric`` as NaN (and with
    ``poison_params`` also write NaN parameters)."""
    import jax.numpy as jnp

    def make(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def wrapped(state, batch):
            new_state, metrics = step(state, batch)
            bad = state["step"] >= 2
            if poison_params:
                new_state["params"] = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p),
                                                   new_state["params"])
            metrics[metric] = jnp.where(bad, jnp.nan, metrics[metric])
            return new_state, metrics
        return wrapped
    return make


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from nl_jax.train import loop

    monkeypatch.setattr(step_lib, "make_train_step",
                        nan_from_step_3(step_lib.make_train_step, "loss"))
    c = tiny_config(tmp_path, STEPS)
    c.train.log_every = 5           # the checkpoint step forces a finiteness check
    c.train.checkpoint_every = 2
    workdir = str(tmp_path / "nan")
    result = loop.train(c, workdir, devices=jax.devices()[:1])
    err = capsys.readouterr().err
    assert result == {"diverged": True, "step": 4}  # first check after the NaN (step 3)
    assert "non-finite at step 4" in err and "Last checkpoint: step 2" in err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_a_stop_signal_after_a_nan_gradient_saves_nothing(tmp_path, monkeypatch, capsys):
    """A NaN gradient with a finite loss (params turn NaN), then SIGTERM between
    logged steps: the unlogged last step is checked and nothing is saved."""
    import signal

    from nl_jax.train import loop

    real_batch = loop.Trainer.device_batch
    calls = {"n": 0}

    def device_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:                   # SIGTERM during an unlogged step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(self, batch)

    monkeypatch.setattr(step_lib, "make_train_step", nan_from_step_3(
        step_lib.make_train_step, "grad_norm", poison_params=True))
    monkeypatch.setattr(loop.Trainer, "device_batch", device_batch)
    c = tiny_config(tmp_path, 20)
    c.train.log_every = 10
    workdir = str(tmp_path / "nan")
    result = loop.train(c, workdir, devices=jax.devices()[:1])
    err = capsys.readouterr().err
    # Logged steps are 1, 10, 20: the NaN step (>= 3) caught is the unlogged last one.
    assert result["diverged"] and result["step"] in (3, 4)
    assert f"non-finite at step {result['step']}" in err and "Last checkpoint: none" in err
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints"))


def test_ctrl_c_during_the_final_save_names_the_last_complete_checkpoint(tmp_path, capsys,
                                                                        monkeypatch):
    """Ctrl-C while the end-of-run checkpoint is written: no traceback, a message
    naming the last complete checkpoint (still on disk and restorable)."""
    from nl_jax.train import checkpoint, loop

    real = checkpoint.Checkpointer.save

    def interrupted_final_save(self, step, state, data_state, force=False):
        if force:
            raise KeyboardInterrupt
        return real(self, step, state, data_state, force)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", interrupted_final_save)
    c = tiny_config(tmp_path, 3)
    c.train.checkpoint_every = 2
    workdir = str(tmp_path / "ctrl_c")
    result = loop.train(c, workdir, devices=jax.devices()[:1])
    err = capsys.readouterr().err
    assert result["interrupted"] and result["step"] == 3 and result["signal"] == 2
    assert "step 3 was not saved; last complete checkpoint: step 2" in err
    monkeypatch.undo()
    c.train.steps = 2
    assert restored(c, workdir).checkpointer.finished_steps() == [2]


def test_ctrl_c_while_waiting_for_the_final_save_lets_it_finish(tmp_path, capsys,
                                                                monkeypatch):
    """Ctrl-C after the final save was dispatched (while waiting for it): the write
    under way finishes and the message says that checkpoint is complete."""
    from nl_jax.train import checkpoint, loop

    def interrupted_close(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "close", interrupted_close)
    workdir = str(tmp_path / "ctrl_c_wait")
    result = loop.train(tiny_config(tmp_path, 2), workdir, devices=jax.devices()[:1])
    assert result["interrupted"] and result["step"] == 2
    assert "the checkpoint of step 2 is complete" in capsys.readouterr().err
    monkeypatch.undo()
    assert restored(tiny_config(tmp_path, 2), workdir).checkpointer.finished_steps() == [2]


def test_ctrl_c_outside_the_training_loop_exits_130_without_traceback(capsys, monkeypatch):
    from nl_jax import __main__ as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    assert main(["eval"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: eval stopped" in err and "Traceback" not in err
