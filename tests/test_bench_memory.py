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
            if line.startswith("chunked")]
    assert [r[2] for r in rows] == ["fwd", "fwd_bwd"] and all(r[-1] == "-" for r in rows)
    assert glob.glob(str(trace / "**" / "*.xplane.pb"), recursive=True)


@pytest.mark.parametrize("flags", [["--paths", "scan"], ["--lengths", "2048,x"],
                                   ["--lengths", "0"], ["--chunk", "0"], ["--devices", "0"],
                                   ["--devices", "3"]])
def test_bad_flags_exit_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2


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
