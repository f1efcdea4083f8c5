"""Tokenizers: one small protocol, three file formats, and the BPE trainer.

`data.tokenizer.kind` picks the loader:

* ``bpe_json``: a Hugging Face `tokenizers` JSON file (the bundled
  ``nl_jax/data/assets/tokenizer/bpe_2k.json`` is one, made by `train_bpe`).
* ``gpt2``: OpenAI's byte-level BPE pair ``encoder.json`` + ``vocab.bpe``
  (Hugging Face calls them ``vocab.json`` + ``merges.txt``); `path` is the
  folder holding them, or the two paths in that order.
* ``sentencepiece``: a SentencePiece ``.model`` file (e.g. Llama-2's).

Every tokenizer carries a `fingerprint` (kind + SHA-256 of its files) that
keys the token cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from nl_jax.data import text_files
from nl_jax.errors import ConfigError, DataError

KINDS = ("bpe_json", "gpt2", "sentencepiece")
EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the model and the sampler need from a tokenizer."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, on all cores (optional: the token cache
        calls ``encode`` per document when a tokenizer lacks it)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids."""


def _fingerprint(kind: str, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(kind.encode())
    for path in paths:
        digest.update(text_files.file_sha256(path).encode())
    return f"{kind}:{digest.hexdigest()}"


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path} ({what}) does not exist; set "
                        f"data.tokenizer.path to an existing file or train one with "
                        f"`python -m nl_jax tokenizer --files ... --out {path}`")
    return path


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (covers ``bpe_json`` and ``gpt2``)."""

    def __init__(self, hf_tokenizer, *, fingerprint: str, source: str):
        # Special tokens written in the text ("<|endoftext|>" in a document) are
        # encoded as text: only the pipeline places end-of-document ids.
        hf_tokenizer.encode_special_tokens = True
        # A tokenizer.json may switch on padding (encode_batch would pad every
        # document to the batch's longest) or truncation (documents cut short):
        # the pipeline wants each document's full ids and nothing else.
        hf_tokenizer.no_padding()
        hf_tokenizer.no_truncation()
        self._tok = hf_tokenizer
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.fingerprint = fingerprint
        eos = [hf_tokenizer.token_to_id(t) for t in _EOS_CANDIDATES]
        eos = [i for i in eos if i is not None]
        if not eos:
            raise DataError(f"tokenizer {source} has no end-of-text token (looked for "
                            f"{', '.join(_EOS_CANDIDATES)}); retrain it with "
                            f"`python -m nl_jax tokenizer`, which adds {EOS_TOKEN}")
        self.eos_id = int(eos[0])

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts),
                                                            add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece model; no BOS/EOS is added by `encode`."""

    def __init__(self, processor, *, fingerprint: str, source: str):
        self._sp = processor
        self.vocab_size = int(processor.get_piece_size())
        self.fingerprint = fingerprint
        if processor.eos_id() < 0:
            raise DataError(f"SentencePiece model {source} has no end-of-sentence id "
                            f"(eos_id=-1); train it with eos_id set")
        self.eos_id = int(processor.eos_id())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts), num_threads=-1)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _load_bpe_json(path: str) -> HFTokenizer:
    import tokenizers

    _require_file(path, "tokenizers JSON")
    try:
        hf = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust loader raises a bare Exception
        raise DataError(f"cannot load tokenizer {path} as a Hugging Face tokenizers "
                        f"JSON file ({e}); give a file saved by tokenizers or set "
                        f"data.tokenizer.kind to gpt2 / sentencepiece") from e
    return HFTokenizer(hf, fingerprint=_fingerprint("bpe_json", [path]), source=path)


def gpt2_files(path: str | Sequence[str]) -> tuple[str, str]:
    """(encoder.json, vocab.bpe) from a folder or from the two paths."""
    if isinstance(path, str):
        if not os.path.isdir(path):
            raise DataError(f"gpt2 tokenizer path {path} is not a folder; give the folder "
                            f"holding encoder.json + vocab.bpe, or the two paths")
        for vocab_name, merges_name in (("encoder.json", "vocab.bpe"),
                                        ("vocab.json", "merges.txt")):
            vocab, merges = os.path.join(path, vocab_name), os.path.join(path, merges_name)
            if os.path.isfile(vocab) and os.path.isfile(merges):
                return vocab, merges
        raise DataError(f"gpt2 tokenizer folder {path} holds neither encoder.json + "
                        f"vocab.bpe nor vocab.json + merges.txt")
    paths = tuple(str(p) for p in path)
    if len(paths) != 2:
        raise ConfigError(f"data.tokenizer.path for kind gpt2 must be a folder or two "
                          f"paths (encoder.json, vocab.bpe), got {len(paths)} paths")
    return (_require_file(paths[0], "GPT-2 encoder.json"),
            _require_file(paths[1], "GPT-2 vocab.bpe"))


def _load_gpt2(path: str | Sequence[str]) -> HFTokenizer:
    import tokenizers

    vocab, merges = gpt2_files(path)
    try:
        hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    except Exception as e:  # the Rust loader raises a bare Exception
        raise DataError(f"cannot load the GPT-2 BPE files {vocab} and {merges} ({e}); "
                        f"give OpenAI's encoder.json and vocab.bpe") from e
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    return HFTokenizer(hf, fingerprint=_fingerprint("gpt2", [vocab, merges]), source=vocab)


def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
    import sentencepiece

    _require_file(path, "SentencePiece .model")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load {path} as a SentencePiece model ({e}); give a "
                        f".model file written by sentencepiece") from e
    return SentencePieceTokenizer(processor, fingerprint=_fingerprint("sentencepiece", [path]),
                                  source=path)


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def load_tokenizer(tok_cfg, base_dir: str) -> Tokenizer:
    """Loads the tokenizer that `data.tokenizer` (keys kind, path) names.

    Relative paths are taken from `base_dir` (the repository root).
    """
    kind = tok_cfg.get("kind")
    path = tok_cfg.get("path")
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer.kind={kind!r} is not one of {', '.join(KINDS)}")
    if not path:
        raise ConfigError("data.tokenizer.path is empty; give the tokenizer file")
    if kind == "gpt2":
        if isinstance(path, str):
            return _load_gpt2(_resolve(path, base_dir))
        return _load_gpt2([_resolve(p, base_dir) for p in path])
    if not isinstance(path, str):
        raise ConfigError(f"data.tokenizer.path for kind {kind} must be one file path")
    if kind == "bpe_json":
        return _load_bpe_json(_resolve(path, base_dir))
    return _load_sentencepiece(_resolve(path, base_dir))


def train_bpe(files: Sequence[str], vocab_size: int, out_path: str, *,
              min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE (special token <|endoftext|>) and saves it as JSON.

    The text is read with `text_files.read_text` (BOM stripped, CRLF -> LF),
    the same way the data pipeline reads it.  Raises DataError when the text
    cannot support `vocab_size` tokens.
    """
    import tokenizers

    if vocab_size < 258:
        raise ConfigError(f"--vocab-size must be at least 258 (256 bytes + "
                          f"{EOS_TOKEN} + one merge), got {vocab_size}")
    texts = [text_files.read_text(f) for f in files]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS_TOKEN], show_progress=False)
    got = bpe.get_vocab_size()
    if got != vocab_size:
        raise DataError(f"the {len(files)} training file(s) support only {got} tokens "
                        f"with min_frequency={min_frequency}, not {vocab_size}; give more "
                        f"text or a smaller --vocab-size")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bpe.save(out_path)
    return _load_bpe_json(out_path)


def main(argv: Sequence[str]) -> int:
    """``python -m nl_jax tokenizer --files GLOB... --vocab-size N --out PATH``."""
    parser = argparse.ArgumentParser(
        prog="nl_jax tokenizer",
        description="Train a byte-level BPE (with <|endoftext|>) on text files.")
    parser.add_argument("--files", nargs="+", required=True,
                        help="text files or glob patterns (relative to the current folder)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output tokenizers JSON file")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(list(argv))
    files = text_files.resolve_files(args.files, os.getcwd(), key="--files")
    tok = train_bpe(files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote {args.out}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} "
          f"sha256={text_files.file_sha256(args.out)} from {len(files)} file(s)",
          file=sys.stdout)
    return 0
