"""Nothing lost: checkpoint checksums and fallback, one writer per workdir,
interrupted end-of-run outputs, stop signals at any moment, file-system faults."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nl_jax.__main__ import main
from nl_jax.errors import CheckpointDamagedError
from nl_jax.train import checkpoint as ckpt_lib
from nl_jax.train import integrity
from nl_jax.train.lock import RunLock
from nl_jax.train.loop import Trainer
from tests.test_workdir_safety import run, snapshot, tiny_flags


def flags(tmp, steps, checkpoint_every=2):
    return [*tiny_flags(tmp, steps=steps), f"--config.train.checkpoint_every={checkpoint_every}"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("integrity")
    workdir = tmp / "run"
    assert main(["train", *flags(tmp, 4), "--workdir", str(workdir)]) == 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return tmp, workdir


def copy_of(finished, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(finished[1], copy)
    return copy


def data_files(workdir, step):
    """The files holding a checkpoint's array bytes (larger than their headers)."""
    pattern = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_*", "d", "*")
    return sorted(f for f in glob.glob(pattern) if os.path.getsize(f) > 1024)


def flip_bit(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def state_leaves(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        import ml_collections
        config = ml_collections.ConfigDict(json.load(f))
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:1])
    trainer.maybe_restore()
    return trainer, [np.asarray(x) for x in jax.tree.leaves(trainer.state)]


def test_checksums_are_independent_of_sharding_and_catch_every_single_bit_flip():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    x = jax.random.normal(jax.random.key(0), (16, 12))
    ref = integrity.array_checksums({"x": x, "n": jnp_int(), "h": x.astype(jax.numpy.bfloat16)})
    devices = np.array(jax.devices()[:2]).reshape(2, 1)
    sharded = jax.device_put(x, NamedSharding(Mesh(devices, ("a", "b")), PartitionSpec("a")))
    assert integrity.array_checksums({"x": sharded})["['x']"] == ref["['x']"]
    bits = np.asarray(x).view(np.uint32)
    for flat in range(0, bits.size, 7):
        for bit in (0, 13, 31):
            damaged = bits.copy()
            damaged.flat[flat] ^= np.uint32(1 << bit)
            got = integrity.array_checksums({"x": damaged.view(np.float32)})["['x']"]
            assert got != ref["['x']"], (flat, bit)
    swapped = bits.copy()
    swapped.flat[[0, 1]] = swapped.flat[[1, 0]]
    assert integrity.array_checksums({"x": swapped.view(np.float32)})["['x']"] != ref["['x']"]


def jnp_int():
    return jax.numpy.arange(10, dtype=jax.numpy.int32)


def test_every_bit_flip_that_changes_restored_data_is_detected(finished, tmp_path):
    copy = copy_of(finished, tmp_path)
    trainer, clean = state_leaves(copy)
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.shardings)
    # The two largest data files hold most array bytes (the others mostly
    # metadata and bytes that no restore reads).
    files = sorted(data_files(copy, 4), key=os.path.getsize)[-2:]
    rng, detected = random.Random(0), 0
    for _ in range(16):
        path = rng.choice(files)
        offset, bit = rng.randrange(os.path.getsize(path)), rng.randrange(8)
        flip_bit(path, offset, bit)
        try:
            state, _ = trainer.checkpointer.restore(4, abstract)
            # Undetected only where the flip hit bytes no array is read from.
            for a, b in zip(clean, jax.tree.leaves(state), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))
        except CheckpointDamagedError as e:
            detected += 1
            assert "checkpoint step 4" in str(e)
        flip_bit(path, offset, bit)
    assert detected >= 4      # (not vacuous: most flips land in array bytes)


def test_train_falls_back_past_a_damaged_checkpoint_and_loses_nothing(finished, tmp_path,
                                                                      capsys):
    tmp, _ = finished
    damaged, clean = copy_of(finished, tmp_path, "damaged"), copy_of(finished, tmp_path, "clean")
    for path in data_files(damaged, 4):      # every data file: the weights' bytes too
        for offset in range(0, os.path.getsize(path), 4099):
            flip_bit(path, offset, 3)

    code, out, err = run(capsys, "eval", "--workdir", str(damaged), "--batches", "1")
    assert code == 0, err
    assert "skipped the damaged checkpoint of step 4" in err and json.loads(out)["step"] == 2
    assert sorted(os.listdir(damaged / "checkpoints")) == ["2", "4"]   # eval moves nothing

    code, out, err = run(capsys, "train", *flags(tmp, 6), "--workdir", str(damaged))
    assert code == 0, err
    assert "skipped the damaged checkpoint of step 4" in err and "resuming from step 2" in out
    assert "Traceback" not in err
    (aside,) = os.listdir(damaged / "damaged_checkpoints")
    assert aside.startswith("4-")
    reason = (damaged / "damaged_checkpoints" / aside / "REASON.txt").read_text()
    assert "checkpoint step 4" in reason
    # Resumed from step 2 and retrained 3..6: bit-equal to resuming a clean copy
    # from step 2 by hand (its step 4 moved away).
    shutil.rmtree(clean / "checkpoints" / "4")
    assert run(capsys, "train", *flags(tmp, 6), "--workdir", str(clean))[0] == 0
    _, a = state_leaves(damaged)
    _, b = state_leaves(clean)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_second_writer_is_refused_and_a_dead_holder_is_not(finished, tmp_path, capsys):
    tmp, _ = finished
    copy = copy_of(finished, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nl_jax.train.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(copy)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(copy)
        code, _, err = run(capsys, "train", *flags(tmp, 6), "--workdir", str(copy))
        assert code == 2 and err.count("\n") == 1, err
        assert "in use by another train process" in err and f"pid {holder.pid}" in err
        assert snapshot(copy) == before
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(copy))      # the holder died: its flock went with it
    lock.acquire()
    lock.release()
    # A record left by a dead process of this host does not hold the workdir.
    (copy / "train.lock").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": holder.pid, "started": time.time(),
         "heartbeat": time.time()}))
    lock.acquire()
    lock.release()


def test_a_finished_run_missing_its_outputs_writes_them_on_rerun(finished, tmp_path, capsys):
    tmp, workdir = finished
    copy = copy_of(finished, tmp_path)
    original = json.loads((workdir / "final_metrics.json").read_text())
    (copy / "final_metrics.json").unlink()
    (copy / "loss_curve.png").unlink()
    code, out, err = run(capsys, "train", *flags(tmp, 4), "--workdir", str(copy))
    assert code == 0, err
    assert "finishing the run" in out
    final = json.loads((copy / "final_metrics.json").read_text())
    assert final["step"] == 4 and (copy / "loss_curve.png").exists()
    for key in ("train_loss_first", "train_loss_last", "eval_loss"):
        assert final[key] == original[key], key
    assert "nothing to do" in run(capsys, "train", *flags(tmp, 4), "--workdir", str(copy))[1]


def test_a_stop_signal_during_startup_stops_before_any_step(tmp_path, capsys, monkeypatch):
    from nl_jax.train import loop
    real = loop.Trainer.maybe_restore

    def signalled(self):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(loop.Trainer, "maybe_restore", signalled)
    workdir = tmp_path / "w"
    code, _, err = run(capsys, "train", *flags(tmp_path, 4), "--workdir", str(workdir))
    assert code == 130 and "before the first step: nothing to save" in err, err
    assert not os.listdir(workdir / "checkpoints")


def test_ctrl_c_during_the_final_save_lets_it_finish(tmp_path, capsys, monkeypatch):
    real = ckpt_lib.Checkpointer.save

    def save(self, step, state, data_state, force=False):
        if force:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step, state, data_state, force)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    workdir = tmp_path / "w"
    code, out, err = run(capsys, "train", *flags(tmp_path, 3), "--workdir", str(workdir))
    assert code == 130 and "finishing the final checkpoint first" in err, err
    assert "checkpoint saved at step 3" in out and "Traceback" not in err
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert not (workdir / "final_metrics.json").exists()
    monkeypatch.undo()
    code, out, _ = run(capsys, "train", *flags(tmp_path, 3), "--workdir", str(workdir))
    assert code == 0 and "finishing the run" in out
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 3


def hook_at_batch(monkeypatch, call, action):
    """Runs ``action()`` before the ``call``-th training batch is read."""
    from nl_jax.train import loop
    real = loop.Trainer.device_batch
    calls = {"n": 0}

    def device_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return real(self, batch)

    monkeypatch.setattr(loop.Trainer, "device_batch", device_batch)


def test_file_system_faults_give_one_line_and_keep_the_last_checkpoint(
        finished, tmp_path, capsys, monkeypatch):
    tmp, _ = finished
    # Full disk: refused before anything is written; steps 2 and 4 intact.
    copy = copy_of(finished, tmp_path, "full")
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    code, _, err = run(capsys, "train", *flags(tmp, 6), "--workdir", str(copy))
    assert code == 2 and err.count("\n") == 1 and "not enough free space" in err, err
    assert "resume from step 4" in err
    monkeypatch.undo()
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "4"]
    state_leaves(copy)          # still restores and verifies

    # checkpoints/ deleted mid-run: re-created with a warning, the run completes.
    workdir = tmp_path / "vanished_checkpoints"
    hook_at_batch(monkeypatch, 3, lambda: shutil.rmtree(workdir / "checkpoints"))
    code, _, err = run(capsys, "train", *flags(tmp, 4), "--workdir", str(workdir))
    assert code == 0 and "vanished during the run; re-creating it" in err, err
    assert "4" in os.listdir(workdir / "checkpoints")   # (2 may finish its async write)
    monkeypatch.undo()

    # The whole workdir deleted mid-run: one line, exit 2.
    workdir = tmp_path / "vanished_workdir"
    hook_at_batch(monkeypatch, 3, lambda: shutil.rmtree(workdir))
    code, _, err = run(capsys, "train", *flags(tmp, 4), "--workdir", str(workdir))
    assert code == 2 and err.count("\n") == 1 and "vanished during the run" in err, err
    monkeypatch.undo()

    # The token cache truncated under the run: a DataError, not a SIGBUS.
    workdir = tmp_path / "truncated_cache"
    caches = glob.glob(str(tmp / "cache" / "tokens-*.npy"))
    backup = tmp_path / "cache_backup"
    backup.mkdir()

    def truncate():
        for cache in caches:
            shutil.copy(cache, backup / os.path.basename(cache))
            os.truncate(cache, 1024)

    hook_at_batch(monkeypatch, 3, truncate)
    try:
        code, _, err = run(capsys, "train", *flags(tmp, 4), "--workdir", str(workdir))
    finally:
        for cache in caches:
            shutil.copy(backup / os.path.basename(cache), cache)
    assert code == 2 and err.count("\n") == 1 and "changed size while in use" in err, err
    assert os.listdir(workdir / "checkpoints") == ["2"]
