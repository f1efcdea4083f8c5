"""Strict config files: unknown keys, wrong types and errors inside get_config()
are one `error:` line naming the key/file (exit 2); every shipped config loads."""

import glob
import os
import pathlib

import pytest

from nl_jax import config as config_lib
from nl_jax.__main__ import main
from nl_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.relpath(p, REPO)
                 for p in glob.glob(os.path.join(REPO, "experiments", "**", "*.py"),
                                    recursive=True)
                 if "def get_config" in pathlib.Path(p).read_text(encoding="utf-8"))


def test_every_shipped_config_loads_strictly():
    assert "experiments/hope/tiny.py" in SHIPPED and "experiments/titans/760m.py" in SHIPPED
    assert len(SHIPPED) >= 15
    # A config that takes an argument is loaded with each of its arguments.
    from experiments.baselines import paper
    specs = [p for p in SHIPPED if p != "experiments/baselines/paper.py"] + [
        f"experiments/baselines/paper.py:{m},{s}" for m in paper.MIXERS for s in paper.SHAPES]
    for spec in specs:
        config = config_lib.load_config_file(spec)       # strict by default
        config_lib.check_known_keys(config, source=spec)
        assert config.model.d_model > 0, spec


def write(tmp_path, body, name="cfg.py"):
    path = tmp_path / name
    path.write_text("from experiments import base\nfrom experiments.hope import tiny\n"
                    "from experiments.titans import tiny as titans\n\n\n"
                    "def get_config():\n" + body)
    return str(path)


def run_train(capsys, tmp_path, path):
    code = main(["train", "--config", path, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()
    return code, err


@pytest.mark.parametrize("body, key, hint", [
    ("    c = base.get_config()\n    c.model.d_modle = 64\n    return c\n",
     "'model.d_modle'", "did you mean model.d_model?"),
    ("    c = base.get_config()\n    c.train.stpes = 5\n    return c\n",
     "'train.stpes'", "did you mean train.steps?"),
    ("    c = base.get_config()\n    c.model.steps = 5\n    return c\n",
     "'model.steps'", "did you mean train.steps?"),
    ("    c = tiny.get_config()\n    c.model.cms.peroids = (16,)\n    return c\n",
     "'model.cms.peroids'", "did you mean model.cms.periods?"),
    ("    c = tiny.get_config()\n    c.model.self_modifying.chunk_sise = 8\n    return c\n",
     "'model.self_modifying.chunk_sise'", "did you mean model.self_modifying.chunk_size?"),
    ("    c = titans.get_config()\n    c.model.memory.windoe = 8\n    return c\n",
     "'model.memory.windoe'", "did you mean model.memory.window?"),
    ("    c = base.get_config()\n    c.levels.default.evry = 2\n    return c\n",
     "'levels.default.evry'", "did you mean levels.default.every?"),
    ("    c = base.get_config()\n    c.levels.default.optimizer.lerning_rate = 1e-3\n"
     "    return c\n", "'lerning_rate'", "did you mean 'learning_rate'?"),
    ("    c = base.get_config()\n    c.levels.default.optimizer.name = 'muom'\n"
     "    return c\n", "'muom'", "did you mean 'muon'?"),
])
def test_unknown_key_in_a_config_file(capsys, tmp_path, body, key, hint):
    path = write(tmp_path, body)
    code, err = run_train(capsys, tmp_path, path)
    assert code == 2
    assert key in err and hint in err and path in err


@pytest.mark.parametrize("body, needle", [
    ("    c = base.get_config()\n    c.model = dict(c.model.to_dict(), n_layers='2')\n"
     "    return c\n", "model.n_layers='2': expected an integer"),
    ("    c = base.get_config()\n    c.train = dict(c.train.to_dict(), seed=1.5)\n"
     "    return c\n", "train.seed=1.5: expected an integer"),
    ("    c = tiny.get_config()\n    c.model.cms = dict(c.model.cms.to_dict(), use_cms=1)\n"
     "    return c\n",
     "model.cms.use_cms=1: expected a boolean"),
    ("    c = base.get_config()\n    c.mesh = dict(data='all', fsdp=1, tensor=1)\n    return c\n",
     "mesh.data='all': expected an integer"),
])
def test_wrong_type_in_a_config_file(capsys, tmp_path, body, needle):
    path = write(tmp_path, body)
    code, err = run_train(capsys, tmp_path, path)
    assert code == 2 and needle in err and path in err


def test_exception_inside_get_config_names_file_and_line(capsys, tmp_path):
    path = write(tmp_path, "    c = base.get_config()\n    x = {}['nope']\n    return c\n")
    code, err = run_train(capsys, tmp_path, path)
    assert code == 2
    assert f"{path} line 8: get_config() raised KeyError: 'nope'" in err


def test_exception_at_import_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import os\nimport no_such_module_here\n\n\ndef get_config():\n"
                    "    return None\n")
    code, err = run_train(capsys, tmp_path, str(path))
    assert code == 2 and f"{path} line 2:" in err and "no_such_module_here" in err


def test_exception_in_a_helper_names_the_helper_too(tmp_path):
    helper = tmp_path / "helper_cfg_mod.py"
    helper.write_text("def make():\n    return 1 / 0\n")
    path = tmp_path / "cfg.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
                    "import helper_cfg_mod\n\n\n"
                    "def get_config():\n    return helper_cfg_mod.make()\n")
    with pytest.raises(ConfigError, match=r"line 7: get_config\(\) raised ZeroDivisionError"):
        config_lib.load_config_file(str(path))


def test_cms_keys_agree_with_the_cms_module():
    """config.CMS_KEYS mirrors the local set of nl_jax/models/cms.py."""
    from flax import nnx

    from nl_jax.models.cms import ContinuumMemory
    config = config_lib.load_config_file("experiments/hope/tiny.py")
    with config.model.unlocked():
        config.model.cms.not_a_key = 1
    with pytest.raises(ConfigError) as e:
        ContinuumMemory(config.model, rngs=nnx.Rngs(0))
    assert f"allowed: {sorted(config_lib.CMS_KEYS)}" in str(e.value)
