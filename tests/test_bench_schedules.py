"""``bench schedules``: schedule parsing, the outer levels it builds, the entry point."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax import levels as levels_lib
from nl_jax.__main__ import main as cli_main
from nl_jax.bench import schedules as bench
from nl_jax.bench.tiny_lm import tiny_model_config
from nl_jax.errors import ConfigError
from nl_jax.models.lm import LanguageModel

ADAMW = dict(name="adamw", learning_rate=1e-2)


def test_parse_schedules():
    assert bench.parse_schedules(" 16,never ; never@4;8@2,never@3 ;", 64) == [
        ("16,never", [(16, 1), ("never", 1)]),
        ("never@4", [("never", 4)]),
        ("8@2,never@3", [(8, 2), ("never", 3)])]


@pytest.mark.parametrize("text, message", [
    ("abc", "level 'abc'"),
    ("0,never", "level '0'"),
    ("64,never", "64 tokens never fires inside a 64-token window"),
    ("16@0", "must be an integer >= 1"),
    ("never@x", "must be an integer >= 1"),
    (";", "names no schedule"),
    ("16;16", "listed twice"),
])
def test_bad_schedules_name_the_level(text, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse_schedules(text, 64)


def test_bad_schedule_exits_2_on_the_command_line(capsys):
    assert cli_main(["bench", "schedules", "--schedules", "64,never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench schedules: level '64': a period of 64 tokens")
    assert "'never@<steps>'" in err


def _tiny_cms_params(periods):
    cfg = tiny_model_config()
    cfg.mlp, cfg.cms = "cms", dict(periods=periods)
    _, params, _ = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return params


def test_step_clock_level_owns_exactly_its_cms_level():
    levels = [(16, 1), ("never", 4)]
    params = _tiny_cms_params((16, "never"))
    owner = levels_lib.assign_levels(bench.levels_config(ADAMW, levels), params)
    slow = {p for p, name in owner.items() if name == "cms_level_1"}
    assert slow == {p for p in owner if "/mlp/levels/1/" in p} and len(slow) == 6
    assert all(name == "default" for p, name in owner.items() if p not in slow)
    assert set(bench.levels_config(ADAMW, [(16, 1), ("never", 1)])) == {"default"}


def test_step_clock_level_updates_every_k_steps():
    params = _tiny_cms_params((16, "never"))
    tx = levels_lib.build_levels(bench.levels_config(ADAMW, [(16, 1), ("never", 3)]),
                                 params, total_steps=6)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    paths = levels_lib.param_paths(params)
    for step in range(1, 7):
        updates, state = tx.update(grads, state, params)
        moved = {p: bool(jnp.any(u != 0)) for p, u in
                 zip(paths, jax.tree.leaves(updates), strict=True)}
        slow = [m for p, m in moved.items() if "/mlp/levels/1/" in p]
        fast = [m for p, m in moved.items() if "/mlp/levels/1/" not in p]
        assert all(fast)
        assert all(slow) if step % 3 == 0 else not any(slow)


def test_bench_schedules_writes_rows_and_plot(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 60)
    out = tmp_path / "b" / "rows.json"
    assert bench.main(["--steps", "3", "--schedules", "never;8,never@2", "--text",
                       str(text), "--eval_batches", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["never", "8,never@2"]
    assert rows[1]["periods"] == [8, "never"] and rows[1]["every"] == [1, 2]
    # one more SwiGLU level (3 x 64 x 192) and, being in context, its learning-rate
    # projection (64 + 1), in each of the 2 blocks
    assert rows[1]["num_params"] - rows[0]["num_params"] == 2 * (3 * 64 * 192 + 65)
    for r in rows:
        assert np.isfinite(r["final_loss"]) and np.isfinite(r["eval_loss"])
        assert r["step_ms"] > 0
    assert (tmp_path / "b" / "rows.png").stat().st_size > 1000
    assert "8,never@2" in capsys.readouterr().out


def test_bench_schedules_shift_reports_forgetting(tmp_path):
    text, other = tmp_path / "a.txt", tmp_path / "b.txt"
    text.write_bytes(bytes(range(256)) * 60)
    other.write_bytes(bytes(range(255, -1, -1)) * 60)
    out = tmp_path / "rows.json"
    assert bench.main(["--steps", "4", "--shift", "--schedules", "8,never", "--text",
                       str(text), "--shift_text", str(other), "--eval_batches", "1",
                       "--seeds", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    metrics = {"final_loss", "eval_loss", "eval_loss_mid", "forgetting", "eval_loss_shift"}
    assert row["seeds"] == 2 and set(row["std"]) == metrics
    assert all(np.isfinite(v) and v >= 0 for v in row["std"].values())
    assert row["forgetting"] == pytest.approx(row["eval_loss"] - row["eval_loss_mid"])
    assert row["eval_loss_mid"] != row["eval_loss"]       # trained on between the two
    assert np.isfinite(row["eval_loss_shift"])
