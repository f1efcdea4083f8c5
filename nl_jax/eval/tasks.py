"""The bundled zero-shot tasks of the Titans / Nested Learning tables, offline.

One definition per task serves both evaluators: ``nl_jax eval --tasks`` (the
in-repo ``evaluate`` below, no harness needed) and the lm-evaluation-harness
(``python -m nl_jax.lm_eval``, through ``harness_yaml``).  Prompts, choices,
target delimiter and metrics are those of lm-eval 0.4.13's task YAMLs; only
where the documents come from differs: the files in
``nl_jax/data/assets/eval/`` (xz-compressed, checked against the SHA-256 of the
source files on every load; provenance in ``assets/SOURCES.md``).  Several are
MosaicML's converted formats; ``_load_*`` maps their fields back:

- arc_easy / arc_challenge (test): ``"Question: {question}\\nAnswer:"`` + " " + choice;
  mosaic ``query`` is ``"Question: {question}"``.
- openbookqa (test): ``"{question_stem}"`` + " " + choice; mosaic ``query`` is the stem.
- boolq (validation): ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + " no"/" yes";
  mosaic ``query`` is ``"Passage: {passage}\\nQuestion: {question}?"``.
- copa (validation): ``premise[:-1] + " because"/" therefore"`` + "  " + choice
  (lowercased first letter; the harness's choices start with a space and its
  delimiter adds a second); mosaic ``query`` and ``choices`` are already so.
- winogrande (xl dev): each ``sentence[:blank] + option`` as context, + " " +
  ``sentence[blank+1:].strip()`` scored (partial scoring); mosaic gives exactly
  ``context_options`` and ``continuation``.
- piqa (validation): ``"Question: {goal}\\nAnswer:"`` + " " + sol; canonical files.
- lambada_openai (test): all but the last space-separated word, + " " + last word;
  canonical file.
- wikitext: NOT the harness's task.  The bundled WikiText-2 is the tokenized v1
  test split (``<unk>`` for rare words); it is cut into articles at the top-level
  `` = Title = `` lines, detokenized with the harness's ``wikitext_detokenizer``
  and scored as whole documents (word and byte perplexity, bits per byte).  Not
  comparable to published wikitext-2-raw numbers.

Not bundled (no faithful copy could be found): HellaSwag and SIQA, both in the
papers' commonsense table.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nl_jax.errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets", "eval")

# file -> SHA-256 of its decompressed bytes (the source file's, see SOURCES.md)
SHA256 = {
    "lambada_openai_test.jsonl":
        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "arc_easy_test.jsonl": "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
    "arc_challenge_test.jsonl":
        "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    "boolq_validation.jsonl": "454ff101e614370bb1807fe7ebbda6fdb57e794b9662cc1ccae211bf1ff626c8",
    "copa_validation.jsonl": "595dca44dec54c849490bd403a3e24a29e3b944065783222ebb0eb1a55298846",
    "openbookqa_test.jsonl": "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09",
    "winogrande_xl_dev.jsonl": "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
    "piqa_valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa_valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "wikitext2_v1_test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}

NOT_BUNDLED = ("hellaswag", "siqa")
PAPER_NOTE = ("the papers' commonsense table also has HellaSwag and SIQA, which are not "
              "bundled (no faithful offline copy); they are left out")


def read_bundled(name: str, data_dir: str | None = None) -> str:
    """The text of a bundled file, checked against its source's SHA-256."""
    path = os.path.join(data_dir or DATA_DIR, name + ".xz")
    try:
        with lzma.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"eval: the bundled task data {path} is missing; restore it "
                        f"(git checkout nl_jax/data/assets/eval) or reinstall nl_jax") from None
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise UserError(f"eval: the bundled task data {path} cannot be read ({e}); restore "
                        f"it (git checkout nl_jax/data/assets/eval)") from None
    if hashlib.sha256(raw).hexdigest() != SHA256[name]:
        raise UserError(f"eval: the bundled task data {path} does not match its SHA-256 in "
                        f"nl_jax/data/assets/SOURCES.md; restore it (git checkout "
                        f"nl_jax/data/assets/eval)")
    return raw.decode("utf-8")


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in read_bundled(name).splitlines() if line.strip()]


# -- documents (mapped to the fields of the harness's own datasets) --------------

def _load_arc(name: str) -> list[dict]:
    docs = []
    for d in _jsonl(name):
        assert d["query"].startswith("Question: "), d
        docs.append({"question": d["query"][len("Question: "):], "choices": d["choices"],
                     "gold": d["gold"]})
    return docs


def _load_boolq() -> list[dict]:
    docs = []
    for d in _jsonl("boolq_validation.jsonl"):
        passage, question = d["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)
        docs.append({"passage": passage, "question": question.removesuffix("?"),
                     "gold": d["gold"]})
    return docs


def _load_piqa() -> list[dict]:
    docs = _jsonl("piqa_valid.jsonl")
    labels = read_bundled("piqa_valid-labels.lst").split()
    assert len(labels) == len(docs)
    return [{**d, "gold": int(label)} for d, label in zip(docs, labels, strict=True)]


def _load_lambada() -> list[dict]:
    return _jsonl("lambada_openai_test.jsonl")


_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_pages(text: str) -> list[str]:
    """Articles of a WikiText file: each starts at a top-level `` = Title = `` line."""
    pages: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return ["".join(p) for p in pages if "".join(p).strip()]


def _load_wikitext() -> list[dict]:
    return [{"page": p} for p in wikitext_pages(read_bundled("wikitext2_v1_test.txt"))]


def wikitext_detokenizer(doc: dict) -> str:
    """lm-eval 0.4.13's ``tasks/wikitext/preprocess_wikitext.wikitext_detokenizer``."""
    string = doc["page"]
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


# -- prompts (doc_to_text / doc_to_choice / doc_to_target as in lm-eval 0.4.13) ---

def arc_text(doc): return f"Question: {doc['question']}\nAnswer:"
def choices(doc): return list(doc["choices"])
def gold(doc): return int(doc["gold"])
def obqa_text(doc): return doc["query"]
def boolq_text(doc): return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
def boolq_choices(doc): return ["no", "yes"]
def copa_text(doc): return doc["query"]
def copa_choices(doc): return [" " + c for c in doc["choices"]]
def piqa_text(doc): return f"Question: {doc['goal']}\nAnswer:"
def piqa_choices(doc): return [doc["sol1"], doc["sol2"]]
def wino_contexts(doc): return list(doc["context_options"])   # doc_to_choice
def wino_target(doc): return doc["continuation"]
def lambada_text(doc): return " ".join(doc["text"].split(" ")[:-1])
def lambada_target(doc): return " " + doc["text"].split(" ")[-1]
def empty_text(doc): return ""


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str      # multiple_choice | loglikelihood | loglikelihood_rolling
    split: str
    load: Callable[[], list[dict]]
    doc_to_text: Callable[[dict], object]
    doc_to_target: Callable[[dict], object]
    doc_to_choice: Callable[[dict], list[str]] | None
    metrics: tuple[str, ...]
    version: float = 1.0
    multiple_input: bool = False       # winogrande: the choices are the contexts
    alias: str | None = None
    source: str = ""
    files: tuple[str, ...] = field(default=())


def _mc(name, split, load, text, choice, metrics=("acc", "acc_norm"), version=1.0, **kw):
    return Task(name, "multiple_choice", split, load, text, gold, choice, metrics,
                version, **kw)


TASKS: dict[str, Task] = {t.name: t for t in [
    _mc("arc_easy", "test", lambda: _load_arc("arc_easy_test.jsonl"), arc_text, choices,
        files=("arc_easy_test.jsonl",), source="ARC-Easy test, MosaicML ICL format"),
    _mc("arc_challenge", "test", lambda: _load_arc("arc_challenge_test.jsonl"), arc_text,
        choices, files=("arc_challenge_test.jsonl",),
        source="ARC-Challenge test, MosaicML ICL format"),
    _mc("boolq", "validation", _load_boolq, boolq_text, boolq_choices, metrics=("acc",),
        version=2.0, files=("boolq_validation.jsonl",),
        source="BoolQ validation, MosaicML ICL format"),
    _mc("copa", "validation", lambda: _jsonl("copa_validation.jsonl"), copa_text,
        copa_choices, metrics=("acc",), files=("copa_validation.jsonl",),
        source="COPA validation (100), MosaicML ICL format"),
    _mc("openbookqa", "test", lambda: _jsonl("openbookqa_test.jsonl"), obqa_text, choices,
        files=("openbookqa_test.jsonl",), source="OpenBookQA test, MosaicML ICL format"),
    _mc("piqa", "validation", _load_piqa, piqa_text, piqa_choices,
        files=("piqa_valid.jsonl", "piqa_valid-labels.lst"),
        source="PIQA validation, canonical files"),
    Task("winogrande", "multiple_choice", "validation",
         lambda: _jsonl("winogrande_xl_dev.jsonl"), gold, wino_target, wino_contexts,
         ("acc",), multiple_input=True, files=("winogrande_xl_dev.jsonl",),
         source="WinoGrande xl dev, MosaicML ICL partial-scoring format"),
    Task("lambada_openai", "loglikelihood", "test", _load_lambada, lambada_text,
         lambada_target, None, ("perplexity", "acc"), files=("lambada_openai_test.jsonl",),
         source="LAMBADA (OpenAI detokenized) test, canonical file"),
    Task("wikitext", "loglikelihood_rolling", "test", _load_wikitext, empty_text,
         wikitext_detokenizer, None, ("word_perplexity", "byte_perplexity", "bits_per_byte"),
         version=0.0, alias="wikitext (v1 tokenized test; not comparable to wikitext-2-raw)",
         files=("wikitext2_v1_test.txt",),
         source="WikiText-2 v1 TOKENIZED test, not the harness's wikitext-2-raw task"),
]}

# The bundled part of the Titans / Nested Learning commonsense table.
PAPER = ("wikitext", "lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge",
         "boolq")


def available() -> str:
    """The task names ``--tasks`` accepts, for error messages."""
    from nl_jax.eval.longcontext import NIAH_TASKS
    return f"paper, {', '.join(TASKS)}, {', '.join(NIAH_TASKS)}"


def resolve(spec: str) -> list[str]:
    """Task names from ``--tasks`` (comma separated; ``paper``: ``PAPER``).  The
    long-context tasks (``nl_jax.eval.longcontext``) are run there, not here."""
    from nl_jax.eval.longcontext import NIAH_TASKS
    names: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        expanded = PAPER if name == "paper" else (name,)
        for n in expanded:
            if n in NOT_BUNDLED:
                raise UserError(f"eval: task {n!r} is not bundled (no faithful offline copy "
                                f"exists); available: {available()}")
            if n in NIAH_TASKS:
                raise UserError(f"eval: task {n!r} is a long-context task, run by "
                                f"nl_jax.eval.longcontext.main, not by this evaluator")
            if n not in TASKS:
                raise UserError(f"eval: unknown task {n!r}; available: {available()}")
            if n not in names:
                names.append(n)
    if not names:
        raise UserError(f"eval: --tasks names no task; available: {available()}")
    return names


# -- requests and metrics, as lm-eval 0.4.13 builds and scores them --------------

def requests_for(task: Task, doc: dict) -> list[tuple]:
    """The harness's ``Instance.args`` of one document (0-shot, no chat template)."""
    if task.output_type == "loglikelihood":
        return [(task.doc_to_text(doc), task.doc_to_target(doc))]
    if task.output_type == "loglikelihood_rolling":
        return [(task.doc_to_target(doc),)]
    if task.multiple_input:
        cont = task.doc_to_target(doc)
        return [(ctx, f" {cont}") for ctx in task.doc_to_choice(doc)]
    ctx = task.doc_to_text(doc)
    return [(ctx, f" {c}") for c in task.doc_to_choice(doc)]


def doc_metrics(task: Task, doc: dict, results: list) -> dict[str, object]:
    """Per-document values (``Task.process_results`` of the harness)."""
    if task.output_type == "loglikelihood":
        ll, greedy = results[0]
        return {"perplexity": ll, "acc": int(greedy)}
    if task.output_type == "loglikelihood_rolling":
        (ll,) = results
        words = len(re.split(r"\s+", doc["page"]))
        nbytes = len(doc["page"].encode("utf-8"))
        return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes),
                "bits_per_byte": (ll, nbytes)}
    lls = np.array([r[0] for r in results])
    options = task.doc_to_choice(doc)
    lengths = np.array([float(len(o)) for o in options])
    target = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return {"acc": float(np.argmax(lls) == target),
            "acc_norm": float(np.argmax(lls / lengths) == target)}


def aggregate(metric: str, values: list) -> tuple[float, float | None]:
    """(value, standard error or None) over documents, as the harness aggregates."""
    if metric == "perplexity":
        return math.exp(-float(np.mean(values))), None
    if metric in ("word_perplexity", "byte_perplexity"):
        lls, counts = zip(*values, strict=True)
        return math.exp(-sum(lls) / sum(counts)), None
    if metric == "bits_per_byte":
        lls, counts = zip(*values, strict=True)
        return -sum(lls) / sum(counts) / math.log(2), None
    arr = np.asarray(values, np.float64)
    stderr = float(np.std(arr, ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else None
    return float(np.mean(arr)), stderr


def limited(docs: list[dict], limit: int | None) -> list[dict]:
    return docs if limit is None else docs[:limit]


def evaluate(lm, names: Sequence[str], *, limit: int | None = None) -> dict:
    """Runs the tasks on ``lm`` (``loglikelihood`` / ``loglikelihood_rolling`` on
    lists of argument tuples); returns the harness-shaped results:
    ``{"results": {task: {"metric,none": v, "metric_stderr,none": s}}, "versions",
    "n-shot", "n-samples", "higher_is_better"}``."""
    out = {"results": {}, "versions": {}, "n-shot": {}, "n-samples": {},
           "higher_is_better": {}}
    for name in names:
        task = TASKS[name]
        all_docs = task.load()
        docs = limited(all_docs, limit)
        per_doc = [requests_for(task, d) for d in docs]
        flat = [args for reqs in per_doc for args in reqs]
        answers = (lm.loglikelihood_rolling(flat) if task.output_type ==
                   "loglikelihood_rolling" else lm.loglikelihood(flat))
        values: dict[str, list] = {m: [] for m in task.metrics}
        at = 0
        for doc, reqs in zip(docs, per_doc, strict=True):
            res = answers[at:at + len(reqs)]
            at += len(reqs)
            for metric, v in doc_metrics(task, doc, res).items():
                if metric in values:
                    values[metric].append(v)
        row = {"alias": task.alias or name}
        for metric in task.metrics:
            value, stderr = aggregate(metric, values[metric])
            row[f"{metric},none"] = value
            row[f"{metric}_stderr,none"] = "N/A" if stderr is None else stderr
        out["results"][name] = row
        out["versions"][name] = task.version
        out["n-shot"][name] = 0
        out["n-samples"][name] = {"original": len(all_docs), "effective": len(docs)}
        out["higher_is_better"][name] = {m: m.startswith("acc") for m in task.metrics}
    return out


def summary(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from harness-shaped results (stderr dropped)."""
    tasks = {}
    for name, row in results["results"].items():
        tasks[name] = {k.split(",")[0]: v for k, v in row.items()
                       if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return tasks


def make_table(results: dict) -> str:
    """The harness's markdown table (``lm_eval.utils.make_table`` columns)."""
    head = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    rows = []
    for name, row in results["results"].items():
        hib = results.get("higher_is_better", {}).get(name, {})
        first = True
        for key in sorted(k for k in row if "," in k and "_stderr" not in k):
            metric, filt = key.split(",")
            stderr = row.get(f"{metric}_stderr,{filt}", "N/A")
            arrow = "↑" if hib.get(metric) else "↓"
            rows.append([row.get("alias", name) if first else "",
                         str(results["versions"].get(name, "N/A")) if first else "",
                         filt, str(results["n-shot"].get(name, 0)), metric, arrow,
                         f"{row[key]:.4f}", "±",
                         stderr if isinstance(stderr, str) else f"{stderr:.4f}"])
            first = False
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "|" + "|".join(c.ljust(w) for c, w in zip(cells, widths,  # noqa: E731
                                                                    strict=True)) + "|"
    return "\n".join([line(head), "|" + "|".join("-" * w for w in widths) + "|",
                      *(line(r) for r in rows)])


# -- the same tasks for the harness (python -m nl_jax.lm_eval) -------------------

def harness_dataset(name: str):
    """``custom_dataset`` of a task: ``{split: datasets.Dataset}`` of the bundled docs."""
    import datasets
    return {TASKS[name].split: datasets.Dataset.from_list(TASKS[name].load())}


def _fn(f) -> str:
    return f"!function {f.__module__}.{f.__name__}"


def harness_yaml(name: str) -> str:
    """A task YAML for the harness's ``--include_path`` (its functions are this
    module's, so prompts and data are those of ``nl_jax eval --tasks``)."""
    task = TASKS[name]
    lines = [f"task: {name}",
             f"custom_dataset: !function nl_jax.eval.tasks.dataset_{name}",
             f"output_type: {task.output_type}",
             f"{'test' if task.split == 'test' else 'validation'}_split: {task.split}"]
    if task.alias:
        lines.append(f"task_alias: {json.dumps(task.alias)}")
    if task.output_type == "loglikelihood_rolling":
        lines += ["doc_to_text: ''", f"doc_to_target: {_fn(task.doc_to_target)}",
                  "process_results: !function nl_jax.eval.tasks.wikitext_process_results"]
    else:
        lines += [f"doc_to_text: {_fn(task.doc_to_text)}",
                  f"doc_to_target: {_fn(task.doc_to_target)}"]
        if task.doc_to_choice is not None:
            lines.append(f"doc_to_choice: {_fn(task.doc_to_choice)}")
    lines.append("metric_list:")
    for metric in task.metrics:
        lines.append(f"  - metric: {metric}")
        if metric.startswith("acc"):
            lines += ["    aggregation: mean", "    higher_is_better: true"]
        elif metric == "perplexity":
            lines += ["    aggregation: perplexity", "    higher_is_better: false"]
    lines += ["metadata:", f"  version: {task.version}"]
    return "\n".join(lines) + "\n"


def wikitext_process_results(doc, results):
    return doc_metrics(TASKS["wikitext"], doc, list(results))


def _dataset_fn(name):
    def load(**_):
        return harness_dataset(name)
    load.__name__ = f"dataset_{name}"
    return load


for _name in TASKS:
    globals()[f"dataset_{_name}"] = _dataset_fn(_name)
