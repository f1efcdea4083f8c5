"""``bench memory``: the FLOP count it reports and its command line."""

import glob
import json

import pytest

from nl_jax.bench import memory as bench


@pytest.mark.parametrize("c, d", [(64, 64), (16, 32), (32, 8)])
def test_chunked_flops_counts_the_matmuls_of_the_blocked_path(c, d):
    # (m, k, n) of each product per chunk and head in linear_chunked._block
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
                                   ["--lengths", "0"], ["--chunk", "0"]])
def test_bad_flags_exit_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
