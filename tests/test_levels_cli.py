"""Honest optimizer swaps and the nested-levels tree (`python -m nl_jax levels`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax import config as config_lib
from nl_jax import levels as levels_lib
from nl_jax.__main__ import main
from nl_jax.optim import COMPANION, OPTIMIZERS, build_optimizer, recipe
from tests.test_strict_config import SHIPPED

TINY = "experiments/transformer/tiny.py"


def load(path, *overrides):
    config = config_lib.load_config_file(path)
    return config_lib.apply_overrides(config, [tuple(o.split("=", 1)) for o in overrides])


def small(config):
    """The same model family at a shape that builds in milliseconds."""
    with config.unlocked():
        config.model.d_model, config.model.d_ff, config.model.n_layers = 32, 64, 1
        config.model.vocab_size = 64
    return config


# -- honest swaps --------------------------------------------------------------------
def test_naming_an_optimizer_installs_its_recipe_and_keeps_same_line_keys():
    swapped = load(TINY, "levels.default.optimizer.learning_rate=0.01",
                   "levels.default.optimizer.name=muon",
                   "levels.default.optimizer.fallback.weight_decay=0.0")
    spec = swapped.levels.default.optimizer.to_dict()
    want = recipe("muon")
    want["learning_rate"] = 0.01                 # set on the same command line, before
    want["fallback"]["weight_decay"] = 0.0       # and after the name
    assert spec == want
    assert spec["b1"] == 0.95 and spec["schedule"]["name"] == "warmup_cosine"
    assert swapped.levels.default.params == ".*" and swapped.levels.default.every == 1
    back = load("experiments/optimizers/muon.py", "levels.default.optimizer.name=adamw")
    assert back.levels.default.optimizer.to_dict() == recipe("adamw")   # no stale b3, ns_steps
    none = load(TINY, "levels.default.optimizer.name=m3",
                "levels.default.optimizer.fallback=none")
    assert none.levels.default.optimizer.fallback == "none"


def test_every_optimizer_has_a_recipe_that_builds():
    for name in OPTIMIZERS:
        spec = recipe(name)
        assert spec["learning_rate"] > 0 and spec["schedule"]["name"] == "warmup_cosine"
        build_optimizer(spec, 10)
        assert ("fallback" in spec) == OPTIMIZERS[name].matrix
    assert recipe("muon")["fallback"] == COMPANION


def _per_parameter(config, params):
    """{path: (every, settings of the optimizer that updates it)}."""
    out = {}
    for level in levels_lib.step_clock_levels(config.levels, params, config.train.steps):
        spec = level["optimizer"]
        for row in level["parameters"]:
            used = spec["fallback"] if row["optimizer"].endswith("(fallback)") else spec
            used = {k: v for k, v in used.items() if k != "fallback"}
            out[row["path"]] = (level["every"], json.dumps(used, sort_keys=True))
    return out


@pytest.mark.parametrize("name", ["muon", "m3"])
def test_one_flag_swap_equals_the_optimizer_config(name):
    """`--config.levels.default.optimizer.name=X` on transformer/tiny resolves to the
    same optimizer, settings and period for every parameter as experiments/optimizers/X.py,
    and its updates are the same (the 30-step losses agree: see the report)."""
    swap = small(load(TINY, f"levels.default.optimizer.name={name}"))
    ref = small(load(f"experiments/optimizers/{name}.py"))
    params = nnx.state(_model(swap.model), nnx.Param)
    assert _per_parameter(swap, params) == _per_parameter(ref, params)
    kinds = {p: levels_lib.param_kind(p, s, n) for p, s, n in levels_lib.param_table(params)}
    assert kinds["embed"] == "embedding/head" and kinds["final_norm/scale"] == "norm scale"
    assert kinds["blocks/0/mlp/up/kernel"] == "matrix"

    real = nnx.state(_model(swap.model, abstract=False), nnx.Param)
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + 1.0), real)
    outs = []
    for config in (swap, ref):
        tx = levels_lib.build_levels(config.levels, real, total_steps=10, grad_clip_norm=1.0)
        state, p = tx.init(real), real
        update = jax.jit(tx.update)
        for _ in range(3):
            u, state = update(grads, state, p)
            p = jax.tree.map(lambda a, b: a + b, p, u)
        outs.append(p)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # the embedding and the norms are updated by the level's AdamW fallback
    label = levels_lib.assign_labels(swap.levels, params)[1]
    assert label["embed"] == label["final_norm/scale"] == "default.fallback"
    assert label["blocks/0/mixer/wq/kernel"] == "default"


def _model(model_cfg, abstract=True):
    from nl_jax.models.lm import LanguageModel
    make = lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


# -- the levels tree -----------------------------------------------------------------
def test_the_tree_of_every_shipped_config_splits_every_parameter():
    """Every parameter is listed once with its kind and the optimizer that updates it;
    paper-scale configs are read at 2 layers (the blocks are identical)."""
    # experiments/baselines/paper.py takes an argument: a single-mixer and a pattern.
    specs = [p for p in SHIPPED if p != "experiments/baselines/paper.py"] + [
        "experiments/baselines/paper.py:gated_deltanet,340m",
        "experiments/baselines/paper.py:samba,340m"]
    for path in specs:
        config = config_lib.load_config_file(path)
        if config.model.n_layers > 2:
            with config.unlocked():
                config.model.n_layers = 2
        tree = levels_lib.levels_tree(config)
        rows = [r for lv in tree["step_clock"] for r in lv["parameters"]]
        params = nnx.state(_model(config.model), nnx.Param)
        assert sorted(r["path"] for r in rows) == sorted(levels_lib.param_paths(params)), path
        assert sum(r["size"] for r in rows) == tree["model"]["parameters"]
        for lv in tree["step_clock"]:
            spec = lv["optimizer"]
            for r in lv["parameters"]:
                if lv["every"] == "never":
                    assert r["optimizer"] == "frozen"
                elif spec["name"] in ("muon", "m3", "newton_schulz", "delta_momentum"):
                    want = spec["name"] if r["kind"] == "matrix" else "adamw (fallback)"
                    assert r["optimizer"] == want, (path, r)
                else:
                    assert r["optimizer"] == spec["name"]
        if config.model.mlp == "cms" or config.model.mixer != "attention":
            assert tree["token_clock"], path
        periods = [lv["period"] for lv in tree["token_clock"]]
        keys = [float("inf") if p == "never" else p for p in periods]
        assert keys == sorted(keys, reverse=True), path    # slowest first


def test_levels_command_prints_the_tree_and_writes_json(capsys, tmp_path):
    out = tmp_path / "tree.json"
    code = main(["levels", "--config", "experiments/hope/tiny.py",
                 "--config.levels.default.optimizer.name=muon", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "optimizer muon: learning_rate=0.02 b1=0.95 b2=0.95" in text
    assert "fallback  adamw: learning_rate=0.003" in text
    assert "CMS level 0 (blocks/*/mlp/levels/0): every 32 tokens" in text
    assert "self-modifying M_memory" in text and "trust ratio max_update=0.005" in text
    tree = json.loads(out.read_text())
    rows = {r["path"]: r for r in tree["step_clock"][0]["parameters"]}
    assert rows["embed"]["optimizer"] == "adamw (fallback)"
    assert rows["blocks/0/mixer/convs/q/kernel"]["kind"] == "conv kernel"
    assert rows["blocks/0/mixer/readout/eta/r"]["kind"] == "per-head gate/readout"
    assert rows["blocks/0/mixer/memories/k/w1"]["optimizer"] == "muon"
    assert [lv["name"] for lv in tree["token_clock"]][-1] == "self-modifying M_memory"


def test_levels_command_errors_are_one_line(capsys):
    code = main(["levels", "--config", TINY, "--config.levels.default.optimizer.name=mun"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean muon?" in err and err.count("\n") == 1
    code = main(["levels", "--config", TINY, "--bogus"])
    assert code == 2 and "--bogus" in capsys.readouterr().err


def test_summary_is_the_short_form():
    config = load(TINY, "levels.default.optimizer.name=m3")
    text = levels_lib.summary(small(config))
    assert "optimizer m3: learning_rate=1e-05" in text and "fallback  adamw" in text
    assert "blocks/*/" not in text      # no per-parameter rows
