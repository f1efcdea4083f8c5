"""Prepared token shards (``data prepare``) and training from them (data.prepared)."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from experiments import base
from nl_jax import config as config_lib
from nl_jax.data import pipeline, prepared, text_files, token_cache
from nl_jax.data import tokenizer as tok_lib
from nl_jax.errors import DataError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "nl_jax", "data", "assets")
BPE_PATH = os.path.join(ASSETS, "tokenizer", "bpe_2k.json")
ALICE = os.path.join(ASSETS, "corpus", "train", "pg11_alice_in_wonderland.txt")
TOK_CFG = {"kind": "bpe_json", "path": BPE_PATH}
SHARD_TOKENS = 4000
MANIFEST_NAME = prepared.MANIFEST


@pytest.fixture(scope="module")
def bpe():
    return tok_lib.load_tokenizer(TOK_CFG, REPO)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """30 plain-text documents of 1-8 KB of Alice (about 40K tokens), and the
    folder holding them."""
    text = text_files.read_text(ALICE)
    folder = tmp_path_factory.mktemp("docs")
    sizes = np.random.default_rng(0).integers(1000, 8000, size=30)
    start = 0
    for i, size in enumerate(sizes):
        (folder / f"doc{i:02d}.txt").write_text(text[start:start + size], encoding="utf-8")
        start += size
    return folder


@pytest.fixture(scope="module")
def shards(docs, tmp_path_factory):
    """The documents prepared in shards of about SHARD_TOKENS tokens."""
    out = tmp_path_factory.mktemp("prep") / "shards"
    manifest = prepared.prepare([str(docs / "*.txt")], str(out), TOK_CFG, base_dir=REPO,
                                workers=1, shard_tokens=SHARD_TOKENS, progress=False)
    assert len(manifest["shards"]) >= 5 and manifest["documents"] == 30
    return out


def _data_cfg(docs, cache_dir, prepared_dir="", *, seq_len=32, batch_size=8, tok=TOK_CFG):
    return ml_collections.ConfigDict(dict(
        train_files=(str(docs / "*.txt"),), eval_files=(str(docs / "*.txt"),),
        tokenizer=dict(tok), cache_dir=str(cache_dir), prepared=str(prepared_dir),
        seq_len=seq_len, batch_size=batch_size))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
               for k in ("inputs", "targets"))


def _error_line(call) -> str:
    """The message a UserError raised by `call` prints, checked to be one line."""
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


# -- the same stream as the text path --------------------------------------------

def test_prepared_stream_equals_the_text_path_token_for_token(docs, shards, bpe, tmp_path):
    text_cfg = _data_cfg(docs, tmp_path / "cache")
    cache = pipeline.corpus_tokens(text_cfg.train_files, bpe, base_dir=REPO,
                                   cache_dir=None, key="data.train_files")
    corpus = prepared.open_corpus(str(shards), bpe, TOK_CFG)
    assert corpus.tokens.size == cache.tokens.size
    np.testing.assert_array_equal(np.asarray(corpus.tokens), cache.tokens)
    # windows cross document and shard boundaries; random positions too
    ids = np.random.default_rng(1).integers(0, cache.tokens.size, size=(7, 33))
    np.testing.assert_array_equal(corpus.tokens[ids], cache.tokens[ids])
    assert corpus.tokens[-1] == bpe.eos_id and corpus.tokens[3] == cache.tokens[3]
    # same identity: a run started on the text files resumes on their shards
    assert corpus.identity == cache.identity

    text_it = pipeline.build_train_iterator(text_cfg, bpe, seed=3, base_dir=REPO)
    prep_it = pipeline.build_train_iterator(_data_cfg(docs, tmp_path / "cache", shards), bpe,
                                            seed=3, base_dir=REPO)
    assert prep_it.num_windows == text_it.num_windows
    epoch = -(-text_it.num_windows // 8) + 2          # past an epoch boundary
    assert _equal(_take(text_it, epoch), _take(prep_it, epoch))
    assert prep_it.get_state() == text_it.get_state()
    assert prep_it.file_hashes == text_it.file_hashes
    # the checkpointed state restores the prepared stream exactly
    state = prep_it.get_state()
    expected = _take(prep_it, 3)
    again = pipeline.build_train_iterator(_data_cfg(docs, tmp_path / "cache", shards), bpe,
                                          seed=3, base_dir=REPO)
    again.set_state(state)
    assert _equal(_take(again, 3), expected)
    summary = pipeline.token_count_summary(_data_cfg(docs, tmp_path / "c", shards), bpe,
                                           base_dir=REPO)
    assert summary["train"]["tokens"] == cache.tokens.size


def test_two_processes_read_disjoint_rows_that_make_the_batch(docs, shards, bpe, tmp_path,
                                                              monkeypatch):
    cfg = _data_cfg(docs, tmp_path / "cache", shards)
    one = pipeline.build_train_iterator(cfg, bpe, seed=5, base_dir=REPO)
    whole = _take(one, 4)
    stream = pipeline.window_id_stream(one.num_windows, 5)
    reads = {0: [], 1: []}
    real = prepared.PreparedTokens._read_flat
    halves = []
    for p in (0, 1):
        def spy(self, flat, p=p):
            reads[p].append(np.array(flat))
            return real(self, flat)
        monkeypatch.setattr(prepared.PreparedTokens, "_read_flat", spy)
        it = pipeline.build_train_iterator(cfg, bpe, seed=5, base_dir=REPO, process_index=p,
                                           process_count=2)
        halves.append(_take(it, 4))
    for i in range(4):
        for k in ("inputs", "targets"):
            a, b = halves[0][i][k], halves[1][i][k]
            assert a.shape == b.shape == (4, 32)
            np.testing.assert_array_equal(np.concatenate([a, b]), whole[i][k])
    # each process read exactly the tokens of its own rows' windows, nothing else
    for p in (0, 1):
        rows = [stream[i * 8 + j] for i in range(4) for j in range(p * 4, p * 4 + 4)]
        expected = np.asarray(rows)[:, None] * 32 + np.arange(33)
        np.testing.assert_array_equal(np.concatenate(reads[p]).reshape(-1, 33), expected)


def _train_config(tmp_path, docs, shards_dir, steps):
    c = base.get_config()
    c.train.steps = steps
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_batches = 0
    c.train.checkpoint_every = 0
    c.train.sample_tokens = 4
    c.data.train_files = (str(docs / "*.txt"),)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.prepared = str(shards_dir)
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.levels.default.optimizer.schedule.warmup_steps = 2
    config_lib.check_known_keys(c)
    return c


def test_training_on_prepared_shards_gives_the_text_paths_loss_curve(docs, shards, tmp_path):
    from nl_jax.train.loop import train

    curves = []
    for name, folder in (("text", ""), ("prepared", shards)):
        workdir = tmp_path / name
        train(_train_config(tmp_path, docs, folder, 4), str(workdir), devices=jax.devices()[:1])
        with open(workdir / "metrics.jsonl") as f:
            curves.append([r["loss"] for r in map(json.loads, f) if r["split"] == "train"])
    assert len(curves[0]) == 4 and curves[0] == curves[1]


# -- formats and bad records ---------------------------------------------------------

def _jsonl_lines(alice):
    good = [alice[i * 500:(i + 1) * 500] for i in range(6)]
    lines = [json.dumps({"text": good[0], "id": 1}).encode(),
             b'{"text": "unterminated',                            # invalid JSON
             json.dumps({"body": "no text field"}).encode(),        # missing field
             json.dumps({"text": good[1]}).encode(),
             b'{"text": "caf\xe9"}',                                # not UTF-8
             b"",                                                   # blank: skipped
             json.dumps(["not", "an", "object"]).encode(),
             json.dumps({"text": 17}).encode(),                     # not a string
             json.dumps({"text": "  \n"}).encode(),                 # empty text
             json.dumps({"text": good[2] + "\r\nend"}).encode()]
    return lines, [good[0], good[1], good[2] + "\nend"]


def test_jsonl_bad_lines_are_counted_reported_and_never_trained_on(tmp_path, bpe, capsys):
    lines, texts = _jsonl_lines(text_files.read_text(ALICE))
    src = tmp_path / "corpus.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc = prepared.main(["prepare", "--config", "nl_jax/configs/transformer/tiny.py",
                        "--input", str(src), "--out", str(out), "--workers", "1",
                        "--no_progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: skipped 6 bad record(s) of 10" in err
    assert f"{src} line 2: invalid JSON" in err
    manifest = prepared.read_manifest(str(out))
    assert manifest["bad_records"] == {
        "invalid JSON": 1, "no field 'text'": 1, "not UTF-8": 1, "not a JSON object": 1,
        "field 'text' is not a string": 1, "empty text": 1}
    assert manifest["documents"] == 3 and manifest["records"] == 10
    assert manifest["inputs"][0]["sha256"] == text_files.file_sha256(str(src))
    expected = np.concatenate([bpe.encode(t) + [bpe.eos_id] for t in texts])
    tokens = np.asarray(prepared.open_corpus(str(out), bpe, TOK_CFG).tokens)
    np.testing.assert_array_equal(tokens, expected)
    assert '"text"' not in bpe.decode(tokens)


def test_zstd_jsonl_and_parquet_inputs(tmp_path, bpe):
    zstandard = pytest.importorskip("zstandard")
    lines, texts = _jsonl_lines(text_files.read_text(ALICE))
    src = tmp_path / "c.jsonl.zst"
    # two frames: read across frames
    half = len(lines) // 2
    src.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[:half]) + b"\n")
                    + zstandard.ZstdCompressor().compress(b"\n".join(lines[half:]) + b"\n"))
    manifest = prepared.prepare([str(src)], str(tmp_path / "z"), TOK_CFG, base_dir=REPO,
                                workers=1, progress=False)
    assert manifest["documents"] == 3 and sum(manifest["bad_records"].values()) == 6

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"body": texts[:2] + [None], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    manifest = prepared.prepare([str(tmp_path / "c.parquet")], str(tmp_path / "p"), TOK_CFG,
                                base_dir=REPO, text_field="body", workers=1, progress=False)
    assert manifest["documents"] == 2 and manifest["bad_records"] == {"'body' is null": 1}
    tokens = np.asarray(prepared.open_corpus(str(tmp_path / "p"), bpe, TOK_CFG).tokens)
    expected = np.concatenate([bpe.encode(t) + [bpe.eos_id] for t in texts[:2]])
    np.testing.assert_array_equal(tokens, expected)
    message = _error_line(lambda: prepared.prepare(
        [str(tmp_path / "c.parquet")], str(tmp_path / "p2"), TOK_CFG, base_dir=REPO,
        workers=1, progress=False))
    assert "has no column 'text' (columns: body, n); pass --text_field" in message


def test_jsonl_is_refused_as_text_by_prepare_and_by_train_files(tmp_path, bpe):
    src = tmp_path / "corpus.jsonl"
    src.write_text(json.dumps({"text": "some words"}) + "\n")
    message = _error_line(lambda: prepared.main([
        "prepare", "--input", str(src), "--format", "txt", "--out", str(tmp_path / "o")]))
    assert f"--input {src} is a JSON Lines file" in message and "--format jsonl" in message
    assert not (tmp_path / "o").exists()
    cfg = _data_cfg(tmp_path, tmp_path / "cache")
    cfg.train_files = (str(tmp_path / "*.jsonl"),)
    message = _error_line(lambda: pipeline.build_train_iterator(cfg, bpe, seed=0,
                                                                base_dir=REPO))
    assert f"data.train_files: {src} is a JSON Lines file" in message
    assert "data prepare" in message and "data.prepared=DIR" in message


# -- resume, mismatches, damage ---------------------------------------------------------

def _shard_files(folder):
    return {name: text_files.file_sha256(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name.startswith("shard-")
            and not name.endswith(".done.json")}


def test_resume_after_a_kill_gives_identical_shards(docs, shards, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    kwargs = dict(base_dir=REPO, shard_tokens=SHARD_TOKENS, progress=False)
    assert prepared.prepare([str(docs / "*.txt")], str(out), TOK_CFG, workers=1,
                            stop_after_shards=2, **kwargs) is None
    (out / ".shard-00002.array_record.tmp").write_bytes(b"half a shard")  # killed mid-write
    message = _error_line(lambda: prepared.read_manifest(str(out)))
    assert "did not finish; run the same command again" in message
    # the rest in two worker processes, several batches in flight: the same shards
    # as one uninterrupted run in this process
    monkeypatch.setattr(prepared, "BATCH_BYTES", 8000)
    manifest = prepared.prepare([str(docs / "*.txt")], str(out), TOK_CFG, workers=2,
                                **kwargs)
    assert _shard_files(out) == _shard_files(shards)
    reference = prepared.read_manifest(str(shards))
    assert manifest["shards"] == reference["shards"]
    assert manifest["identity"] == reference["identity"]
    # a lost done record: that shard and the later ones are made again, identically
    last = len(manifest["shards"]) - 1
    os.remove(out / MANIFEST_NAME)
    os.remove(out / f"shard-{last:05d}.done.json")
    again = prepared.prepare([str(docs / "*.txt")], str(out), TOK_CFG, workers=1, **kwargs)
    assert again == manifest and _shard_files(out) == _shard_files(shards)
    # other settings for the same folder are refused
    message = _error_line(lambda: prepared.prepare(
        [str(docs / "*.txt")], str(out), TOK_CFG, workers=1, **{**kwargs,
                                                                "shard_tokens": 999}))
    assert "holds a preparation of other inputs or settings (differs in: shard_tokens)" \
        in message


def test_a_manifest_of_another_tokenizer_is_one_error_line(docs, shards, bpe, tmp_path):
    other = tmp_path / "bpe_other.json"
    with open(BPE_PATH, encoding="utf-8") as f:
        other.write_text(json.dumps(json.load(f), indent=1), encoding="utf-8")
    tok_cfg = {"kind": "bpe_json", "path": str(other)}
    other_tok = tok_lib.load_tokenizer(tok_cfg, REPO)
    assert other_tok.fingerprint != bpe.fingerprint
    cfg = _data_cfg(docs, tmp_path / "cache", shards, tok=tok_cfg)
    message = _error_line(lambda: pipeline.build_train_iterator(cfg, other_tok, seed=0,
                                                                base_dir=REPO))
    assert f"data.prepared: {shards} was prepared with tokenizer bpe_json" in message
    assert "set data.tokenizer to the one it was prepared with" in message
    message = _error_line(lambda: prepared.main([
        "prepare", "--verify", "--out", str(shards),
        f"--config.data.tokenizer.path={other}"]))
    assert "was prepared with tokenizer" in message


def test_a_corrupted_shard_is_one_error_line_when_first_read(docs, shards, bpe, tmp_path,
                                                             capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    name = prepared.read_manifest(str(damaged))["shards"][1]["file"]
    data = bytearray((damaged / name).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (damaged / name).write_bytes(bytes(data))
    assert prepared.main(["prepare", "--verify", "--out", str(shards)]) == 0
    assert "verified" in capsys.readouterr().out
    message = _error_line(lambda: prepared.main(["prepare", "--verify", "--out",
                                                 str(damaged)]))
    assert "1 of" in message and name in message and "fails its checksum" in message
    # training opens shards lazily: startup works, the first read of the shard fails
    cfg = _data_cfg(docs, tmp_path / "cache", damaged, batch_size=64)
    it = pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=REPO)
    message = _error_line(lambda: _take(it, 40))
    assert f"prepared shard {damaged / name} ({name}) fails its checksum" in message
    assert "data prepare --verify" in message


def test_config_key_and_command_line(tmp_path, docs):
    c = base.get_config()
    assert c.data.prepared == ""
    c = config_lib.apply_overrides(c, [("data.prepared", str(tmp_path))])
    config_lib.check_known_keys(c)
    assert c.data.prepared == str(tmp_path)
    assert "data prepare" in prepared.HELP
    message = _error_line(lambda: prepared.main(["prepare", "--input", "x.txt"]))
    assert "--out DIR is required" in message
    message = _error_line(lambda: prepared.main(["prepare", "--input", str(docs / "*.txt"),
                                                 "--out", str(tmp_path / "o"),
                                                 "--shard_tokens", "0"]))
    assert "--shard_tokens must be a positive integer" in message
    message = _error_line(lambda: prepared.main(["shuffle"]))
    assert "unknown subcommand 'shuffle'" in message
    cfg = _data_cfg(docs, tmp_path / "cache", tmp_path / "missing")
    message = _error_line(lambda: pipeline.build_train_iterator(
        cfg, tok_lib.load_tokenizer(TOK_CFG, REPO), seed=0, base_dir=REPO))
    assert "data.prepared" in message and "not a folder" in message


def test_text_files_refuse_structured_names_only(tmp_path):
    for name in ("a.jsonl", "b.json", "c.parquet", "d.txt.gz", "e.zst"):
        (tmp_path / name).write_text("x")
        with pytest.raises(DataError, match="not a plain-text document"):
            text_files.resolve_files(str(tmp_path / name), REPO, key="k")
    (tmp_path / "f.md").write_text("x")
    assert text_files.resolve_files(str(tmp_path / "f.md"), REPO, key="k")
    assert token_cache.token_dtype(2048) == np.uint16
