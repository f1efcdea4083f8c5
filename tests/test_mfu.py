"""MFU and compile time in the training logs (``nl_jax/train/mfu.py``): the peak
table, the CPU's measured rate, and the logged ``model_flops_per_token`` /
``mfu`` / ``compile_s`` of a tiny run (metrics.jsonl, TensorBoard, console)."""

import json
import os
import time
from types import SimpleNamespace

import jax
import pytest

from experiments import base
from nl_jax.models import flops
from nl_jax.train import mfu
from nl_jax.train.loop import train


def fake_devices(kind, n, platform="gpu"):
    return [SimpleNamespace(device_kind=kind, platform=platform, process_index=0)] * n


@pytest.mark.parametrize("kind, name, bf16, fp32, hbm", [
    ("TPU v4", "TPU v4", 275e12, 275e12, 1200e9),
    ("TPU v5 lite", "TPU v5e", 197e12, 197e12, 819e9),
    ("TPU v5e", "TPU v5e", 197e12, 197e12, 819e9),
    ("TPU v5", "TPU v5p", 459e12, 459e12, 2765e9),
    ("TPU v5p", "TPU v5p", 459e12, 459e12, 2765e9),
    ("TPU v6 lite", "TPU v6e (Trillium)", 918e12, 918e12, 1640e9),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB SXM", 312e12, 156e12, 1555e9),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM", 312e12, 156e12, 2039e9),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe", 312e12, 156e12, 1935e9),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5e12, 494.5e12, 3350e9),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5e12, 378e12, 2000e9),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.5e12, 494.5e12, 4800e9),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 835.5e12, 417.5e12, 4800e9),
])
def test_peak_table_matches_device_kind_strings(kind, name, bf16, fp32, hbm):
    peak = mfu.chip_peak(kind)
    assert peak.name == name
    assert peak.bf16_flops == pytest.approx(bf16) and peak.fp32_flops == pytest.approx(fp32)
    assert peak.hbm_bytes_per_s == pytest.approx(hbm)


@pytest.mark.parametrize("kind", ["TPU v4 lite", "TPU v3", "NVIDIA GeForce RTX 4090", "cpu", ""])
def test_unknown_chips_have_no_peak(kind):
    """Exact matches only: "TPU v4 lite" (v4i) is not a v4, a GPU not in the table
    gets no figure (and so no MFU) rather than another card's."""
    assert mfu.chip_peak(kind) is None
    assert mfu.device_peak(fake_devices(kind, 2), "float32") is None


def test_device_peak_picks_the_dtype_column_and_counts_chips():
    gpus = mfu.device_peak(fake_devices("NVIDIA H100 80GB HBM3", 8), "bfloat16")
    assert gpus.chips == 8 and gpus.flops == pytest.approx(8 * 989.5e12)
    assert gpus.hbm_bytes_per_s == pytest.approx(3350e9)
    tf32 = mfu.device_peak(fake_devices("NVIDIA H100 80GB HBM3", 8), "float32")
    assert tf32.flops == pytest.approx(8 * 494.5e12)
    tpus = mfu.device_peak(fake_devices("TPU v5 lite", 256, "tpu"), "float32")
    assert tpus.flops == pytest.approx(256 * 197e12)
    assert mfu.mfu(1e9, 1e4, gpus) == pytest.approx(1e13 / (8 * 989.5e12))


def test_cpu_peak_is_measured_once_per_host():
    """The CPU's rate is measured (under a second) and cached; the fake devices of
    --xla_force_host_platform_device_count share one host, which counts once."""
    devices = jax.devices()[:8]
    assert len(devices) == 8 and devices[0].platform == "cpu"
    start = time.perf_counter()
    first = mfu.device_peak(devices, "float32")
    assert time.perf_counter() - start < 5.0     # < 1 s alone; a loaded shared machine
    assert first.chips == 1 and first.hbm_bytes_per_s is None
    assert 1e8 < first.flops_per_chip < 1e14
    start = time.perf_counter()
    assert mfu.device_peak(devices, "bfloat16").flops == first.flops     # cached
    assert time.perf_counter() - start < 0.05


def tiny_config(tmp_path, steps):
    c = base.get_config()
    c.train.steps = steps
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.checkpoint_every = 0
    c.train.sample_tokens = 0
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.cache_dir = str(tmp_path / "cache")
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.levels.default.optimizer.schedule.warmup_steps = 2
    return c


def test_training_logs_flops_mfu_and_compile_time(tmp_path, capsys):
    """Every train record has the analytic FLOPs per token of flops.py and
    mfu = flops x tokens/s / peak; the first record of each invocation (a fresh
    start, then a resume) has the compile time; TensorBoard and the console
    get them too."""
    workdir = str(tmp_path / "run")
    devices = jax.devices()[:1]
    train(tiny_config(tmp_path, 2), workdir, devices=devices)
    train(tiny_config(tmp_path, 4), workdir, devices=devices)     # resumes at step 2
    out = capsys.readouterr().out
    config = tiny_config(tmp_path, 4)
    expected_flops = flops.model_flops_per_token(config)
    peak = mfu.device_peak(devices, config.model.dtype)      # this process's cached rate
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["model_flops_per_token"] == expected_flops
        assert r["mfu"] == pytest.approx(expected_flops * r["tokens_per_s"] / peak.flops,
                                         rel=1e-12)
        assert 0 < r["mfu"] < 1
    assert [("compile_s" in r) for r in rows] == [True, False, True, False]
    assert all(r["compile_s"] > 0 for r in rows if "compile_s" in r)
    blob = b"".join(path.read_bytes() for path in (tmp_path / "run" / "tensorboard").iterdir())
    for tag in (b"train/mfu", b"train/model_flops_per_token", b"train/compile_s"):
        assert tag in blob
    assert f"model FLOPs per token {expected_flops:.4g}" in out
    step_lines = [line for line in out.splitlines() if line.startswith("step ") and "loss=" in line]
    assert len(step_lines) == 4 and all(" mfu=" in line for line in step_lines)
    assert "compile_s=" in step_lines[0] and "compile_s=" not in step_lines[1]
