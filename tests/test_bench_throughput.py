"""``bench throughput``: its JSON and table end to end on a tiny shape, every model's
config, and the command line's mistakes."""

import json
import math

import pytest

from nl_jax import __main__ as cli
from nl_jax.bench import throughput
from nl_jax.models.flops import model_flops_per_token

TINY = ["--override", "model.d_model=32", "--override", "model.n_layers=1",
        "--override", "model.d_ff=64", "--override", "model.vocab_size=256"]
ROW_KEYS = {"model", "params", "seq_len", "batch", "tokens_per_s", "step_ms", "peak_bytes",
            "peak_source", "flops_per_token", "model_flops_per_s", "mesh"}


def tiny_overrides():
    return [throughput.parse_override(TINY[i + 1]) for i in range(0, len(TINY), 2)]


def test_end_to_end_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench" / "throughput.json"
    assert throughput.main(["--models", "transformer", "--lengths", "64,32",
                            "--tokens_per_step", "128", "--steps", "1", "--warmup", "0",
                            *TINY, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["seq_len"], r["batch"]) for r in rows] == [
        ("transformer", 32, 4), ("transformer", 64, 2)]
    for r in rows:
        assert set(r) >= ROW_KEYS
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_bytes"] > 0
        assert r["params"] > 0 and r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
        config = throughput.model_config("transformer", r["seq_len"], r["batch"],
                                         tiny_overrides())
        assert r["flops_per_token"] > 0
        assert r["flops_per_token"] == model_flops_per_token(config)
        assert r["model_flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
    assert set(result["exponents"]) == {"transformer"}
    assert all(math.isfinite(e) for e in result["exponents"].values())
    for key in ("machine", "date", "jax_version", "device_layout", "command"):
        assert result[key]
    assert result["device_layout"].startswith("1 x cpu")
    assert "--lengths 64,32" in result["command"]
    assert (tmp_path / "bench" / "throughput.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "tokens/s" in table and "exponent of time per token" in table


def test_every_model_config_validates_with_its_mixer():
    mixers = {"transformer": "attention", "titans_mag": "titans_mag",
              "hope": "self_modifying"}
    assert set(throughput.MODELS) == set(mixers)
    for name, mixer in mixers.items():
        config = throughput.checked_config(name, 512, 8192, 1)
        m = config.model
        assert (m.mixer, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size, m.dtype) == (
            mixer, 256, 4, 4, 1024, 32000, "float32")
        assert model_flops_per_token(config) > 0


def test_time_per_token_exponent():
    rows = [{"seq_len": t, "batch": 8192 // t, "step_ms": 100.0 * (t / 512) ** 0.5}
            for t in (512, 2048, 8192)]
    assert throughput.time_per_token_exponent(rows) == pytest.approx(0.5)
    assert throughput.time_per_token_exponent(rows[:1]) is None


@pytest.mark.parametrize("args, message", [
    (["--models", "transformer,mamba"], "unknown model mamba"),
    (["--lengths", "512,0"], "--lengths"),
    (["--lengths", "3000"], "3000 do not divide --tokens_per_step 8192"),
    (["--override", "model.d_model"], "KEY=VALUE"),
    (["--steps", "0"], "--steps must be"),
    (["--override", "model.no_such_key=1"], "unknown config key 'model.no_such_key'"),
    (["--models", "titans_mag", "--lengths", "8"], "model.memory.chunk_size"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, message, capsys):
    assert cli.main(["bench", "throughput", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in captured.err and not captured.out
