"""Synthetic long-context recall, generated in-process from a seed: S-NIAH-1/2/3.

``python -m nl_jax eval --workdir RUN --tasks niah_single_1,niah_single_2,niah_single_3
--lengths 1024,4096 --depths 0,0.5,1 [--samples N] [--seed S] [--json PATH]``.

The single-needle tasks of RULER (Hsieh et al., 2024; the Titans paper's
S-NIAH-PK / -N / -W table), with RULER's templates:

- ``niah_single_1``, pass-key: the needle "The pass key is 7341925. Remember it.
  7341925 is the pass key." in a haystack of repeated noise sentences ("The grass
  is green. The sky is blue. ..."); the query asks for the pass key.
- ``niah_single_2``, number: "One of the special magic numbers for {key} is:
  {value}." (key: two words joined by '-', value: a 7-digit number) in book text;
  the query asks for the number of that key.
- ``niah_single_3``, UUID: the same with a UUID value ("... special magic uuids
  ...").

Book text: the bundled held-out novel (``nl_jax/data/assets/corpus/heldout/``,
Austen's *Pride and Prejudice*, which the bundled tiny runs do not train on),
from a random sentence on, cycling; the keys' words are drawn from it too.

A sample of length ``L`` is ``L`` tokens of the model's tokenizer: the
instruction, the haystack, the needle sentence inserted at a sentence boundary,
and the question, which ends with the answer's prefix ("... The pass key is");
the answer is " " + value.  Pieces are tokenized apart and concatenated (so
lengths and positions are exact in tokens; the haystack's last sentence is cut
to fit).  ``depth`` d in [0, 1] puts the needle at the sentence boundary of the
haystack nearest to d x (haystack tokens): 0 right after the instruction, 1
right before the question.  Every (length, depth) cell draws ``samples``
haystacks, needles and keys from ``random.Random(f"{seed}/{task}/{length}/{depth}/{i}")``:
the same seed gives the same samples for every model with the same tokenizer.

Scoring: exact match of greedy decoding.  A sample is correct when greedy
decoding after the query reproduces the answer's tokens exactly, which is what
``Scorer`` reports as ``is_greedy`` of the (query, answer) request: the argmax
at every answer position, given the answer's earlier tokens, is the next answer
token (if greedy decoding emitted the answer so far, it was fed exactly these
tokens).  It takes one teacher-forced pass per batch instead of one forward per
generated token, so 16K-token inputs run on the CPU.  The log-likelihood of the
answer is reported too (``mean_ll``, nats per sample).

Long inputs: read as ``nl_jax eval --tasks`` and ``generate`` read them
(``nl_jax.eval.scoring``): Titans and Hope segment by segment of ``data.seq_len``
tokens with their memory carried (one pass over the whole input); attention
models keep no cache and see the last ``data.seq_len`` tokens only, so they find
the needle only at depth ~1 (or with ``--config.data.seq_len`` raised).

Results: a table per task (rows: length, columns: depth), a heatmap PNG, and
``{"tasks": {task: {"acc": ..., "acc_len<L>": ...}}, "niah": {task: {"cells":
[{"length", "depth", "acc", "n", "mean_ll"}]}}, "checkpoint_step", "seq_len",
...}`` written to a new file ``RUN/evals/step<S>-longcontext-...json`` (and
``--json PATH``), never overwritten.  Other ``--tasks`` (``piqa``, ...) in the
same list run through ``nl_jax.eval.tasks`` on the same model and join ``tasks``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nl_jax.errors import UserError

BOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets", "corpus",
                    "heldout", "pg1342_pride_and_prejudice.txt")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")


@dataclass(frozen=True)
class NiahTask:
    name: str
    needle: str       # passkey | number | uuid
    haystack: str     # noise | book
    description: str


NIAH_TASKS: dict[str, NiahTask] = {t.name: t for t in [
    NiahTask("niah_single_1", "passkey", "noise", "S-NIAH-1: pass-key, noise haystack"),
    NiahTask("niah_single_2", "number", "book", "S-NIAH-2: 7-digit number, book haystack"),
    NiahTask("niah_single_3", "uuid", "book", "S-NIAH-3: UUID, book haystack"),
]}
DEFAULT_LENGTHS = (1024, 4096)
DEFAULT_DEPTHS = (0.0, 0.5, 1.0)
DEFAULT_SAMPLES = 2
SCORING = ("exact match of greedy decoding: the argmax at every answer position "
           "(teacher-forced) is the answer's next token")


def templates(task: NiahTask, key: str, value: str) -> tuple[str, str, str]:
    """(instruction, needle sentence, question ending with the answer's prefix)."""
    if task.needle == "passkey":
        return ("There is an important info hidden inside a lot of irrelevant text. Find "
                "it and memorize it. I will quiz you about the important information "
                "there.\n",
                f"The pass key is {value}. Remember it. {value} is the pass key.",
                "\nWhat is the pass key? The pass key is")
    kind = "numbers" if task.needle == "number" else "uuids"
    return (f"Some special magic {kind} are hidden within the following text. Make sure "
            f"to memorize it. I will quiz you about the {kind} afterwards.\n",
            f"One of the special magic {kind} for {key} is: {value}.",
            f"\nWhat is the special magic {kind[:-1]} for {key} mentioned in the provided "
            f"text? The special magic {kind[:-1]} for {key} mentioned in the provided "
            f"text is")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, whitespace collapsed (a cut after . ! ? and a space)."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]


def read_book(path: str | None = None) -> str:
    """The book haystack's text (default ``BOOK``); a missing file is a ``UserError``."""
    path = path or BOOK
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"eval: the long-context tasks need their haystack text {path}, "
                        f"which is missing; restore it (git checkout "
                        f"nl_jax/data/assets/corpus) or reinstall nl_jax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"eval: the haystack text {path} cannot be read ({e})") from None


class Haystacks:
    """The tokenized sentences of both haystacks (each as " " + sentence, tokenized
    alone) and the words keys are made of; built once per tokenizer."""

    def __init__(self, tokenizer, book_text: str | None = None):
        self.tokenizer = tokenizer
        text = read_book() if book_text is None else book_text
        encode = getattr(tokenizer, "encode_batch", None) or (
            lambda texts: [tokenizer.encode(t) for t in texts])
        self.sentences = {
            "book": [list(ids) for ids in encode([" " + s for s in split_sentences(text)])],
            "noise": [list(tokenizer.encode(" " + s)) for s in split_sentences(NOISE)]}
        for kind, sents in self.sentences.items():
            self.sentences[kind] = [s for s in sents if s]
            if not self.sentences[kind]:
                raise UserError(f"eval: the {kind} haystack has no text")
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,9}\b", text)})
        if len(self.words) < 2:
            raise UserError("eval: the book haystack has too few words to make keys of")

    def fill(self, kind: str, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """``budget`` haystack tokens (whole sentences from a random one on, cycling;
        the last cut to fit) and the token offsets of the sentence boundaries in
        them (0 and ``budget`` included)."""
        sents = self.sentences[kind]
        at = rng.randrange(len(sents)) if kind == "book" else 0
        ids, bounds = [], [0]
        while len(ids) < budget:
            ids += sents[at % len(sents)]
            at += 1
            bounds.append(min(len(ids), budget))
        return ids[:budget], sorted(set(bounds))


@dataclass(frozen=True)
class Sample:
    task: str
    length: int          # tokens of context_ids
    depth: float
    context_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    value: str
    key: str
    needle_start: int    # token index of the needle's first token in context_ids
    needle_len: int
    target_start: float  # where depth asks the needle to start (prefix + depth x haystack)


def value_for(task: NiahTask, rng: random.Random) -> str:
    if task.needle == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def make_sample(task: NiahTask, hay: Haystacks, length: int, depth: float,
                rng: random.Random) -> Sample:
    """One ``length``-token sample of ``task`` with its needle at ``depth``."""
    tok = hay.tokenizer
    value = value_for(task, rng)
    key = "" if task.needle == "passkey" else "-".join(rng.sample(hay.words, 2))
    instruction, needle, question = templates(task, key, value)
    prefix, needle_ids = list(tok.encode(instruction)), list(tok.encode(" " + needle))
    query = list(tok.encode(question))
    budget = length - len(prefix) - len(needle_ids) - len(query)
    if budget < 0:
        raise UserError(f"eval: --lengths {length} is shorter than the "
                        f"{length - budget} tokens {task.name} needs for its instruction, "
                        f"needle and question; use lengths of at least {length - budget}")
    haystack, bounds = hay.fill(task.haystack, budget, rng)
    target = depth * budget
    cut = min(bounds, key=lambda b: (abs(b - target), b))
    context = prefix + haystack[:cut] + needle_ids + haystack[cut:] + query
    assert len(context) == length
    return Sample(task.name, length, float(depth), tuple(context),
                  tuple(tok.encode(" " + value)), value, key, len(prefix) + cut,
                  len(needle_ids), len(prefix) + target)


def make_samples(name: str, hay: Haystacks, lengths: Sequence[int], depths: Sequence[float],
                 samples: int, seed: int) -> list[Sample]:
    """``samples`` samples per (length, depth) cell, each from its own seeded rng."""
    task = NIAH_TASKS[name]
    return [make_sample(task, hay, length, depth,
                        random.Random(f"{seed}/{name}/{length}/{depth}/{i}"))
            for length in lengths for depth in depths for i in range(samples)]


def score(lm, samples: Sequence[Sample]) -> list[tuple[float, bool]]:
    """``(log-likelihood of the answer, exact match of greedy decoding)`` per sample;
    ``lm`` has ``loglikelihood_tokens([(context_ids, answer_ids)])`` (``NLJaxLM``)."""
    return lm.loglikelihood_tokens([(list(s.context_ids), list(s.answer_ids))
                                    for s in samples])


def cells(samples: Sequence[Sample], results: Sequence[tuple[float, bool]]) -> list[dict]:
    """Accuracy and mean answer log-likelihood per (length, depth), in sample order."""
    out: dict[tuple[int, float], dict] = {}
    for s, (ll, hit) in zip(samples, results, strict=True):
        cell = out.setdefault((s.length, s.depth), {"length": s.length, "depth": s.depth,
                                                    "hits": 0, "n": 0, "ll": 0.0})
        cell["hits"] += int(hit)
        cell["n"] += 1
        cell["ll"] += float(ll)
    return [{"length": c["length"], "depth": c["depth"], "acc": c["hits"] / c["n"],
             "n": c["n"], "mean_ll": c["ll"] / c["n"]} for c in out.values()]


def summary(task_cells: list[dict]) -> dict[str, float]:
    """``acc`` over every sample and ``acc_len<L>`` per length."""
    n = sum(c["n"] for c in task_cells)
    out = {"acc": sum(c["acc"] * c["n"] for c in task_cells) / n}
    for length in sorted({c["length"] for c in task_cells}):
        sub = [c for c in task_cells if c["length"] == length]
        out[f"acc_len{length}"] = sum(c["acc"] * c["n"] for c in sub) / sum(c["n"] for c in sub)
    return out


def format_table(name: str, task_cells: list[dict]) -> str:
    """Accuracy table of one task: a row per length, a column per depth, and ``all``."""
    lengths = sorted({c["length"] for c in task_cells})
    depths = sorted({c["depth"] for c in task_cells})
    at = {(c["length"], c["depth"]): c for c in task_cells}
    lines = [f"{name} ({NIAH_TASKS[name].description}): accuracy by length (rows) and "
             f"depth (columns)",
             f"{'length':>8}" + "".join(f"{d:>8.2f}" for d in depths) + f"{'all':>8}"]
    for length in lengths:
        row = [at[(length, d)] for d in depths]
        mean = sum(c["acc"] * c["n"] for c in row) / sum(c["n"] for c in row)
        lines.append(f"{length:>8}" + "".join(f"{c['acc']:>8.2f}" for c in row)
                     + f"{mean:>8.2f}")
    return "\n".join(lines)


def plot_heatmaps(panels: dict[str, dict], path: str, title: str, *, column: str = "depth",
                  column_label: str = "needle depth") -> None:
    """Accuracy heatmaps (0..1) as a PNG, a panel per entry of ``panels`` (``{name:
    {"cells": [{"length", column, "acc"}]}}``): rows are lengths, columns the
    values of ``column`` (NIAH: depth; ``bench mqar``: pairs); a missing cell is
    blank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.2, 3.6),
                             squeeze=False, layout="constrained")
    image = None
    for j, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        task_cells = panels[name]["cells"]
        lengths = sorted({c["length"] for c in task_cells})
        depths = sorted({c[column] for c in task_cells})
        at = {(c["length"], c[column]): c["acc"] for c in task_cells}
        grid = np.array([[at.get((length, d), np.nan) for d in depths] for length in lengths])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
                          origin="lower")
        for row in range(len(lengths)):
            for col in range(len(depths)):
                if np.isfinite(grid[row, col]):
                    ax.text(col, row, f"{grid[row, col]:.2f}", ha="center", va="center",
                            fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_xlabel(column_label)
        if j == 0:
            ax.set_ylabel("length (tokens)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command line ---------------------------------------------------------------

HELP = """usage: python -m nl_jax eval --workdir DIR --tasks niah_single_1[,...] [--lengths L,...]
       [--depths D,...] [--samples N] [--seed S] [--batch_size N] [--limit N]
       [--json PATH] [--config FILE] [--config.KEY=VALUE ...]

Needle-in-a-haystack recall (RULER's S-NIAH-1/2/3, generated from --seed) of the
latest checkpoint: exact match of greedy decoding of the needle's value after the
query, by input length and needle depth.  Titans and Hope read the input segment by
segment of data.seq_len tokens, memory carried; attention models see the last
data.seq_len tokens.  Prints a table per task and the summary JSON, and writes
DIR/evals/step<S>-longcontext-<settings>.json and a heatmap PNG beside it (never
overwritten).

  --tasks TASKS         niah_single_1 (pass-key, noise haystack), niah_single_2
                        (number, book haystack), niah_single_3 (UUID, book haystack);
                        other eval tasks (piqa, ...) may join the list
  --lengths L,...       input lengths in tokens (default 1024,4096)
  --depths D,...        needle depths in [0, 1] (default 0,0.5,1)
  --samples N           samples per (length, depth) (default 2)
  --seed S              the samples' seed (default 0)
  --batch_size N        rows per batch (default: the samples of one length, at most 64)
  --limit N             the first N documents of the other tasks
  --json PATH           also write the result here, and the heatmap beside it
                        (a new file; never overwritten)"""


def is_longcontext(argv: Sequence[str]) -> bool:
    """Whether an ``eval`` command line's ``--tasks`` names a long-context task."""
    spec = None
    for i, arg in enumerate(argv):
        if arg == "--tasks" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--tasks="):
            spec = arg.split("=", 1)[1]
    return spec is not None and any(s.strip() in NIAH_TASKS for s in spec.split(","))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"eval: {message}; see `python -m nl_jax eval --help`")


def _floats(flag: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"eval: {flag} must be comma-separated numbers in [0, 1], got "
                        f"{text!r}")
    return sorted(set(values))


def _ints(flag: str, text: str) -> list[int]:
    from nl_jax.eval.results import positive_int
    values = [positive_int(flag, x.strip()) for x in text.split(",") if x.strip()]
    if not values:
        raise UserError(f"eval: {flag} must be comma-separated positive integers, got "
                        f"{text!r}")
    return sorted(set(values))


def resolve(spec: str) -> tuple[list[str], list[str]]:
    """(long-context task names, other task names) of ``--tasks``."""
    from nl_jax.eval import tasks as tasks_lib
    names = [s.strip() for s in spec.split(",") if s.strip()]
    niah = [n for n in dict.fromkeys(names) if n in NIAH_TASKS]
    rest = [n for n in names if n not in NIAH_TASKS]
    return niah, tasks_lib.resolve(",".join(rest)) if rest else []


def result_key(step: int, names: Sequence[str], lengths, depths, samples: int, seed: int,
               limit, overrides) -> str:
    import hashlib

    from nl_jax.eval.results import short
    key = (f"step{step}-longcontext-{'+'.join(names)}-len{'+'.join(map(str, lengths))}"
           f"-depth{'+'.join(f'{d:g}' for d in depths)}-samples{samples}-seed{seed}")
    if limit:
        key += f"-limit{limit}"
    if overrides:
        key += "-cfg" + hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
    return short(key, 120)


def main(argv: list[str]) -> int:
    """``nl_jax eval`` with long-context tasks (see ``HELP``)."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    from nl_jax.__main__ import _load_run, _restored_trainer
    from nl_jax.eval import results as results_lib
    config, workdir, rest = _load_run(argv, "eval")
    parser = _Parser(prog="nl_jax eval", add_help=False)
    for flag in ("--tasks", "--lengths", "--depths", "--samples", "--seed", "--batch_size",
                 "--limit", "--json"):
        parser.add_argument(flag)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UserError(f"eval: unknown arguments {unknown} with long-context tasks; see "
                        f"`python -m nl_jax eval --help`")
    if not args.tasks:
        raise UserError(f"eval: --tasks names no task; long-context tasks: "
                        f"{', '.join(NIAH_TASKS)}")
    niah_names, other_names = resolve(args.tasks)
    lengths = _ints("--lengths", args.lengths) if args.lengths else list(DEFAULT_LENGTHS)
    depths = _floats("--depths", args.depths) if args.depths else list(DEFAULT_DEPTHS)
    samples = results_lib.positive_int("--samples", args.samples) or DEFAULT_SAMPLES
    limit = results_lib.positive_int("--limit", args.limit)
    batch_size = results_lib.positive_int("--batch_size", args.batch_size)
    try:
        seed = int(args.seed) if args.seed is not None else 0
    except ValueError:
        raise UserError(f"eval: --seed must be an integer, got {args.seed!r}") from None
    results_lib.check_new_path(args.json)
    if args.json:
        results_lib.check_new_path(os.path.splitext(args.json)[0] + ".png")
    if other_names:                       # missing bundled data: an error before any work
        from nl_jax.eval import tasks as tasks_lib
        for name in other_names:
            for file in tasks_lib.TASKS[name].files:
                path = os.path.join(tasks_lib.DATA_DIR, file + ".xz")
                if not os.path.exists(path):
                    raise UserError(f"eval: task {name} needs its bundled data {path}, "
                                    f"which is missing; restore it (git checkout "
                                    f"nl_jax/data/assets/eval) or reinstall nl_jax")
    book_text = read_book()

    from nl_jax.eval.harness import NLJaxLM
    with config.unlocked():
        config.train.eval_batches = 0       # no held-out batches: no eval files needed
    trainer = _restored_trainer(config, workdir, "eval")
    step = int(trainer.state["step"])
    rows = batch_size or min(64, len(depths) * samples)
    lm = NLJaxLM(trainer.model_def, trainer.state["params"], trainer.tokenizer,
                 max_len=config.data.seq_len, batch_size=rows)
    hay = Haystacks(trainer.tokenizer, book_text)
    for name in niah_names:                 # a length too short: an error before scoring
        for length in lengths:
            make_samples(name, hay, [length], depths[:1], 1, seed)

    tasks_summary: dict[str, dict] = {}
    niah: dict[str, dict] = {}
    for name in niah_names:
        samples_ = make_samples(name, hay, lengths, depths, samples, seed)
        task_cells = cells(samples_, score(lm, samples_))
        niah[name] = {"cells": task_cells, "description": NIAH_TASKS[name].description}
        tasks_summary[name] = summary(task_cells)
        print(format_table(name, task_cells))
    harness_results = None
    if other_names:
        from nl_jax.eval import tasks as tasks_lib
        harness_results = tasks_lib.evaluate(lm, other_names, limit=limit)
        print(tasks_lib.make_table(harness_results))
        tasks_summary.update(tasks_lib.summary(harness_results))
    result = {"tasks": tasks_summary, "checkpoint_step": step,
              "seq_len": int(config.data.seq_len), "step": step, "niah": niah,
              "lengths": lengths, "depths": depths, "samples": samples, "seed": seed,
              "stream": lm.scorer.stream, "scoring": SCORING, "limit": limit}
    if harness_results is not None:
        result["results"] = harness_results
    print(json.dumps({k: result[k] for k in ("tasks", "checkpoint_step", "seq_len")}))
    overrides = [a for a in argv if a.startswith("--config")]
    key = result_key(step, niah_names + other_names, lengths, depths, samples, seed, limit,
                     overrides)
    title = (f"{os.path.basename(os.path.normpath(workdir))} step {step}: NIAH exact match "
             f"({'memory carried' if lm.scorer.stream else f'last {config.data.seq_len} tokens'})")
    for path in results_lib.save(workdir, key, result, args.json):
        png = os.path.splitext(path)[0] + ".png"
        if not os.path.exists(png):
            plot_heatmaps(niah, png, title)
        print(f"wrote {path} and {png}", file=sys.stderr)
    return 0
