"""Data layer: bundled assets, tokenizers, token cache, grain windows, errors."""

from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from experiments.base import get_config
from nl_jax.data import pipeline, text_files, token_cache
from nl_jax.data import tokenizer as tok_lib
from nl_jax.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "nl_jax", "data", "assets")
BPE_PATH = os.path.join(ASSETS, "tokenizer", "bpe_2k.json")
ALICE = os.path.join(ASSETS, "corpus", "train", "pg11_alice_in_wonderland.txt")


@pytest.fixture(scope="module")
def bpe():
    return tok_lib.load_tokenizer({"kind": "bpe_json", "path": BPE_PATH}, REPO)


@pytest.fixture(scope="module")
def alice_text():
    return text_files.read_text(ALICE)


def _corpus(tmp_path, alice_text, chunks=((0, 12000), (12000, 30000)), name="corpus"):
    folder = tmp_path / name
    folder.mkdir()
    for i, (a, b) in enumerate(chunks):
        (folder / f"doc{i}.txt").write_text(alice_text[a:b], encoding="utf-8")
    return folder


def _data_cfg(train, cache_dir, *, seq_len=32, batch_size=8, eval_files=None):
    return ml_collections.ConfigDict(dict(
        train_files=tuple(train), eval_files=tuple(eval_files or train),
        tokenizer=dict(kind="bpe_json", path=BPE_PATH), cache_dir=str(cache_dir),
        seq_len=seq_len, batch_size=batch_size))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b, strict=True)
               for k in ("inputs", "targets"))


# -- bundled assets ---------------------------------------------------------------

def test_bundled_assets_match_sources_md_checksums():
    with open(os.path.join(ASSETS, "SOURCES.md"), encoding="utf-8") as f:
        listed = dict(re.findall(r"^\| `([^`]+)` \|.*?`([0-9a-f]{64})`", f.read(), re.M))
    on_disk = {os.path.relpath(os.path.join(d, n), ASSETS)
               for d, _, names in os.walk(ASSETS) for n in names
               if n not in ("SOURCES.md", ".gitattributes")}
    assert set(listed) == on_disk
    for rel, sha in listed.items():
        assert text_files.file_sha256(os.path.join(ASSETS, rel)) == sha, rel
    total = sum(os.path.getsize(os.path.join(ASSETS, rel)) for rel in on_disk)
    assert total < 6 * 10**6


def test_bundled_bpe_is_what_the_tokenizer_command_makes(tmp_path):
    out = tmp_path / "bpe.json"
    rc = tok_lib.main(["--files", os.path.join(ASSETS, "corpus", "train", "*.txt"),
                       "--vocab-size", "2048", "--out", str(out)])
    assert rc == 0
    with open(BPE_PATH, "rb") as f:
        assert out.read_bytes() == f.read()


def test_bpe_json_round_trip_and_special_token(bpe, alice_text):
    assert bpe.vocab_size == 2048 == get_config().model.vocab_size
    assert bpe.decode([bpe.eos_id]) == tok_lib.EOS_TOKEN
    heldout = text_files.read_text(
        os.path.join(ASSETS, "corpus", "heldout", "pg1342_pride_and_prejudice.txt"))
    for text in (alice_text[:20000], heldout[:20000], "naïve café — “quoted” 日本 🙂\n\n\tx"):
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    assert len(bpe.encode(alice_text[:20000])) < 20000 / 2.5  # merges compress English


def test_train_bpe_refuses_a_vocab_the_text_cannot_fill(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abc abc abd\n", encoding="utf-8")
    with pytest.raises(DataError, match="support only"):
        tok_lib.train_bpe([str(small)], 2048, str(tmp_path / "out.json"))


# -- gpt2 and sentencepiece loaders ---------------------------------------------------

def _tiny_gpt2_files(folder):
    """A GPT-2-format vocabulary (byte-to-unicode symbols, Ġ = space)."""
    tokens = ["H", "e", "l", "o", "Ġ", "w", "r", "d", "He", "ll", "Hell", "Hello", "Ġw",
              "or", "Ġwor", "ld", "Ġworld", "<|endoftext|>"]
    merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}),
                                         encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                      encoding="utf-8")
    return tokens


def test_gpt2_loader_reads_openai_file_pair(tmp_path):
    tokens = _tiny_gpt2_files(tmp_path / "gpt2")
    by_folder = tok_lib.load_tokenizer({"kind": "gpt2", "path": "gpt2"}, str(tmp_path))
    by_paths = tok_lib.load_tokenizer(
        {"kind": "gpt2", "path": (str(tmp_path / "gpt2" / "encoder.json"),
                                  str(tmp_path / "gpt2" / "vocab.bpe"))}, "/")
    for tok in (by_folder, by_paths):
        assert tok.encode("Hello world world") == [tokens.index("Hello"),
                                                   tokens.index("Ġworld"),
                                                   tokens.index("Ġworld")]
        assert tok.encode("Hell wor") == [tokens.index("Hell"), tokens.index("Ġwor")]
        assert tok.decode(tok.encode("Hello world")) == "Hello world"
        assert tok.eos_id == tokens.index("<|endoftext|>") and tok.vocab_size == len(tokens)
        assert tok.encode_batch(["Hello world world", "Hell wor"]) == [
            tok.encode("Hello world world"), tok.encode("Hell wor")]
    assert by_folder.fingerprint == by_paths.fingerprint


_GPT2_DIR = os.environ.get("NL_JAX_GPT2_DIR",
                           os.path.join(REPO, "..", "shared", "data", "tokenizers", "gpt2"))


@pytest.mark.skipif(not os.path.isfile(os.path.join(_GPT2_DIR, "encoder.json")),
                    reason="OpenAI GPT-2 files not present (not bundled; set NL_JAX_GPT2_DIR)")
def test_gpt2_loader_known_ids_on_the_real_files():
    tok = tok_lib.load_tokenizer({"kind": "gpt2", "path": _GPT2_DIR}, REPO)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)


def test_sentencepiece_loader_on_a_trained_tiny_model(tmp_path, alice_text):
    import sentencepiece as spm

    lines = [ln for ln in alice_text[:60000].split("\n") if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    tok = tok_lib.load_tokenizer({"kind": "sentencepiece", "path": "sp.model"}, str(tmp_path))
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == 400 and tok.eos_id == processor.eos_id() == 2
    text = "Alice was beginning to get very tired of sitting by her sister, ß€"
    ids = tok.encode(text)
    assert ids == processor.encode(text)
    assert tok.encode_batch([text, alice_text[:5000], "x"]) == [
        ids, processor.encode(alice_text[:5000]), processor.encode("x")]
    assert tok.decode(ids) == text
    assert tok.fingerprint.startswith("sentencepiece:")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json.*does not exist"):
        tok_lib.load_tokenizer({"kind": "bpe_json", "path": "missing.json"}, str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json"):
        tok_lib.load_tokenizer({"kind": "bpe_json", "path": "broken.json"}, str(tmp_path))
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"broken\.model"):
        tok_lib.load_tokenizer({"kind": "sentencepiece", "path": "broken.model"},
                               str(tmp_path))
    with pytest.raises(DataError, match=r"neither encoder\.json"):
        tok_lib.load_tokenizer({"kind": "gpt2", "path": "."}, str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.kind"):
        tok_lib.load_tokenizer({"kind": "wordpiece", "path": "x"}, str(tmp_path))


# -- token cache --------------------------------------------------------------------

def test_cache_holds_documents_separated_by_eos_and_is_reused(tmp_path, bpe, alice_text):
    folder = _corpus(tmp_path, alice_text)
    files = text_files.resolve_files(str(folder / "*.txt"), REPO, key="k")
    first = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    expected = (bpe.encode(alice_text[:12000]) + [bpe.eos_id]
                + bpe.encode(alice_text[12000:30000]) + [bpe.eos_id])
    assert first.built and first.tokens.dtype == np.uint16
    np.testing.assert_array_equal(first.tokens, expected)
    mtime = os.stat(first.path).st_mtime_ns

    second = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert not second.built and second.path == first.path
    assert os.stat(second.path).st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens, expected)

    (folder / "doc1.txt").write_text(alice_text[12000:29000], encoding="utf-8")
    third = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert third.built and third.key != first.key
    assert third.tokens.size < first.tokens.size
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 2


class _EncodeOnly:
    """A tokenizer without encode_batch: the cache encodes document by document."""

    def __init__(self, tok):
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id
        self.fingerprint, self.encode = tok.fingerprint, tok.encode


def test_batched_cache_build_equals_document_by_document(tmp_path, bpe, alice_text,
                                                         monkeypatch):
    """Files are encoded in batches (encode_batch, all cores) of at most BATCH_BYTES
    of text: any grouping gives the tokens of encoding each document on its own."""
    chunks = tuple((i * 5000, (i + 1) * 5000) for i in range(5))
    folder = _corpus(tmp_path, alice_text, chunks=chunks)
    files = [str(folder / f"doc{i}.txt") for i in range(5)]
    expected = np.concatenate([np.asarray(bpe.encode(alice_text[a:b]) + [bpe.eos_id])
                               for a, b in chunks])
    groups = []
    real_batch = token_cache._batch_tokens

    def recording(paths, tokenizer, dtype):
        groups.append(len(paths))
        return real_batch(paths, tokenizer, dtype)

    monkeypatch.setattr(token_cache, "_batch_tokens", recording)
    for limit, tokenizer, sizes in ((10**9, bpe, [5]), (12000, bpe, [2, 2, 1]),
                                    (1, bpe, [1] * 5), (12000, _EncodeOnly(bpe), [2, 2, 1])):
        monkeypatch.setattr(token_cache, "BATCH_BYTES", limit)
        groups.clear()
        built = token_cache.load_or_build(files, tokenizer, None)
        assert groups == sizes
        np.testing.assert_array_equal(built.tokens, expected)


def test_processes_needing_the_same_entry_build_it_once(tmp_path, bpe, alice_text):
    """Four workers (threads: flock locks are per open file) start together; one
    tokenizes the corpus while the others wait, then read its entry."""
    import threading
    import time

    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000), (3000, 6000)))
    files = [str(folder / "doc0.txt"), str(folder / "doc1.txt")]
    encoded = []

    class Slow(_EncodeOnly):
        def __init__(self, tok):
            super().__init__(tok)
            self.encode = self.slow_encode
            self._real = tok.encode

        def slow_encode(self, text):
            encoded.append(text)
            time.sleep(0.2)
            return self._real(text)

    results, start = [], threading.Barrier(4)

    def worker():
        start.wait()
        results.append(token_cache.load_or_build(files, Slow(bpe), str(tmp_path / "cache")))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(encoded) == 2                       # the two documents, once
    assert sorted(r.built for r in results) == [False, False, False, True]
    for r in results:
        np.testing.assert_array_equal(r.tokens, results[0].tokens)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [os.path.basename(results[0].path), os.path.basename(results[0].path)[:-4] + ".json"])


def test_a_damaged_cache_file_is_rebuilt_and_new_files_follow_the_umask(
        tmp_path, bpe, alice_text):
    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000),))
    files = [str(folder / "doc0.txt")]
    first = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert os.stat(first.path).st_mode & 0o777 == 0o666 & ~_umask()
    expected = np.array(first.tokens)   # a copy: first.tokens maps the file damaged below
    for damage in (b"", b"\x93NUMPY"):          # empty (a crash before the write) or cut
        with open(first.path, "wb") as f:
            f.write(damage)
        again = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
        assert again.built
        np.testing.assert_array_equal(again.tokens, expected)


def test_a_bad_file_mid_build_leaves_no_cache_entry_or_folder(tmp_path, bpe, alice_text):
    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000), (3000, 6000)))
    (folder / "doc1.txt").write_bytes(b"caf\xe9")              # Latin-1, not UTF-8
    files = [str(folder / "doc0.txt"), str(folder / "doc1.txt")]
    with pytest.raises(DataError, match=r"doc1\.txt is not valid UTF-8"):
        token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    (tmp_path / "cache").mkdir()
    with pytest.raises(DataError):
        token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []         # no partial or temp file


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cache_key_covers_the_tokenizer_libraries(tmp_path, bpe, alice_text, monkeypatch):
    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000),))
    files = [str(folder / "doc0.txt")]
    key = token_cache.cache_key(files, bpe.fingerprint)
    identity = token_cache.load_or_build(files, bpe, str(tmp_path / "cache")).identity
    monkeypatch.setattr(token_cache, "_library_versions",
                        lambda: {"tokenizers": "0.0.1", "sentencepiece": "0.0.1"})
    assert token_cache.cache_key(files, bpe.fingerprint) != key
    rebuilt = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert rebuilt.built and rebuilt.identity == identity   # resumes are not refused


def test_cache_entry_is_keyed_by_the_bytes_it_was_tokenized_from(
        tmp_path, bpe, alice_text, monkeypatch):
    """A file edited between the key's hash and the tokenization: the entry must be
    stored under the edited bytes' key, never under the old contents' key."""
    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000),))
    doc = folder / "doc0.txt"
    files = [str(doc)]
    old_key = token_cache.cache_key(files, bpe.fingerprint)
    real = text_files.read_text_hashed

    def edit_then_read(path):
        doc.write_text(alice_text[5000:8000], encoding="utf-8")
        return real(path)

    monkeypatch.setattr(text_files, "read_text_hashed", edit_then_read)
    built = token_cache.load_or_build(files, bpe, str(tmp_path / "cache"))
    assert built.key == token_cache.cache_key(files, bpe.fingerprint) != old_key
    np.testing.assert_array_equal(built.tokens, bpe.encode(alice_text[5000:8000]) + [bpe.eos_id])
    names = [p.name for p in (tmp_path / "cache").glob("tokens-*.npy")]
    assert names == [f"tokens-{built.key[:32]}.npy"]


def test_a_tokenizer_file_with_padding_or_truncation_encodes_whole_documents(tmp_path, bpe):
    """Padding (encode_batch would pad each document to the longest) and truncation
    set in a tokenizer.json are switched off: the ids are each document's own."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(os.path.join(ASSETS, "tokenizer", "bpe_2k.json"))
    hf.enable_padding(pad_id=bpe.eos_id)
    hf.enable_truncation(max_length=3)
    hf.save(str(tmp_path / "padded.json"))
    tok = tok_lib.load_tokenizer({"kind": "bpe_json", "path": "padded.json"}, str(tmp_path))
    texts = ["Alice was beginning to get very tired", "of sitting"]
    assert tok.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert tok.encode(texts[0]) == bpe.encode(texts[0]) and len(bpe.encode(texts[0])) > 3


def test_special_token_text_in_a_document_is_not_an_end_of_document(bpe):
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eos_id not in ids and bpe.decode(ids) == "a <|endoftext|> b"
    assert bpe.encode_batch(["a <|endoftext|> b"]) == [ids]     # the cache's path


def test_cache_key_depends_on_the_tokenizer(tmp_path, bpe, alice_text):
    folder = _corpus(tmp_path, alice_text, chunks=((0, 3000),))
    _tiny_gpt2_files(tmp_path / "gpt2")
    gpt2 = tok_lib.load_tokenizer({"kind": "gpt2", "path": "gpt2"}, str(tmp_path))
    files = [str(folder / "doc0.txt")]
    assert token_cache.cache_key(files, bpe.fingerprint) != token_cache.cache_key(
        files, gpt2.fingerprint)


def test_bom_and_crlf_are_normalised(tmp_path, bpe):
    lf = tmp_path / "lf.txt"
    crlf = tmp_path / "crlf.txt"
    lf.write_bytes("First line.\nSecond “line”.\n".encode())
    crlf.write_bytes(b"\xef\xbb\xbf" + "First line.\r\nSecond “line”.\r\n".encode())
    assert text_files.read_text(str(crlf)) == text_files.read_text(str(lf))
    a = token_cache.tokenize_files([str(lf)], bpe)
    b = token_cache.tokenize_files([str(crlf)], bpe)
    np.testing.assert_array_equal(a, b)


# -- training stream ------------------------------------------------------------------

@pytest.fixture()
def small_cfg(tmp_path, alice_text):
    folder = _corpus(tmp_path, alice_text)
    return _data_cfg([str(folder / "*.txt")], tmp_path / "cache")


def test_windows_are_corpus_slices_with_shifted_targets(small_cfg, bpe):
    it = pipeline.build_train_iterator(small_cfg, bpe, seed=0, base_dir=REPO)
    cache = pipeline.corpus_tokens(small_cfg.train_files, bpe, base_dir=REPO,
                                   cache_dir=small_cfg.cache_dir, key="k")
    batch = next(it)
    assert batch["inputs"].shape == batch["targets"].shape == (8, 32)
    assert batch["inputs"].dtype == np.int32
    corpus = np.asarray(cache.tokens, np.int64)
    for x, y in zip(batch["inputs"], batch["targets"], strict=True):
        starts = [s for s in range(0, corpus.size - 32, 32) if corpus[s] == x[0]
                  and np.array_equal(corpus[s:s + 32], x)]
        assert starts, "every input row is a window starting at a multiple of seq_len"
        np.testing.assert_array_equal(corpus[starts[0] + 1:starts[0] + 33], y)


def test_stream_visits_every_window_once_per_epoch_and_reshuffles():
    stream = pipeline.window_id_stream(50, seed=3)
    epoch0 = [stream[i] for i in range(50)]
    epoch1 = [stream[i] for i in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1 and epoch0 != list(range(50))
    assert [stream[i] for i in range(50)] == epoch0


def test_same_seed_same_batches_other_seed_differs(small_cfg, bpe):
    a = _take(pipeline.build_train_iterator(small_cfg, bpe, seed=7, base_dir=REPO), 40)
    b = _take(pipeline.build_train_iterator(small_cfg, bpe, seed=7, base_dir=REPO), 40)
    c = _take(pipeline.build_train_iterator(small_cfg, bpe, seed=8, base_dir=REPO), 40)
    assert _same(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    # 40 batches run past the end of the first epoch: the stream keeps going.
    windows = pipeline.token_count_summary(small_cfg, bpe, base_dir=REPO)["train"]["windows"]
    assert windows < 40 * 8
    assert all(x["inputs"].shape == (8, 32) for x in a)


def test_state_round_trip_gives_the_same_next_batches(small_cfg, bpe):
    it = pipeline.build_train_iterator(small_cfg, bpe, seed=1, base_dir=REPO)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    assert state["next_index"] == 5

    resumed = pipeline.build_train_iterator(small_cfg, bpe, seed=1, base_dir=REPO)
    _take(resumed, 2)
    resumed.set_state(state)
    assert _same(_take(resumed, 6), expected)
    assert resumed.get_state()["next_index"] == 11

    other_seed = pipeline.build_train_iterator(small_cfg, bpe, seed=2, base_dir=REPO)
    with pytest.raises(DataError, match="seed"):
        other_seed.set_state(state)
    with pytest.raises(DataError, match=r"lacks \['corpus_key', 'seed'\]"):
        resumed.set_state({k: v for k, v in state.items() if k not in ("seed", "corpus_key")})


def test_two_processes_split_each_global_batch(small_cfg, bpe):
    whole = pipeline.build_train_iterator(small_cfg, bpe, seed=4, base_dir=REPO)
    parts = [pipeline.build_train_iterator(small_cfg, bpe, seed=4, base_dir=REPO,
                                           process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(5):
        full = next(whole)
        local = [next(p) for p in parts]
        assert local[0]["inputs"].shape == (4, 32)
        rows0 = {r.tobytes() for r in local[0]["inputs"]}
        rows1 = {r.tobytes() for r in local[1]["inputs"]}
        assert not rows0 & rows1
        for k in ("inputs", "targets"):
            np.testing.assert_array_equal(
                np.concatenate([local[0][k], local[1][k]]), full[k])
    # The state is the global batch index: the same on every process.
    assert parts[0].get_state() == parts[1].get_state() == whole.get_state()


def test_eval_batches_are_deterministic_and_spread(small_cfg, bpe):
    a = pipeline.build_eval_batches(small_cfg, bpe, base_dir=REPO, num_batches=3)
    b = pipeline.build_eval_batches(small_cfg, bpe, base_dir=REPO, num_batches=3)
    assert len(a) == 3 and _same(a, b)
    np.testing.assert_array_equal(pipeline.eval_window_ids(10, 4), [0, 2, 5, 7])
    halves = [pipeline.build_eval_batches(small_cfg, bpe, base_dir=REPO, num_batches=3,
                                          process_index=p, process_count=2)
              for p in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]), a[1]["inputs"])
    many = pipeline.build_eval_batches(small_cfg, bpe, base_dir=REPO, num_batches=10**6)
    summary = pipeline.token_count_summary(small_cfg, bpe, base_dir=REPO)
    assert len(many) == summary["eval"]["batches_per_epoch"] > 3


def test_held_out_files_equal_to_training_files_are_flagged(small_cfg, bpe, tmp_path,
                                                             alice_text, caplog):
    train = pipeline.build_train_iterator(small_cfg, bpe, seed=0, base_dir=REPO)
    with caplog.at_level("WARNING"):
        pipeline.build_eval_batches(small_cfg, bpe, base_dir=REPO, num_batches=1,
                                    train_hashes=train.file_hashes)
    assert "not held out" in caplog.text and "doc0.txt" in caplog.text
    caplog.clear()
    other = _corpus(tmp_path, alice_text, chunks=((30000, 45000),), name="heldout")
    cfg = _data_cfg(small_cfg.train_files, small_cfg.cache_dir,
                    eval_files=[str(other / "*.txt")])
    with caplog.at_level("WARNING"):
        pipeline.build_eval_batches(cfg, bpe, base_dir=REPO, num_batches=1,
                                    train_hashes=train.file_hashes)
    assert "not held out" not in caplog.text


def test_default_config_builds_on_the_bundled_corpus(tmp_path, bpe):
    cfg = get_config().data
    cfg.cache_dir = str(tmp_path / "cache")
    it = pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=REPO)
    batch = next(it)
    assert batch["inputs"].shape == (cfg.batch_size, cfg.seq_len)
    assert it.num_tokens > 400_000
    evals = pipeline.build_eval_batches(cfg, bpe, base_dir=REPO, num_batches=2)
    assert len(evals) == 2 and evals[0]["targets"].shape == (cfg.batch_size, cfg.seq_len)


# -- user errors ----------------------------------------------------------------------

def test_pattern_matching_nothing(tmp_path, bpe):
    cfg = _data_cfg(["no/such/*.txt"], tmp_path / "cache")
    with pytest.raises(DataError, match=r"data.train_files: pattern 'no/such/\*.txt' "
                                        r"matches no file"):
        pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=str(tmp_path))


@pytest.mark.parametrize("content,why", [(b"", "empty"), (b" \n\t\r\n ", "only whitespace")])
def test_empty_file(tmp_path, bpe, content, why):
    (tmp_path / "empty.txt").write_bytes(content)
    cfg = _data_cfg(["empty.txt"], tmp_path / "cache")
    with pytest.raises(DataError, match=rf"empty\.txt.*{why}"):
        pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=str(tmp_path))


def test_non_utf8_file_names_the_byte_offset(tmp_path, bpe):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    cfg = _data_cfg(["latin1.txt"], tmp_path / "cache")
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 3"):
        pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=str(tmp_path))


def test_corpus_too_small_for_one_batch(tmp_path, bpe, alice_text):
    (tmp_path / "tiny.txt").write_text(alice_text[:500], encoding="utf-8")
    cfg = _data_cfg(["tiny.txt"], tmp_path / "cache", seq_len=64, batch_size=8)
    n = len(bpe.encode(alice_text[:500])) + 1
    with pytest.raises(DataError, match=rf"gives {n} tokens.*needs {8 * 64 + 1}"):
        pipeline.build_train_iterator(cfg, bpe, seed=0, base_dir=str(tmp_path))


def test_batch_not_divisible_by_processes(small_cfg, bpe):
    with pytest.raises(ConfigError, match=r"data.batch_size=8 must be divisible .*\(3\)"):
        pipeline.build_train_iterator(small_cfg, bpe, seed=0, base_dir=REPO,
                                      process_index=0, process_count=3)
