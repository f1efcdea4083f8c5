"""Continual learning: the forgetting metrics (one definition, shared with
``bench schedules --shift``) and one tiny ``bench forgetting`` run."""

import json
import math
import re

import pytest

from nl_jax.bench import forgetting
from nl_jax.errors import UserError

# Held-out loss on domain j (columns) after stage i (rows); j > i: not trained yet.
MATRIX = [[2.0, 5.0, 6.0, 7.0],
          [2.5, 1.5, 6.0, 7.0],
          [2.2, 1.8, 1.0, 7.0],
          [3.0, 1.6, 1.4, 0.9]]


def test_forgetting_matches_the_hand_computed_matrix():
    # domain 0: final 3.0, best over stages 0..2 = min(2.0, 2.5, 2.2) = 2.0 -> 1.0
    # domain 1: final 1.6, best over stages 1..2 = min(1.5, 1.8) = 1.5 -> 0.1
    # domain 2: final 1.4, best over stage 2 = 1.0 -> 0.4
    assert forgetting.forgetting_per_domain(MATRIX) == pytest.approx([1.0, 0.1, 0.4])
    assert forgetting.average_forgetting(MATRIX) == pytest.approx(0.5)
    assert forgetting.final_average_loss(MATRIX) == pytest.approx((3.0 + 1.6 + 1.4 + 0.9) / 4)
    # the entries above the diagonal (domains not trained yet) are used by no metric
    ragged = [row[:i + 1] for i, row in enumerate(MATRIX)]
    assert forgetting.forgetting_per_domain(ragged) == forgetting.forgetting_per_domain(MATRIX)
    assert forgetting.final_average_loss(ragged) == forgetting.final_average_loss(MATRIX)


def test_backward_transfer_is_negative_and_one_stage_has_no_forgetting():
    assert forgetting.forgetting_per_domain([[2.0], [1.5, 1.0]]) == [-0.5]
    assert forgetting.forgetting_per_domain([[2.0]]) == []
    assert math.isnan(forgetting.average_forgetting([[2.0]]))
    assert forgetting.final_average_loss([[2.0]]) == 2.0


def test_two_stages_give_schedules_shift_forgetting():
    """``bench schedules --shift``: forgetting = eval_loss (end) - eval_loss_mid."""
    mid, end, shift = 2.75, 3.125, 1.5
    assert forgetting.average_forgetting([[mid], [end, shift]]) == end - mid


TINY = ["--override", "model.d_model=32", "--override", "model.n_layers=1",
        "--override", "model.d_ff=64", "--override", "model.n_heads=2"]


@pytest.fixture
def domains(tmp_path):
    paths = []
    for name, words in (("1_cats", "the cat sat on the mat and purred. "),
                        ("2_ships", "ships sail far over grey seas at dawn! "),
                        ("3_sums", "two and two make four; three and three make six. ")):
        path = tmp_path / f"{name}.txt"
        path.write_text(words * 60)
        paths.append(str(path))
    return paths


def test_hope_rows_get_their_cms_schedules():
    args = forgetting.parse_args(["--configs", "hope", "--hope_cms", "32;8,never@4"])
    rows = forgetting.models(args)
    assert [r["model"] for r in rows] == ["hope_cms1", "hope_cms2"]
    assert rows[0]["cfg"].model.cms.periods == (32,)
    assert rows[1]["cfg"].model.cms.periods == (8, "never")
    assert set(rows[1]["levels"]) == {"cms_level_1", "default"}      # never@4: step clock
    assert rows[1]["levels"]["cms_level_1"]["every"] == 4
    assert rows[0]["cfg"].model.d_model == 64                         # the default shape


def test_bench_forgetting_end_to_end(domains, tmp_path, capsys):
    out = tmp_path / "f.json"
    argv = ["--configs", "transformer", "--domains", ",".join(domains),
            "--steps_per_stage", "2", "--batch", "2", "--seq_len", "16",
            "--eval_batches", "1", *TINY, "--json", str(out)]
    assert forgetting.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["domains"] == ["cats", "ships", "sums"]
    (row,) = result["rows"]
    assert {"model", "avg_forgetting", "final_avg_loss", "matrix"} <= set(row)
    m = row["matrix"]
    assert row["model"] == "transformer" and len(m) == 3 and all(len(r) == 3 for r in m)
    assert row["avg_forgetting"] == pytest.approx(
        ((m[2][0] - min(m[0][0], m[1][0])) + (m[2][1] - m[1][1])) / 2)
    assert row["final_avg_loss"] == pytest.approx(sum(m[2]) / 3)
    assert len(row["losses"]) == 6
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "avg_forgetting" in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(UserError, match="never overwritten"):
        forgetting.main(argv)
    assert out.read_text() == before


@pytest.mark.parametrize("flags, needle", [
    (["--domains", "only_one.txt"], "at least 2 text files"),
    (["--domains", "nowhere_a.txt,nowhere_b.txt"], "cannot read domain text nowhere_a.txt"),
    (["--hope_cms", "128"], "a period of 128 tokens never fires"),
    (["--configs", "nope"], "unknown config 'nope'"),
    (["--steps_per_stage", "0"], "--steps_per_stage must be a positive integer"),
])
def test_bench_forgetting_mistakes(flags, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        forgetting.main(flags)
