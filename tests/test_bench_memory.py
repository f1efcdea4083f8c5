"""``bench memory``: the FLOP count it reports and its command line."""

import glob
import json

import jax
import numpy as np
import pytest

from nl_jax.bench import memory as bench


@pytest.mark.parametrize("c, d", [(64, 64), (16, 32), (32, 8)])
def test_chunked_flops_counts_the_matmuls_of_the_blocked_path(c, d):
    # (m, k, n) of each product per chunk and head in linear_chunked._block
    # (_block_forward: the same products, Q M_0^T and Q S_0^T as one GEMM)
    gemms = [(c, c, c),          # G = La (Le theta)
             (c, c, 1),          # f = La m
             (2 * c, d, d),      # [K; Q] M_0^T
             (d, c, 2 * d),      # K^T [G[end] E, Le[end] theta E]
             (c, d, c),          # Q K^T
             (c, c, d),          # ((Q K^T) * G) E
             (c, d, d)]          # Q S_0^T
    per_chunk = sum(2 * m * k * n for m, k, n in gemms)
    assert bench.chunked_flops(5 * c - 1, c, d, b=3, h=2) == 3 * 2 * 5 * per_chunk


def test_writes_the_issue_schema(tmp_path, capsys):
    out = tmp_path / "m" / "memory.json"
    assert bench.main(["--lengths", "64,40", "--batch", "1", "--heads", "2", "--dim", "8",
                       "--chunk", "16", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dense_matmul_gflops"] > 0
    assert result["shape"] == {"B": 1, "H": 2, "d": 8, "C": 16}
    assert result["level"] == "titans_linear" and result["skipped"] == []
    assert {r["level"] for r in result["rows"]} == {"titans_linear"}
    keys = [(r["path"], r["T"], r["mode"]) for r in result["rows"]]
    assert keys == [(p, t, m) for t in (64, 40) for p in ("oracle", "chunked")
                    for m in ("fwd", "fwd_bwd")]
    assert all(r["ms"] > 0 and r["gflops"] > 0 for r in result["rows"])
    assert "B=1 H=2 d=8 C=16" in capsys.readouterr().out


def test_chunked_only_with_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace"
    assert bench.main(["--lengths", "32", "--batch", "1", "--heads", "1", "--dim", "8",
                       "--chunk", "16", "--repeats", "1", "--paths", "chunked",
                       "--trace", str(trace)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("chunked ")]
    assert [r[2] for r in rows] == ["fwd", "fwd_bwd"] and all(r[-1] == "-" for r in rows)
    assert glob.glob(str(trace / "**" / "*.xplane.pb"), recursive=True)


@pytest.mark.parametrize("flags", [["--paths", "scan"], ["--lengths", "2048,x"],
                                   ["--lengths", "0"], ["--chunk", "0"], ["--devices", "0"],
                                   ["--devices", "3"]])
def test_bad_flags_exit_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--level", "mamba"], "--level 'mamba': choose one of titans_linear,titans_mlp,hope,cms,"
                           "deltanet,gated_deltanet"),
    (["--level", "cms", "--paths", "oracle,chunked"],
     "--paths oracle: the cms level has no oracle path (no per-token oracle: its chunk is "
     "its period"),
    (["--level", "cms", "--paths", "kernel"],
     "--paths kernel: the cms level has no kernel path (the in-context CMS levels have no "
     "kernel yet)"),
    (["--level", "cms", "--heads", "4"], "--heads: the cms level has no such size"),
    (["--level", "titans_mlp", "--memory-chunk", "8"], "--memory-chunk: the titans_mlp level"),
    (["--expansion", "2"], "--expansion: the titans_linear level has no such size"),
    (["--level", "hope", "--expansion", "0"], "--expansion must be >= 1"),
    (["--level", "hope", "--oracle-bwd-max-length", "-1"], "--oracle-bwd-max-length must"),
    (["--level", "cms", "--batch", "3", "--devices", "2"],
     "--devices 2: the batch of 3 cannot be split 2 ways")])
def test_a_level_without_that_path_or_size_is_one_error_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("level, flags, paths", [
    ("titans_mlp", ["--heads", "2", "--dim", "8", "--expansion", "2", "--chunk", "16",
                    "--lengths", "40"], ("oracle", "chunked")),
    # Hope's chunked backward takes ~15 s of CPU to compile even at this size, so
    # the oracle here; the next test traces the chunked path's arguments and
    # gradients, tests/test_self_modifying.py tests the path itself
    ("hope", ["--heads", "2", "--dim", "8", "--chunk", "8", "--memory-chunk", "4",
              "--lengths", "20", "--paths", "oracle"], ("oracle",)),
    ("cms", ["--dim", "8", "--expansion", "2", "--chunk", "8", "--lengths", "20"],
     ("chunked",)),
    ("gated_deltanet", ["--heads", "2", "--dim", "8", "--memory-chunk", "8",
                        "--lengths", "20"], ("oracle", "chunked"))])
def test_every_level_end_to_end(level, flags, paths, tmp_path, capsys, monkeypatch):
    """Tiny shapes, lengths that end inside a chunk; JSON rows carry the level."""
    monkeypatch.setattr(bench, "dense_matmul_gflops", lambda: 100.0)   # test_writes_...
    out = tmp_path / f"{level}.json"
    assert bench.main(["--level", level, "--batch", "2", "--repeats", "1",
                       "--json", str(out)] + flags) == 0
    result = json.loads(out.read_text())
    assert result["level"] == level
    assert [(r["level"], r["path"], r["mode"]) for r in result["rows"]] == [
        (level, p, m) for p in paths for m in ("fwd", "fwd_bwd")]
    assert all(r["ms"] > 0 and r["gflops"] > 0 for r in result["rows"])
    text = capsys.readouterr().out
    assert f"level {level}: B=2" in text
    if level == "cms":
        assert result["shape"] == {"B": 2, "d": 8, "C": 8, "expansion": 2, "d_ff": 16}
        assert "cms: no per-token oracle" in text
    elif level == "titans_mlp":
        summary = [line.split() for line in text.splitlines() if line.startswith(level)]
        assert [s[:2] for s in summary] == [[level, "40"]]
        assert all(s.endswith("x") for s in summary[0][2:])


def test_fwd_bwd_differentiates_inputs_and_initial_weights():
    """For every level the gradient covers every argument: the initial weights
    (Hope: and the gate read-outs; CMS: and the learning-rate projection) and
    every input (traced only: compiling Hope's backward takes seconds)."""
    shapes = {"titans_linear": dict(h=1), "titans_mlp": dict(h=1, expansion=2),
              "hope": dict(h=1, memory_chunk=4), "cms": dict(expansion=2)}
    counts = {}
    for level, shape in shapes.items():
        _, fwd_bwd, args = bench.functions("chunked", 12, b=1, d=4, c=8, level=level,
                                           **shape)
        grads = jax.eval_shape(fwd_bwd, *args)
        assert jax.tree.structure(grads) == jax.tree.structure(tuple(args))
        assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
            lambda a: (a.shape, a.dtype), tuple(args))
        counts[level] = len(jax.tree.leaves(grads))
    # q, k, v, theta, eta, alpha + W (linear) or W1, W2; Hope: u, q, log beta, the 5
    # memories' W1, W2 and the eta, alpha read-outs (r, b); CMS: x, 3 weights, w, b
    assert counts == {"titans_linear": 7, "titans_mlp": 8, "hope": 17, "cms": 6}


def test_slow_oracle_backward_is_skipped_above_its_length(tmp_path, capsys, monkeypatch):
    calls = []

    def measure(path, t, repeats, level, modes, mesh=None, **shape):
        calls.append((path, t, modes))
        return [{"level": level, "path": path, "T": t, "mode": m, "ms": 1.0, "gflops": 1.0,
                 "devices": 1} for m in modes]

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "dense_matmul_gflops", lambda: 100.0)
    out = tmp_path / "hope.json"
    assert bench.main(["--level", "hope", "--lengths", "2048,4096", "--devices", "1",
                       "--json", str(out)]) == 0
    assert calls == [("oracle", 2048, ("fwd", "fwd_bwd")), ("chunked", 2048, ("fwd", "fwd_bwd")),
                     ("oracle", 4096, ("fwd",)), ("chunked", 4096, ("fwd", "fwd_bwd"))]
    result = json.loads(out.read_text())
    assert result["skipped"] == [{"level": "hope", "path": "oracle", "T": 4096,
                                  "mode": "fwd_bwd",
                                  "reason": "T > --oracle-bwd-max-length 2048"}]
    assert result["shape"] == {"B": 2, "H": 4, "d": 64, "C": 32, "expansion": 1,
                               "memory_C": 16}
    text = capsys.readouterr().out
    assert "oracle     4096 fwd_bwd  skipped: T > --oracle-bwd-max-length 2048" in text
    assert [line.split() for line in text.splitlines() if line.startswith("hope ")] == [
        ["hope", "2048", "1.0x", "1.0x"], ["hope", "4096", "1.0x", "-"]]
    calls.clear()
    assert bench.main(["--level", "hope", "--lengths", "4096", "--devices", "1",
                       "--oracle-bwd-max-length", "0", "--paths", "oracle"]) == 0
    assert calls == [("oracle", 4096, ("fwd", "fwd_bwd"))]


def test_sharded_over_heads_and_batch_equals_one_device():
    """The default CPU layout of the benchmark: same values and gradients as one
    device; heads alone on the mesh need no collectives."""
    shape = dict(b=2, h=2, d=8, c=16)
    fwd, fwd_bwd, args = bench.functions("chunked", 40, **shape)
    for devices, collectives in ((2, False), (4, True)):   # 4: heads over 2, batch over 2
        mesh = bench.head_mesh(devices, 2, 2)
        assert dict(mesh.shape) == {"data": devices // 2, "tensor": 2}
        s_fwd, s_fwd_bwd, s_args = bench.functions("chunked", 40, mesh=mesh, **shape)
        assert s_args[1].sharding.num_devices == devices
        np.testing.assert_allclose(s_fwd(*s_args)[0], fwd(*args)[0], atol=1e-6)
        for got, want in zip(jax.tree.leaves(s_fwd_bwd(*s_args)),
                             jax.tree.leaves(fwd_bwd(*args)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        hlo = s_fwd_bwd.lower(*s_args).compile().as_text()
        kinds = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                 "reduce-scatter")
        assert any(kind in hlo for kind in kinds) == collectives


def test_devices_flag_in_rows_and_json(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert bench.main(["--lengths", "32", "--batch", "2", "--heads", "1", "--dim", "8",
                       "--chunk", "16", "--repeats", "1", "--devices", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["devices"] == 2 and {r["devices"] for r in result["rows"]} == {2}
    assert "2 devices (batch over 2, heads over 1)" in capsys.readouterr().out


@pytest.mark.parametrize("devices, batch, heads, message", [
    (3, 2, 4, r"cannot be split 3 ways; use one of \[1, 2, 4, 8\]"),
    (64, 2, 4, "devices are available")])
def test_impossible_device_layouts_name_the_flag(devices, batch, heads, message):
    with pytest.raises(ValueError, match=message) as info:
        bench.head_mesh(devices, batch, heads)
    assert f"--devices {devices}" in str(info.value)


def test_default_devices_split_batch_times_heads(monkeypatch):
    monkeypatch.setattr(bench, "cores", lambda: 4)
    assert jax.device_count() >= 4       # conftest: 8 host devices
    assert bench.default_devices(2, 4) == 4
    assert bench.default_devices(1, 3) == 3
    assert bench.default_devices(1, 1) == 1
    assert bench.default_devices(3, 1) == 3
