"""lm-evaluation-harness adapter: log-likelihoods against the model's logits,
padding and buckets, the bundled tasks, and `eval --tasks` end to end."""

import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.__main__ import main
from nl_jax.eval import tasks as tasks_lib
from nl_jax.eval.harness import NLJaxLM
from tests.test_generate import model

MAX_LEN = 8


class CharTokenizer:
    """One token per character (ids 1..63), eos 0: prefixes encode to prefixes."""
    eos_id = 0
    vocab_size = 64

    def encode(self, text):
        return [ord(c) % 63 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i % 26) for i in ids)


ORACLE_LEN = 48
_forward = {}


def log_probs(model_def, params, ids):
    """[len(ids), vocab] next-token log-probabilities of one pass over ids (in a
    fixed window of ORACLE_LEN tokens, one compile: the padding after the text
    changes no logit of a causal model)."""
    assert len(ids) <= ORACLE_LEN
    if id(model_def) not in _forward:
        _forward[id(model_def)] = jax.jit(lambda p, x: model_def.bind(p)(x)[0][0])
    window = np.zeros((1, ORACLE_LEN), np.int32)
    window[0, :len(ids)] = ids
    logits = _forward[id(model_def)](params, jnp.asarray(window))[:len(ids)]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


def oracle(model_def, params, context, continuation):
    ids = list(context) + list(continuation)
    lp = log_probs(model_def, params, ids[:-1])
    pos = range(len(context) - 1, len(ids) - 1)
    ll = sum(lp[p, ids[p + 1]] for p in pos)
    return ll, all(int(np.argmax(lp[p])) == ids[p + 1] for p in pos)


REQUESTS = [("The cat", " sat"), ("", "Hello"), ("a b c ", "d"),
            ("Once upon a", " time there was a cat"),     # 1 + 2 windows of 8
            ("x", "yz"), ("A long context that spans windows", " and more")]


@pytest.mark.parametrize("family", ["hope", "transformer"])
def test_loglikelihood_is_the_sum_of_the_models_token_log_probs(family):
    """The adapter's (log-likelihood, is_greedy) of each request, batched 4 rows at
    a time and right-padded to windows of 4 or 8 tokens, equals the sum of
    log_softmax(logits) over the continuation of one unpadded pass over the text
    alone: Hope (like Titans) reads texts longer than the 8-token window segment
    by segment, memory carried, so every request is exact; attention keeps the
    last 8 tokens."""
    model_def, params = model(family)
    buckets = (8,) if family == "hope" else (4, 8)     # (one compile less for Hope)
    lm = NLJaxLM(model_def, params, CharTokenizer(), max_len=MAX_LEN, buckets=buckets,
                 batch_size=4)
    assert lm.scorer.stream is (family != "transformer")
    got = lm.loglikelihood(REQUESTS)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got, strict=True):
        ctx, cont = lm.encode_pair(context, continuation)
        assert ctx + cont == (lm.tokenizer.encode(context + continuation) or [0]) or not context
        if not lm.scorer.stream and len(ctx) + len(cont) - 1 > MAX_LEN:
            continue           # the window version: test_attention_rolling_windows
        want_ll, want_greedy = oracle(model_def, params, ctx, cont)
        assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    shapes = lm.scorer.compiled_shapes           # (rows, window, with a carried state)
    assert {(4, b, False) for b in buckets} <= shapes
    assert ((4, 8, True) in shapes) is lm.scorer.stream
    # the greedy continuation is greedy: score the model's own argmax tokens
    ctx = lm.tokenizer.encode("Some text")
    lp = log_probs(model_def, params, ctx)
    best = int(np.argmax(lp[-1]))
    assert lm.loglikelihood_tokens([(ctx, [best])])[0][1] is True
    assert lm.loglikelihood_tokens([(ctx, [(best + 1) % 64])])[0][1] is False


def harness_rolling_windows(tokens, prefix, max_seq_len):
    """lm-eval 0.4.13's get_rolling_token_windows(context_len=1) + make_disjoint_window."""
    pred_len, predicted, out = max_seq_len, 0, []
    first = min(max_seq_len, len(tokens))
    out.append(([prefix] + tokens[:first - 1], tokens[:first]))
    predicted += first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        out.append((tokens[end - max_seq_len - 1:end - 1], tokens[end - n:end]))
        predicted += n
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in out]


def test_attention_rolling_windows_are_the_harness_windows():
    """An attention model scores a 21-token text as the harness does: disjoint
    windows, each read with the 8 tokens before its last prediction."""
    model_def, params = model("transformer")
    lm = NLJaxLM(model_def, params, CharTokenizer(), max_len=MAX_LEN, buckets=(8,))
    text = "abcdefghijklmnopqrstu"
    tokens = lm.tokenizer.encode(text)
    want = 0.0
    for ctx, cont in harness_rolling_windows(tokens, 0, MAX_LEN):
        assert len(ctx) + len(cont) - 1 <= MAX_LEN
        want += oracle(model_def, params, ctx, cont)[0]
    assert lm.loglikelihood_rolling([(text,)])[0] == pytest.approx(want, rel=1e-5)


# -- the bundled tasks -------------------------------------------------------------

SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "copa": 100,
         "openbookqa": 500, "piqa": 1838, "winogrande": 1267, "lambada_openai": 5153}


def test_bundled_tasks_load_with_the_harness_prompts():
    for name, size in SIZES.items():
        assert len(tasks_lib.TASKS[name].load()) == size, name
    arc = tasks_lib.TASKS["arc_easy"]
    doc = arc.load()[1]
    assert tasks_lib.requests_for(arc, doc)[1] == (
        "Question: Which piece of safety equipment is used to keep mold spores from entering "
        "the respiratory system?\nAnswer:", " breathing mask")
    boolq = tasks_lib.TASKS["boolq"]
    ctx, cont = tasks_lib.requests_for(boolq, boolq.load()[0])[1]
    assert ctx.endswith("\nQuestion: does ethanol take more energy make that produces?"
                        "\nAnswer:") and not ctx.startswith("Passage:") and cont == " yes"
    copa = tasks_lib.TASKS["copa"]
    assert tasks_lib.requests_for(copa, copa.load()[0]) == [
        ("The man turned on the faucet, therefore", "  the toilet filled with water."),
        ("The man turned on the faucet, therefore", "  water flowed from the spout.")]
    wino = tasks_lib.TASKS["winogrande"]
    assert tasks_lib.requests_for(wino, wino.load()[0]) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier "
         "cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier "
         "cases.")]
    lam = tasks_lib.TASKS["lambada_openai"]
    ctx, cont = tasks_lib.requests_for(lam, lam.load()[0])[0]
    assert cont == " signs" and ctx.endswith("I don't care about")
    pages = tasks_lib.TASKS["wikitext"].load()
    assert pages[0]["page"].startswith(" = Robert <unk> = \n") and 55 < len(pages) < 70
    assert sum(p["page"].count("\n") for p in pages) == 4358 - 1   # every line, once


def test_metrics_are_the_harness_aggregates():
    """acc / acc_norm (log-likelihood per character) and the perplexities, by hand."""
    piqa = tasks_lib.TASKS["piqa"]
    doc = {"goal": "g", "sol1": "aaaa", "sol2": "b", "gold": 0}
    # sol1: -4 over 4 chars (-1/char); sol2: -2 over 1 char: acc picks 1, acc_norm 0
    assert tasks_lib.doc_metrics(piqa, doc, [(-4.0, False), (-2.0, False)]) == {
        "acc": 0.0, "acc_norm": 1.0}
    assert tasks_lib.aggregate("perplexity", [-1.0, -3.0])[0] == pytest.approx(math.e ** 2)
    assert tasks_lib.aggregate("word_perplexity", [(-6.0, 2), (-4.0, 3)])[0] == \
        pytest.approx(math.e ** 2)
    assert tasks_lib.aggregate("bits_per_byte", [(-math.log(2) * 8, 4)])[0] == \
        pytest.approx(2.0)
    value, stderr = tasks_lib.aggregate("acc", [1.0, 0.0, 1.0, 1.0])
    assert value == 0.75 and stderr == pytest.approx(0.25)


# -- a tiny trained workdir, end to end --------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    flags = ["--config", "experiments/transformer/tiny.py", "--config.train.steps=1",
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


def test_rolling_loglikelihood_matches_evals_loss(workdir):
    """On a text of seq_len + 1 tokens, the adapter's log-likelihood of tokens 1..L
    given token 0 is minus L times the loss of `eval`'s step on that window."""
    from nl_jax.__main__ import _load_run, _restored_trainer
    config, _, _ = _load_run(["--workdir", workdir], "eval")
    config.train.eval_batches = 0
    trainer = _restored_trainer(config, workdir, "eval")
    seq_len = config.data.seq_len
    tokens = trainer.tokenizer.encode("It was the best of times, it was the worst of times, "
                                      "it was the age of wisdom, it was the age of foolishness")
    assert len(tokens) > seq_len
    window = np.asarray(tokens[:seq_len + 1], np.int32)
    batch = {"inputs": np.tile(window[:-1], (8, 1)), "targets": np.tile(window[1:], (8, 1))}
    total, count = trainer.eval_step(trainer.state["params"], trainer.device_batch(batch))
    loss = float(total) / float(count)
    lm = NLJaxLM(trainer.model_def, trainer.state["params"], trainer.tokenizer, max_len=seq_len)
    (ll, _), = lm.loglikelihood_tokens([(list(window[:1]), list(window[1:]))])
    assert -ll / seq_len == pytest.approx(loss, rel=1e-5)


def test_eval_tasks_end_to_end(workdir, capsys, tmp_path):
    out_json = tmp_path / "result.json"
    argv = ["eval", "--workdir", workdir, "--tasks", "copa,wikitext,lambada_openai",
            "--limit", "3"]
    assert main([*argv, "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("|Tasks") and "not comparable" in err
    printed = json.loads(out.strip().splitlines()[-1])
    saved = json.loads(out_json.read_text())
    assert saved["tasks"] == printed["tasks"]
    assert printed["checkpoint_step"] == saved["step"] == 1 and printed["seq_len"] == 32
    assert set(printed["tasks"]) == {"copa", "wikitext", "lambada_openai"}
    assert set(printed["tasks"]["copa"]) == {"acc"}
    assert set(printed["tasks"]["wikitext"]) == {"word_perplexity", "byte_perplexity",
                                                 "bits_per_byte"}
    assert 0.0 <= printed["tasks"]["copa"]["acc"] <= 1.0
    assert saved["results"]["n-samples"]["copa"] == {"original": 100, "effective": 3}
    evals = list((Path(workdir) / "evals").iterdir())
    assert [json.loads(f.read_text())["tasks"] for f in evals] == [printed["tasks"]]
    # --json never overwrites
    before = out_json.read_text()
    code = main([*argv, "--json", str(out_json)])
    err = capsys.readouterr().err
    assert code == 2 and "never overwritten" in err and err.count("\n") == 1
    assert out_json.read_text() == before


def test_result_files_are_never_overwritten(tmp_path):
    from nl_jax.eval import results
    paths = [results.save(str(tmp_path), "step1-tasks-copa-limit3", {"n": n})[0]
             for n in range(3)]
    assert [os.path.basename(p) for p in paths] == [
        "step1-tasks-copa-limit3.json", "step1-tasks-copa-limit3-2.json",
        "step1-tasks-copa-limit3-3.json"]
    assert [json.loads(Path(p).read_text())["n"] for p in paths] == [0, 1, 2]
    assert sorted(os.listdir(tmp_path / "evals")) == sorted(os.path.basename(p) for p in paths)


@pytest.mark.parametrize("flags, needle", [
    (["--tasks", "copa,nonsense"], "unknown task 'nonsense'; available: paper, arc_easy"),
    (["--tasks", "hellaswag"], "'hellaswag' is not bundled"),
    (["--tasks", "copa", "--limit", "0"], "--limit must be a positive integer"),
    (["--tasks", "copa", "--limit", "2.5"], "--limit must be a positive integer"),
    (["--tasks", "copa", "--batches", "1"], "use one or the other"),
])
def test_eval_tasks_mistakes_are_one_error_line(workdir, capsys, flags, needle):
    code = main(["eval", "--workdir", workdir, *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_task_data_and_checkpoint_are_one_error_line(workdir, capsys, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(tasks_lib, "DATA_DIR", str(tmp_path / "nowhere"))
    code = main(["eval", "--workdir", workdir, "--tasks", "piqa"])
    err = capsys.readouterr().err
    assert code == 2 and "piqa_valid.jsonl.xz, which is missing" in err
    assert err.count("\n") == 1
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    code = main(["eval", "--workdir", str(empty), "--tasks", "copa"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and err.count("\n") == 1


def test_the_harness_gives_the_same_numbers(workdir):
    """Where lm-eval 0.4.13 is installed (the lm_eval extra): its evaluator, with
    the registered model and the bundled task YAMLs, reproduces `eval --tasks`."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nl_jax import lm_eval as entry
    os.environ.update(entry.OFFLINE)
    cls = entry.register()
    names = ["copa", "winogrande", "wikitext", "arc_easy"]
    lm = cls(workdir=workdir)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        entry.write_task_yamls(folder)
        got = lm_eval.simple_evaluate(model=lm, tasks=names, limit=3, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=folder))
    ours = tasks_lib.evaluate(lm, names, limit=3)
    theirs = tasks_lib.summary(got)
    for name, metrics in tasks_lib.summary(ours).items():
        for metric, value in metrics.items():
            assert theirs[name][metric] == pytest.approx(value, rel=1e-5), (name, metric)
