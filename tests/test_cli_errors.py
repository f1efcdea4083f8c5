"""Bad input: exit code 2 and one clear message naming the key/file; no traceback."""


import pytest

from nl_jax.__main__ import main

TINY = "experiments/transformer/tiny.py"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.err


@pytest.mark.parametrize("argv, needle", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'; did you mean train.steps"),
    (["--config.train.steps=ten"], "train.steps='ten': expected an integer"),
    (["--config.train.steps=0"], "train.steps: must be a positive integer"),
    (["--config.data.seq_len=-4"], "data.seq_len: must be a positive integer"),
    (["--config.model.n_heads=3"], "model.n_heads: must divide model.d_model=128"),
    (["--config.model.dtype=float16"], "model.dtype: must be 'float32' or 'bfloat16'"),
    (["--config.mesh.data=3"], "mesh: shape {'data': 3, 'fsdp': 1, 'tensor': 1} uses 3 devices"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may be -1"),
    (["--config.model.vocab_size=1000"], "model.vocab_size=1000 does not match the tokenizer"),
    (["--config.model.mixer=lstm"], "model.mixer='lstm' is not known"),
    (["--config.model.attention_window=-1"], "model.attention_window: must be an integer >= 0"),
    (["--config.train.grad_clip_norm=-1"], "train.grad_clip_norm: must be a number >= 0"),
    (["--config.model.mlp=cms"], "model.mlp: 'cms' needs a model.cms group"),
])
def test_bad_config_exits_2_with_message(capsys, tmp_path, argv, needle):
    code, err = run(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"), *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_missing_config_file(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", "experiments/nope.py")
    assert code == 2 and "experiments/nope.py" in err and "not found" in err


@pytest.mark.parametrize("kind, content, needle", [
    ("missing", None, "matches no file"),
    ("empty", b"", "empty"),
    ("binary", b"hello \xff\xfe world", "UTF-8"),
])
def test_bad_data_file(capsys, tmp_path, kind, content, needle):
    path = tmp_path / f"{kind}.txt"
    if content is not None:
        path.write_bytes(content)
    code, err = run(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                    f"--config.data.train_files=('{path}',)",
                    f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert code == 2, err
    assert str(path) in err and needle in err
    assert "Traceback" not in err


def test_unknown_command(capsys):
    code, err = run(capsys, "fly")
    assert code == 2 and "unknown command 'fly'" in err


def test_bare_list_override_parses_each_item():
    from nl_jax import config as config_lib
    c = config_lib.load_config_file("experiments/hope/tiny.py")
    config_lib.apply_overrides(c, [("model.cms.periods", "64, never"),
                                   ("data.train_files", "/data/a*.txt,/data/b.txt")])
    assert tuple(c.model.cms.periods) == (64, "never")
    assert tuple(c.data.train_files) == ("/data/a*.txt", "/data/b.txt")


@pytest.mark.parametrize("bench", ["optimizers", "schedules"])
def test_bench_with_too_little_text_names_the_flag(capsys, bench):
    code, err = run(capsys, "bench", bench, "--max_bytes", "10")
    assert code == 2 and "--max_bytes 10 is below" in err


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--help"], ["default: the run's own", "DIR/config.json"]),
    (["generate", "--help"], ["default: the run's own", "--prompt"]),
    (["bench", "--help"], ["memory", "optimizers", "schedules", "throughput",
                           "bench NAME --help"]),
    (["aot", "--help"], ["--config FILE", "--config.KEY=VALUE", "--topology"]),
    (["levels", "--help"], ["--json PATH", "slowest to fastest"]),
    (["train", "--help"], ["--config.levels.L.optimizer.name=X"]),
])
def test_help_texts(capsys, argv, needles):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in needles), out


def test_bench_name_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "schedules", "--help"])
    assert e.value.code == 0 and "--schedules" in capsys.readouterr().out
