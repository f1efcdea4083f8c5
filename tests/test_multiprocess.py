"""Multi-process training: two CPU processes joined by ``--coordinator`` train the
same model as one process with two devices, and write the workdir once; Ctrl-C
and SIGTERM save and exit, on one process or on one of two."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Transformer++ (a 3-step tiny run takes ~5 s here, Hope's compile ~20 s): what is
# tested is the multi-process machinery, which is the same for every model;
# sharded Hope against one device is tests/test_sharded_step.py.
FLAGS = ["--config", "experiments/transformer/tiny.py",
         f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
         "--config.data.seq_len=32", "--config.data.batch_size=4",
         "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.d_ff=64", "--config.levels.default.optimizer.schedule.warmup_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Run:
    """``python -m nl_jax ARGS`` in a subprocess, output to files (no pipe can fill)."""

    def __init__(self, args, host_devices: int, log: str):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={host_devices}")
        self.log = log
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "nl_jax", *args], cwd=REPO,
                                         env=env, stdout=out, stderr=err, text=True)

    def finish(self, timeout=600):
        """(exit code, stdout, stderr); kills the process if it runs past ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        with open(self.log + ".out") as out, open(self.log + ".err") as err:
            return self.proc.returncode, out.read(), err.read()


def finish_all(runs, timeout=600):
    try:
        return [r.finish(timeout) for r in runs]
    finally:
        for r in runs:
            if r.proc.poll() is None:
                r.proc.kill()


def two_processes(args, workdir, logs):
    port = free_port()
    return [Run(["train", *args, "--workdir", workdir, "--coordinator", f"localhost:{port}",
                 "--num_processes", "2", "--process_id", str(i)], 1, f"{logs}_{i}")
            for i in range(2)]


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def cache_flag(tmp_path_factory):
    """One token cache for the module's runs (built by the first)."""
    return f"--config.data.cache_dir={tmp_path_factory.mktemp('token_cache')}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_flag):
    tmp = tmp_path_factory.mktemp("multiprocess")
    flags = FLAGS + [cache_flag]
    one = str(tmp / "one_process")
    code, out, err = finish_all([Run(["train", *flags, "--workdir", one], 2,
                                     str(tmp / "one"))])[0]
    assert code == 0, err[-3000:]
    two = str(tmp / "two_processes")
    results = finish_all(two_processes(flags, two, str(tmp / "two")))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return one, two, out, results


def test_two_processes_train_like_one_process_with_two_devices(runs):
    one, two, _, _ = runs
    a, b = records(one, "train"), records(two, "train")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))   # written once
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert records(two, "eval")[0]["loss"] == pytest.approx(records(one, "eval")[0]["loss"],
                                                           rel=1e-5)


def test_only_process_0_reports(runs):
    _, two, _, ((_, out0, _), (_, out1, _)) = runs
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}, 2 processes" in out0
    assert "final:" in out0 and "step 3 loss=" in out0
    assert not any(w in out1 for w in ("nl_jax:", "loss=", "final:"))   # (Gloo prints a line)
    for name in ("config.json", "final_metrics.json", "loss_curve.png"):
        assert os.path.exists(os.path.join(two, name))
    assert len(glob.glob(os.path.join(two, "tensorboard", "events*"))) == 1


def test_a_multi_process_checkpoint_evaluates_in_one_process(runs):
    one, two, _, _ = runs
    code, out, err = Run(["eval", "--workdir", two], 1, two + "_eval").finish()
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(
        records(one, "eval")[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("flags, needle", [
    (["--num_processes", "2"], "go together"),
    (["--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id must be in [0, --num_processes)"),
    (["--coordinator", "localhost", "--num_processes", "2", "--process_id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", "localhost:1", "--num_processes", "two", "--process_id", "0"],
     "must be integers"),
    (["--coordinator", "localhost:1", "--num_processes", "0", "--process_id", "0"],
     "--num_processes must be >= 1")])
def test_bad_launch_flags_exit_2(tmp_path, flags, needle):
    code, _, err = Run(["train", *FLAGS, "--workdir", str(tmp_path / "w"), *flags], 1,
                       str(tmp_path / "log")).finish(timeout=120)
    assert code == 2 and needle in err and "Traceback" not in err


def test_multi_process_needs_a_workdir(tmp_path):
    code, _, err = Run(["train", "--distributed"], 1, str(tmp_path / "log")).finish(120)
    assert code == 2 and "needs --workdir" in err


def wait_for_train_records(workdir, count, procs, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.proc.poll() is None for p in procs), "a process exited early"
        if os.path.exists(path) and len(records(workdir, "train")) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} train records in {path} after {timeout} s")


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_exits_128_plus_signal(tmp_path, cache_flag, sig, code):
    flags = [f for f in FLAGS if "train.steps" not in f] + [
        "--config.train.steps=100000", cache_flag]
    workdir = str(tmp_path / "w")
    run = Run(["train", *flags, "--workdir", workdir], 1, str(tmp_path / "log"))
    try:
        wait_for_train_records(workdir, 2, [run])
    finally:
        run.proc.send_signal(sig)
    got, out, err = run.finish(timeout=120)
    assert got == code, err[-3000:]
    step = checkpoint_steps(workdir)[-1]
    assert f"interrupted ({sig.name}): checkpoint saved at step {step}" in out
    assert step >= 2


# SIGTERM only (a preempted host); SIGINT takes the same handler, which the
# single-process test above runs with both signals (CI time).
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path, cache_flag, sig,
                                                             code):
    """Process 1 alone gets the signal: the processes agree at the next logging
    step (every 3rd), save one checkpoint there and exit 128 + signal."""
    flags = [f for f in FLAGS if "train.steps" not in f and "log_every" not in f] + [
        "--config.train.steps=100000", "--config.train.log_every=3", cache_flag]
    workdir = str(tmp_path / "w")
    procs = two_processes(flags, workdir, str(tmp_path / "log"))
    try:
        wait_for_train_records(workdir, 2, procs)
    finally:
        procs[1].proc.send_signal(sig)
    (code0, out0, err0), (code1, _, err1) = finish_all(procs, timeout=180)
    assert (code0, code1) == (code, code), (err0[-2000:], err1[-2000:])
    steps = checkpoint_steps(workdir)
    assert len(steps) == 1 and steps[0] % 3 == 0
    assert f"interrupted ({sig.name}): checkpoint saved at step {steps[0]}" in out0
