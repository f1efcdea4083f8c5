"""The optional Weights & Biases writer (``train.wandb``): in W&B's offline mode
a run logs the metrics.jsonl records and the resolved config, and a resume
continues the same W&B run; without wandb installed, one error line."""

import json
import os
import struct
import sys

import jax
import pytest

from nl_jax.__main__ import main
from nl_jax.train.loop import train
from tests.test_mfu import tiny_config

TINY = "experiments/transformer/tiny.py"
BLOCK = 32768       # W&B's .wandb files: a LevelDB-style log of 32 KiB blocks


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file (W&B's own ``Record`` message),
    read from its LevelDB-style log: a 7-byte header, then per record a 7-byte
    header (checksum, length, type: full / first / middle / last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:          # block trailer: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(pending))
    return out


def history(records):
    """``[{key: value}]`` of the logged rows, with W&B's own ``_step``."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json)
                         for i in r.history.item})
    return rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    return folder


def test_offline_run_holds_the_metrics_and_the_config(tmp_path, offline_wandb):
    workdir = str(tmp_path / "run")
    devices = jax.devices()[:1]

    def config(steps):
        c = tiny_config(tmp_path, steps)
        c.train.wandb.enabled = True
        c.train.wandb.project = "nl_jax_test"
        c.train.wandb.name = "tiny"
        return c

    train(config(2), workdir, devices=devices)
    train(config(4), workdir, devices=devices)          # resumes at step 2
    with open(os.path.join(workdir, "wandb_run_id")) as f:
        run_id = f.read().strip()
    runs = sorted(offline_wandb.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)   # one W&B run

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        jsonl = [json.loads(line) for line in f]
    logged = []
    for run in runs:
        records = wandb_records(next(run.glob("*.wandb")))
        logged += history(records)
        started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert started.run_id == run_id and started.project == "nl_jax_test"
        assert started.display_name == "tiny"
        saved = {i.key: json.loads(i.value_json) for i in started.config.update}
        assert saved["model"]["d_model"] == 32 and saved["train"]["wandb"]["enabled"]
        assert saved["data"]["seq_len"] == 32 and "levels" in saved
    for record in jsonl:         # every record, every numeric key, at its step
        row = next(r for r in logged if r["_step"] == record["step"]
                   and f"{record['split']}/loss" in r)
        for k, v in record.items():
            if k not in ("step", "split"):
                assert row[f"{record['split']}/{k}"] == pytest.approx(v), k
    keys = set().union(*logged)
    assert {"train/loss", "train/mfu", "train/model_flops_per_token", "train/compile_s",
            "train/tokens_per_s", "eval/loss", "eval/perplexity"} <= keys


def test_wandb_enabled_but_not_installed_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)      # import wandb -> ImportError
    workdir = tmp_path / "w"
    code = main(["train", "--config", TINY, "--workdir", str(workdir),
                 f"--config.data.cache_dir={tmp_path / 'cache'}",
                 "--config.train.wandb.enabled=True"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "train.wandb.enabled" in err and "pip install 'nl_jax[wandb]'" in err
    assert not workdir.exists()      # nothing written


def test_wandb_bad_mode_is_one_error_line(tmp_path, capsys):
    code = main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                 f"--config.data.cache_dir={tmp_path / 'cache'}",
                 "--config.train.wandb.enabled=True", "--config.train.wandb.mode=onlin"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "train.wandb.mode='onlin'" in err and "offline, online" in err


def test_online_without_credentials_fails_before_the_compile(tmp_path, capsys, monkeypatch):
    """mode=online with no W&B API key (a fresh HOME, no WANDB_API_KEY): one error
    line saying how to log in, before the step is compiled or any metric written."""
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    workdir = tmp_path / "w"
    code = main(["train", "--config", TINY, "--workdir", str(workdir),
                 f"--config.data.cache_dir={tmp_path / 'cache'}",
                 "--config.train.wandb.enabled=True", "--config.train.wandb.mode=online"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: train.wandb: cannot start the W&B run")
    assert err.count("\n") == 1 and "wandb login" in err and "WANDB_API_KEY" in err
    assert "step 1" not in out and not (workdir / "metrics.jsonl").exists()
    assert not (workdir / "wandb_run_id").exists()
