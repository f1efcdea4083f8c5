"""Multi-process training: two CPU processes joined by ``--coordinator`` train the
same model as one process with two devices, and write the workdir once."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
FLAGS = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
         "--config.data.seq_len=32", "--config.data.batch_size=4",
         "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.d_ff=64", "--config.levels.default.optimizer.schedule.warmup_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def nl_jax(args, host_devices: int, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={host_devices}")
    return subprocess.Popen([sys.executable, "-m", "nl_jax", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    flags = FLAGS + [f"--config.data.cache_dir={tmp / 'cache'}"]
    one = str(tmp / "one_process")
    code, out, err = finish(nl_jax(["train", *flags, "--workdir", one], host_devices=2))
    assert code == 0, err[-3000:]
    two = str(tmp / "two_processes")
    port = free_port()
    procs = [nl_jax(["train", *flags, "--workdir", two, "--coordinator", f"localhost:{port}",
                     "--num_processes", "2", "--process_id", str(i)], host_devices=1)
             for i in range(2)]
    results = [finish(p) for p in procs]
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


def test_a_multi_process_checkpoint_evaluates_in_one_process(runs):
    one, two, _, _ = runs
    code, out, err = finish(nl_jax(["eval", "--workdir", two], host_devices=1))
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(
        records(one, "eval")[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("flags, needle", [
    (["--num_processes", "2"], "go together"),
    (["--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id must be in [0, --num_processes)")])
def test_bad_launch_flags_exit_2(tmp_path, flags, needle):
    code, _, err = finish(nl_jax(["train", *FLAGS, "--workdir", str(tmp_path), *flags],
                                 host_devices=1), timeout=120)
    assert code == 2 and needle in err and "Traceback" not in err


def test_multi_process_needs_a_workdir():
    code, _, err = finish(nl_jax(["train", "--distributed"], host_devices=1), timeout=120)
    assert code == 2 and "needs --workdir" in err
