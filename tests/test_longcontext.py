"""Long-context recall: the S-NIAH generator and scorer (``nl_jax/eval/longcontext.py``),
the MQAR generator and scorer (``nl_jax/bench/mqar.py``), and one tiny run of each
command."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from nl_jax.bench import mqar
from nl_jax.config import REPO_ROOT
from nl_jax.configs import base
from nl_jax.data.tokenizer import load_tokenizer
from nl_jax.errors import UserError
from nl_jax.eval import longcontext as lc

TOKENIZER = load_tokenizer(base.get_config().data.tokenizer, REPO_ROOT)


@pytest.fixture(scope="module")
def hay():
    return lc.Haystacks(TOKENIZER)


def occurrences(seq, sub):
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if tuple(seq[i:i + n]) == tuple(sub)]


@pytest.mark.parametrize("name", list(lc.NIAH_TASKS))
def test_exactly_one_needle_at_the_requested_depth(hay, name):
    task = lc.NIAH_TASKS[name]
    tolerance = max(len(s) for s in hay.sentences[task.haystack])   # one sentence
    for length in (400, 1500):
        samples = lc.make_samples(name, hay, [length], [0.0, 0.3, 0.5, 1.0], 2, seed=7)
        for s in samples:
            assert len(s.context_ids) == s.length == length
            instruction, needle, question = lc.templates(task, s.key, s.value)
            needle_ids = TOKENIZER.encode(" " + needle)
            assert occurrences(s.context_ids, needle_ids) == [s.needle_start]
            assert s.needle_len == len(needle_ids)
            assert abs(s.needle_start - s.target_start) <= tolerance
            text = TOKENIZER.decode(list(s.context_ids))
            assert text.count(needle) == 1 and text.endswith(question)
            assert s.value in needle and s.answer_ids == tuple(TOKENIZER.encode(" " + s.value))
            prefix = len(TOKENIZER.encode(instruction))
            if s.depth == 0.0:                 # right after the instruction
                assert s.needle_start == prefix
            if s.depth == 1.0:                 # right before the question
                assert s.needle_start + s.needle_len == length - len(TOKENIZER.encode(question))
    # needle values: a 7-digit number, or a UUID
    pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}" \
        if task.needle == "uuid" else r"[1-9][0-9]{6}"
    assert all(re.fullmatch(pattern, s.value) for s in samples)


def test_samples_are_a_function_of_the_seed(hay):
    a = lc.make_samples("niah_single_2", hay, [300], [0.5], 3, seed=1)
    b = lc.make_samples("niah_single_2", hay, [300], [0.5], 3, seed=1)
    c = lc.make_samples("niah_single_2", hay, [300], [0.5], 3, seed=2)
    assert a == b and a != c
    assert len({s.value for s in a}) == 3 and len({s.context_ids for s in a}) == 3


def test_a_length_too_short_for_the_template_is_a_user_error(hay):
    with pytest.raises(UserError, match="--lengths 40 is shorter than the"):
        lc.make_samples("niah_single_3", hay, [40], [0.5], 1, seed=0)


class Oracle:
    """Reads the needle of the question's key in the context and answers with its
    value (``shift``: a wrong digit); ``loglikelihood_tokens`` as ``NLJaxLM``."""

    def __init__(self, shift=0):
        self.shift = shift

    def loglikelihood_tokens(self, pairs):
        out = []
        for context, answer in pairs:
            text = TOKENIZER.decode(list(context))
            question = text[text.rindex("\nWhat is"):]
            key = re.search(r"for (\S+) mentioned", question)
            needle = (rf"for {re.escape(key.group(1))} is: (\S+)\." if key
                      else r"The pass key is (\d+)\.")
            value = re.search(needle, text).group(1)
            if self.shift:
                value = value[:-1] + str((int(value[-1], 16) + self.shift) % 10)
            guess = TOKENIZER.encode(" " + value)
            out.append((0.0 if guess == list(answer) else -9.0, guess == list(answer)))
        return out


@pytest.mark.parametrize("name", list(lc.NIAH_TASKS))
def test_a_perfect_reader_scores_1_and_a_wrong_one_0(hay, name):
    samples = lc.make_samples(name, hay, [256, 700], [0.0, 0.5, 1.0], 2, seed=3)
    for oracle, expected in ((Oracle(), 1.0), (Oracle(shift=1), 0.0)):
        cells = lc.cells(samples, lc.score(oracle, samples))
        assert len(cells) == 6 and all(c["n"] == 2 for c in cells)
        assert all(c["acc"] == expected for c in cells)
        summary = lc.summary(cells)
        assert summary == {"acc": expected, "acc_len256": expected, "acc_len700": expected}
    table = lc.format_table(name, cells)
    assert table.splitlines()[1].split() == ["length", "0.00", "0.50", "1.00", "all"]


def test_long_context_command_lines_are_recognised():
    assert lc.is_longcontext(["--workdir", "x", "--tasks", "piqa,niah_single_2"])
    assert lc.is_longcontext(["--tasks=niah_single_1"])
    assert not lc.is_longcontext(["--workdir", "x", "--tasks", "piqa"])
    assert not lc.is_longcontext(["--workdir", "x"])


# -- MQAR ------------------------------------------------------------------------------

def test_mqar_keys_unique_and_every_query_answered_by_its_pair():
    rng = np.random.default_rng(0)
    vocab, length = 64, 96
    pairs = np.array([1, 4, 8, 24])
    inputs, targets, mask = mqar.make_batch(rng, 4, length, pairs, vocab)
    assert inputs.shape == targets.shape == mask.shape == (4, length)
    for row, d in enumerate(pairs):
        keys, values = inputs[row, 0:2 * d:2], inputs[row, 1:2 * d:2]
        assert len(set(keys)) == d and keys.min() >= 1 and keys.max() < vocab // 2
        assert values.min() >= vocab // 2 and values.max() < vocab
        answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
        queries = np.flatnonzero(mask[row])
        assert len(queries) == d and queries.min() >= 2 * d and np.all(queries % 2 == 0)
        assert sorted(inputs[row, queries].tolist()) == sorted(keys.tolist())
        for t in queries:
            assert targets[row, t] == answer[int(inputs[row, t])]
        assert not targets[row][~mask[row]].any()


def test_mqar_accuracy_counts_queries():
    _, targets, mask = mqar.make_batch(np.random.default_rng(1), 3, 32, 4, 32)
    perfect = np.eye(32)[targets]                      # one-hot on the answers
    assert mqar.accuracy(perfect, targets, mask) == (12, 12)
    wrong = np.eye(32)[(targets + 1) % 32]
    assert mqar.accuracy(wrong, targets, mask) == (0, 12)
    half = perfect.copy()
    rows, cols = np.nonzero(mask)
    half[rows[::2], cols[::2]] = np.eye(32)[0]
    assert mqar.accuracy(half, targets, mask) == (6, 12)


@pytest.mark.parametrize("length, pairs, vocab, needle", [
    (15, 4, 64, "at least 16"), (64, 8, 16, "vocabulary of at least 18")])
def test_mqar_cells_that_do_not_fit(length, pairs, vocab, needle):
    assert needle in mqar.check_cell(length, pairs, vocab)
    with pytest.raises(UserError, match=needle):
        mqar.make_batch(np.random.default_rng(0), 1, length, pairs, vocab)


TINY = ["--override", "model.d_model=32", "--override", "model.n_layers=1",
        "--override", "model.d_ff=64", "--override", "model.n_heads=2"]


def test_bench_mqar_end_to_end(tmp_path, capsys):
    out = tmp_path / "mqar.json"
    argv = ["--configs", "transformer", "--lengths", "32,64", "--pairs", "2,4,16",
            "--train_length", "32", "--steps", "2", "--batch", "4", "--eval_examples", "6",
            "--vocab", "64", *TINY, "--json", str(out)]
    assert mqar.main(argv) == 0
    result = json.loads(out.read_text())
    cells = {(r["length"], r["pairs"]) for r in result["rows"]}
    assert cells == {(32, 2), (32, 4), (64, 2), (64, 4), (64, 16)}    # 4 x 16 > 32
    assert result["train_pairs"] == [2, 4]
    for r in result["rows"]:
        assert r["model"] == "transformer" and 0.0 <= r["acc"] <= 1.0
        assert r["queries"] == 6 * r["pairs"]
    assert len(result["train"]["transformer"]["losses"]) == 2
    assert (tmp_path / "mqar.png").stat().st_size > 1000
    assert "L=64" in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(UserError, match="never overwritten"):
        mqar.main(argv)
    assert out.read_text() == before


@pytest.mark.parametrize("flags, needle", [
    (["--configs", "nonsense"], "unknown config 'nonsense'"),
    (["--lengths", "0"], "expected positive integers"),
    (["--train_length", "8", "--pairs", "4"], "no --pairs fits --train_length 8"),
    (["--steps", "0"], "--steps must be a positive integer"),
])
def test_bench_mqar_mistakes(flags, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        mqar.main(flags)


# -- NIAH end to end on a tiny trained workdir -------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from nl_jax.__main__ import main
    tmp = tmp_path_factory.mktemp("niah")
    flags = ["--config", "nl_jax/configs/transformer/tiny.py", "--config.train.steps=1",
             "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.train.eval_batches=0", "--config.train.checkpoint_every=0",
             "--config.train.sample_tokens=0", "--config.data.seq_len=32",
             "--config.data.batch_size=8", f"--config.data.cache_dir={tmp / 'cache'}",
             "--config.model.d_model=32", "--config.model.n_layers=1",
             "--config.model.n_heads=2", "--config.model.d_ff=64",
             "--config.levels.default.optimizer.schedule.warmup_steps=1"]
    run = str(tmp / "run")
    assert main(["train", *flags, "--workdir", run]) == 0
    return run


def test_niah_eval_end_to_end(workdir, tmp_path, capsys):
    out = tmp_path / "niah.json"
    argv = ["--workdir", workdir, "--tasks", "niah_single_1,niah_single_3,copa",
            "--lengths", "256,200", "--depths", "1,0", "--samples", "2", "--limit", "2",
            "--json", str(out)]
    assert lc.main(argv) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert printed["tasks"] == saved["tasks"] and saved["checkpoint_step"] == 1
    assert set(saved["tasks"]) == {"niah_single_1", "niah_single_3", "copa"}
    assert set(saved["tasks"]["niah_single_1"]) == {"acc", "acc_len200", "acc_len256"}
    assert saved["lengths"] == [200, 256] and saved["depths"] == [0.0, 1.0]
    assert saved["stream"] is False and saved["seq_len"] == 32
    for name in ("niah_single_1", "niah_single_3"):
        cells = saved["niah"][name]["cells"]
        assert {(c["length"], c["depth"]) for c in cells} == {
            (200, 0.0), (200, 1.0), (256, 0.0), (256, 1.0)}
        assert all(c["n"] == 2 and 0.0 <= c["acc"] <= 1.0 and c["mean_ll"] < 0
                   for c in cells)
    assert saved["results"]["n-samples"]["copa"]["effective"] == 2
    assert "niah_single_3 (S-NIAH-3" in stdout
    assert (tmp_path / "niah.png").stat().st_size > 1000
    evals = os.listdir(os.path.join(workdir, "evals"))
    assert sorted(f.rsplit(".", 1)[1] for f in evals) == ["json", "png"]
    before = out.read_text()
    with pytest.raises(UserError, match="never overwritten"):
        lc.main(argv)
    assert out.read_text() == before


@pytest.mark.parametrize("flags, needle", [
    (["--tasks", "niah_single_1,nonsense"],
     "unknown task 'nonsense'; available: paper, arc_easy"),
    (["--tasks", "niah_single_1", "--samples", "0"], "--samples must be a positive integer"),
    (["--tasks", "niah_single_1", "--limit", "x"], "--limit must be a positive integer"),
    (["--tasks", "niah_single_1", "--depths", "0,1.5"], "in [0, 1]"),
    (["--tasks", "niah_single_1", "--lengths", "10"], "--lengths 10 is shorter than"),
    (["--tasks", "niah_single_1", "--nonsense", "1"], "unknown arguments ['--nonsense'"),
])
def test_niah_mistakes_are_user_errors(workdir, flags, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        lc.main(["--workdir", workdir, *flags])


def test_niah_unknown_task_lists_the_long_context_tasks(workdir):
    with pytest.raises(UserError, match="niah_single_1, niah_single_2, niah_single_3"):
        lc.main(["--workdir", workdir, "--tasks", "niah_single_1,nope"])


def test_niah_missing_haystack_and_checkpoint(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "BOOK", str(tmp_path / "nowhere.txt"))
    with pytest.raises(UserError, match=r"nowhere\.txt, which is missing"):
        lc.main(["--workdir", workdir, "--tasks", "niah_single_2"])
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    with pytest.raises(UserError, match="no checkpoint"):
        lc.main(["--workdir", str(empty), "--tasks", "niah_single_1"])
