"""Package boundaries: the library runs without the repository's experiments/
folder, imports its kernels only as ``nl_jax_kernels`` (the installed name of
kernels/), and old config files that import ``experiments`` keep working.

The fresh-venv check (``pip install .``, then ``python -m nl_jax bench
optimizers`` from another folder) is slow and needs the package index:
``make check-install`` (tests/check_install.sh), run by hand.
"""

import ast
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from nl_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a copy of nl_jax/ (and kernels/ under its installed name) with no
# experiments/ anywhere: importing experiments (or a top-level kernels) fails as
# if it were absent, even where some path would reach the repository's copy.
NO_EXPERIMENTS = textwrap.dedent("""
    import importlib.abc, json, os, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("experiments", "kernels"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    site, work = sys.argv[1], sys.argv[2]
    import nl_jax
    assert nl_jax.__file__.startswith(site), nl_jax.__file__
    from nl_jax.__main__ import main
    from nl_jax import config as config_lib
    from nl_jax.errors import ConfigError

    # the default config (Hope tiny) ships inside the package and passes the checks
    config = config_lib.load_config_file(config_lib.default_config_path())
    assert config.model.mixer == "self_modifying", config.model.mixer
    config_lib.validate(config, 1)

    # one tiny train step on the bundled corpus, from a folder outside the copy
    os.chdir(work)
    flags = ["--config", "nl_jax/configs/transformer/tiny.py",
             "--config.train.steps=1", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.train.eval_batches=0",
             "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
             "--config.data.seq_len=16", "--config.data.batch_size=2",
             "--config.data.cache_dir=" + os.path.join(work, "cache"),
             "--config.model.d_model=16", "--config.model.n_layers=1",
             "--config.model.n_heads=2", "--config.model.d_ff=32",
             "--config.levels.default.optimizer.schedule.warmup_steps=1"]
    assert main(["train", *flags, "--workdir", "run"]) == 0
    with open(os.path.join("run", "final_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join("run", "config.json")) as f:
        saved = json.load(f)
    import ml_collections
    config_lib.check_known_keys(ml_collections.ConfigDict(saved), source="config.json")

    # a two-step bench optimizers run: its configs and text come from the package
    assert main(["bench", "optimizers", "--steps", "2", "--optimizers", "adamw",
                 "--max_bytes", "20000"]) == 0

    # an old config file that imports experiments gets a hint, not a traceback
    with open("old.py", "w") as f:
        f.write("from experiments import base\\n\\ndef get_config():\\n"
                "    return base.get_config()\\n")
    try:
        config_lib.load_config_file("old.py")
        raise AssertionError("old.py loaded without experiments/")
    except ConfigError as e:
        assert "from nl_jax.configs import base" in str(e), e

    import nl_jax_kernels.linear_memory as kernel
    assert kernel.__file__.startswith(os.path.join(site, "nl_jax_kernels")), kernel.__file__
    assert not [m for m in sys.modules if m.partition(".")[0] in ("experiments", "kernels")]
    print("METRICS", json.dumps(metrics))
""")


def test_library_trains_and_benchmarks_without_experiments(tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPO, "nl_jax"), site / "nl_jax", ignore=ignore)
    shutil.copytree(os.path.join(REPO, "kernels"), site / "nl_jax_kernels", ignore=ignore)
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, "-c", NO_EXPERIMENTS, str(site), str(work)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("METRICS "))
    metrics = json.loads(line.removeprefix("METRICS "))
    assert metrics  # the run wrote its final metrics
    assert "adamw" in result.stdout    # bench optimizers printed its row
    assert not (site / "experiments").exists() and not (work / "experiments").exists()


def _imported_names(path):
    """Module names that ``path`` imports (statements and importlib.import_module
    with a constant or f-string prefix), and whether it changes sys.path."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names, touches_path = [], False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args):
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                names.append(str(arg.value))
            elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                names.append(str(arg.values[0].value))
        elif (isinstance(node, ast.Attribute) and node.attr == "path"
              and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            touches_path = True
    return names, touches_path


def test_library_sources_never_import_experiments_or_top_level_kernels():
    files = glob.glob(os.path.join(REPO, "nl_jax", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "kernels", "*.py"))
    assert len(files) > 50
    bad, path_edits = [], []
    for path in files:
        names, touches_path = _imported_names(path)
        rel = os.path.relpath(path, REPO)
        bad += [f"{rel}: {n}" for n in names
                if n.partition(".")[0] in ("experiments", "kernels")]
        if touches_path and rel != os.path.join("nl_jax", "config.py"):
            path_edits.append(rel)
    assert not bad, bad
    # only the config loader may add a folder to sys.path (a config file's package)
    assert not path_edits, path_edits
    assert any("nl_jax_kernels" in n for n in _imported_names(
        os.path.join(REPO, "nl_jax", "memory", "linear_chunked.py"))[0])


@pytest.mark.parametrize("name", ["base", "transformer/tiny", "titans/tiny", "hope/tiny",
                                  "optimizers/adamw", "optimizers/muon", "optimizers/m3",
                                  "optimizers/delta_momentum", "optimizers/dmgd"])
def test_experiments_reexport_the_bundled_configs(name):
    """experiments/X.py (old paths, old imports) gives the same config as
    nl_jax/configs/X.py, both loaded as --config files."""
    old = config_lib.load_config_file(os.path.join(REPO, "experiments", name + ".py"))
    from nl_jax import configs
    new = config_lib.load_config_file(configs.path(name + ".py"))
    assert old.to_dict() == new.to_dict()


def test_default_config_is_the_bundled_hope_tiny():
    from nl_jax import configs
    path = config_lib.default_config_path()
    assert path == configs.path("hope/tiny.py") and os.path.isfile(path)
    assert path.startswith(os.path.join(REPO, "nl_jax") + os.sep)


def test_config_files_import_their_own_package_and_old_experiments_imports(tmp_path,
                                                                           monkeypatch):
    """A config file inside a package imports its siblings by package name, from
    any working directory; one that does ``from experiments import base`` still
    loads from the repository."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    pkg = tmp_path / "my_cfgs"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "common.py").write_text("STEPS = 7\n")
    (pkg / "sub" / "run.py").write_text(
        "from my_cfgs import common\nfrom nl_jax.configs import base\n\n\n"
        "def get_config():\n    c = base.get_config()\n"
        "    c.train.steps = common.STEPS\n    return c\n")
    old = tmp_path / "old.py"
    old.write_text("from experiments import base\nfrom experiments.hope import tiny\n\n\n"
                   "def get_config():\n    c = tiny.get_config()\n"
                   "    c.train.steps = base.get_config().train.steps + 1\n    return c\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    try:
        assert config_lib.load_config_file(str(pkg / "sub" / "run.py")).train.steps == 7
        assert str(tmp_path) in sys.path       # the folder above the package
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] == "my_cfgs"]:
            del sys.modules[name]
    monkeypatch.chdir(REPO)                    # `python -m nl_jax` from the repository
    monkeypatch.syspath_prepend(REPO)
    config = config_lib.load_config_file(str(old))
    assert config.model.mixer == "self_modifying" and config.train.steps == 301
