"""``nl_jax eval``: result files (one per evaluation, never overwritten) and the
``--tasks`` run (bundled zero-shot tasks, see ``nl_jax.eval.tasks``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from nl_jax.errors import UserError

RESULTS_DIR = "evals"


def positive_int(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1 or str(n) != value.strip():
        raise UserError(f"eval: {flag} must be a positive integer, got {value!r}")
    return n


def check_new_path(path: str | None) -> None:
    """``--json PATH`` must not exist (a result is never overwritten) and its
    folder must: checked before any work."""
    if path is None:
        return
    if os.path.exists(path):
        raise UserError(f"eval: --json {path} exists and results are never overwritten; "
                        f"give a new path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"eval: --json {path}: folder {folder} does not exist; create it or "
                        f"give another path")


def _write_new(path: str, result: dict) -> str:
    """Writes ``result`` at ``path`` or, when that exists, ``path`` with ``-2``,
    ``-3``, ... before ``.json``; never replaces a file (``os.link`` refuses an
    existing name).  Returns the path written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    try:
        stem, n, target = path[:-len(".json")], 1, path
        while True:
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                n += 1
                target = f"{stem}-{n}.json"
    finally:
        os.unlink(tmp)


def save(workdir: str, key: str, result: dict, json_path: str | None = None) -> list[str]:
    """Writes ``WORKDIR/evals/<key>.json`` (a new name if it exists) and ``json_path``."""
    written = []
    try:
        folder = os.path.join(workdir, RESULTS_DIR)
        os.makedirs(folder, exist_ok=True)
        written.append(_write_new(os.path.join(folder, f"{key}.json"), result))
        if json_path:
            with open(json_path, "x", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            written.append(json_path)
    except FileExistsError:
        raise UserError(f"eval: the result is printed above, but --json {json_path} was "
                        f"created meanwhile and is never overwritten; it is in "
                        f"{written[0]}") from None
    except OSError as e:
        raise UserError(f"eval: the result is printed above, but it cannot be written "
                        f"({e.strerror}: {e.filename}); make the workdir writable to keep "
                        f"it") from None
    return written


def short(text: str, limit: int = 80) -> str:
    if len(text) <= limit:
        return text
    return text[:limit - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def heldout_key(step: int, files, batches: int) -> str:
    digest = hashlib.sha256(json.dumps(list(files)).encode()).hexdigest()[:8]
    return f"step{step}-heldout-batches{batches}-files{digest}"


def tasks_key(step: int, names, limit: int | None, overrides) -> str:
    key = f"step{step}-tasks-{'+'.join(names)}-limit{limit if limit else 'all'}"
    if overrides:
        key += "-cfg" + hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
    return short(key, 120)


def run_tasks(config, workdir: str, *, spec: str, limit: int | None,
              json_path: str | None, batch_size: int | None, overrides) -> int:
    """``nl_jax eval --tasks``: the table, then the summary JSON; both saved."""
    from nl_jax.eval import tasks as tasks_lib
    names = tasks_lib.resolve(spec)
    for name in names:                        # missing data: an error before any work
        for file in tasks_lib.TASKS[name].files:
            path = os.path.join(tasks_lib.DATA_DIR, file + ".xz")
            if not os.path.exists(path):
                raise UserError(f"eval: task {name} needs its bundled data {path}, which is "
                                f"missing; restore it (git checkout nl_jax/data/assets/eval) "
                                f"or reinstall nl_jax")
    check_new_path(json_path)
    notes = []
    if "paper" in [s.strip() for s in spec.split(",")]:
        notes.append(tasks_lib.PAPER_NOTE)
    if "wikitext" in names:
        notes.append("wikitext is the tokenized WikiText-2 v1 test split (<unk> for rare "
                     "words): not comparable to published wikitext-2-raw numbers")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    from nl_jax.__main__ import _restored_trainer
    from nl_jax.eval.harness import NLJaxLM
    with config.unlocked():
        config.train.eval_batches = 0          # no held-out batches: no eval files needed
    trainer = _restored_trainer(config, workdir, "eval")
    step = int(trainer.state["step"])
    lm = NLJaxLM(trainer.model_def, trainer.state["params"], trainer.tokenizer,
                 max_len=config.data.seq_len, batch_size=batch_size)
    results = tasks_lib.evaluate(lm, names, limit=limit)
    summary = {"tasks": tasks_lib.summary(results), "checkpoint_step": step,
               "seq_len": int(config.data.seq_len), "step": step, "limit": limit,
               "num_fewshot": 0, "notes": notes,
               "evaluator": "nl_jax.eval.tasks (lm-eval 0.4.13 prompts and metrics)",
               "results": results}
    print(tasks_lib.make_table(results))
    print(json.dumps({k: summary[k] for k in ("tasks", "checkpoint_step", "seq_len")}))
    for path in save(workdir, tasks_key(step, names, limit, overrides), summary, json_path):
        print(f"wrote {path}", file=sys.stderr)
    return 0
