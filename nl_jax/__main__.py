"""Command line: ``python -m nl_jax <command> [flags]``.

Commands:
  train      train (or resume) a model: --config FILE[:ARG] --config.KEY=VALUE --workdir DIR
             (on several hosts: the same command on each, plus --distributed or
             --coordinator HOST:PORT --num_processes N --process_id I)
  eval       held-out loss/perplexity of a workdir's latest checkpoint [--files GLOB ...],
             the papers' tasks (--tasks paper) and needle-in-a-haystack (--tasks
             niah_single_1,... --lengths 1024,4096)
  generate   sample text from a workdir's latest checkpoint [--prompt TEXT --tokens N]
  bench      benchmarks: ``bench memory`` | ``optimizers`` | ``schedules`` | ``throughput``
             | ``mqar`` | ``forgetting`` | ``checkpoint`` | ``data_startup``
             (--json PATH)
  aot        pre-flight: compile the train step for a TPU slice (--topology v5p:4x4x8)
             and report per-chip memory; needs the tpu extra (libtpu)
  levels     print a config's nested levels (step clock and token clock) without
             building anything: --config FILE[:ARG] --config.KEY=VALUE [--json PATH]
  tokenizer  train the bundled byte-level BPE on text files
  data       ``data prepare``: tokenize a corpus once (txt, jsonl, parquet; .gz/.zst) into
             ArrayRecord shards + manifest.json; train on it with --config.data.prepared=DIR

User mistakes (config keys, data files, incompatible checkpoints) print one
``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys

from nl_jax.errors import UserError

USAGE = __doc__


def _workdir(args_workdir: str | None, config) -> str:
    if args_workdir:
        return args_workdir
    from nl_jax.config import REPO_ROOT
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{str(config.model.mixer).replace(',', '+')}-{config.model.mlp}-{stamp}"
    return os.path.join(REPO_ROOT, "runs", name)


def _split_workdir(rest: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--workdir")
    try:
        args, unknown = parser.parse_known_args(rest)
    except argparse.ArgumentError:
        raise UserError("--workdir needs a folder: --workdir DIR") from None
    return args.workdir, unknown


def cmd_train(argv: list[str]) -> int:
    from nl_jax import config as config_lib
    from nl_jax.train import distributed
    config, rest = config_lib.load(argv)
    workdir, unknown = _split_workdir(rest)
    fresh_start = "--fresh_start" in unknown
    unknown = [a for a in unknown if a != "--fresh_start"]
    launch, unknown = distributed.split_flags(unknown)
    if unknown:
        raise UserError(f"train: unknown arguments {unknown}; use --config, "
                        f"--config.KEY=VALUE, --workdir, --fresh_start and the "
                        f"multi-process flags "
                        f"(--distributed, or --coordinator/--num_processes/--process_id)")
    if workdir is None and distributed.requested(launch):
        raise UserError("train: a multi-process run needs --workdir DIR, the same folder "
                        "(seen by every host) on every process")
    distributed.initialize(launch)
    from nl_jax.train.loop import train
    result = train(config, _workdir(workdir, config), fresh_start=fresh_start)
    if result.get("diverged"):
        return 1
    return 128 + int(result["signal"]) if result.get("interrupted") else 0


def _load_run(argv: list[str], command: str):
    """(config, workdir, other args) for commands that read a trained workdir."""
    from nl_jax import config as config_lib
    spec, overrides, rest = config_lib.parse_overrides(argv)
    workdir, rest = _split_workdir(rest)
    if not workdir:
        raise UserError(f"{command}: --workdir DIR is required (a folder made by "
                        f"`python -m nl_jax train`)")
    saved = os.path.join(workdir, "config.json")
    if spec:
        config = config_lib.load_config_file(spec)
    elif os.path.exists(saved):
        import ml_collections
        with open(saved, encoding="utf-8") as f:
            config = ml_collections.ConfigDict(json.load(f))
    else:
        raise UserError(f"{command}: {workdir} has no config.json; pass --config too")
    config = config_lib.apply_overrides(config, overrides)
    if not any(key.startswith("mesh.") for key, _ in overrides):
        _fit_mesh(config, command)
    return config, workdir, rest


def _fit_mesh(config, command: str) -> None:
    """The run's mesh may name more devices than this process has (a pod run read
    back on one host): then spread batch rows over the local devices instead."""
    import jax

    from nl_jax import config as config_lib
    try:
        config_lib.resolve_mesh_shape(config.mesh, jax.device_count())
    except UserError:
        axes = list(config.mesh.keys())
        fill = "data" if "data" in axes else axes[0]
        fitted = {axis: -1 if axis == fill else 1 for axis in axes}
        print(f"note: {command}: the run's mesh {dict(config.mesh)} does not fit the "
              f"{jax.device_count()} device(s) here; using {fitted} (set --config.mesh.* "
              f"to choose)", file=sys.stderr)
        with config.unlocked():
            for axis, size in fitted.items():
                config.mesh[axis] = size


def _restored_trainer(config, workdir: str, command: str):
    from nl_jax.train.loop import Trainer
    if not os.path.isdir(workdir):
        raise UserError(f"{command}: --workdir {workdir} does not exist (a folder made by "
                        f"`python -m nl_jax train`)")
    trainer = Trainer(config, workdir, write_metrics=False, purpose=command)
    if trainer.maybe_restore() == 0:
        raise UserError(f"{command}: no checkpoint in {workdir}/checkpoints")
    return trainer


def cmd_eval(argv: list[str]) -> int:
    from nl_jax.eval import longcontext
    if longcontext.is_longcontext(argv):   # --tasks names niah_single_*: its own flags
        return longcontext.main(argv)
    config, workdir, rest = _load_run(argv, "eval")
    parser = argparse.ArgumentParser(prog="nl_jax eval", add_help=False, exit_on_error=False)
    parser.add_argument("--files", nargs="+", help="held-out text files (globs)")
    parser.add_argument("--batches")
    parser.add_argument("--tasks")
    parser.add_argument("--limit")
    parser.add_argument("--json")
    parser.add_argument("--batch_size")
    try:
        args, unknown = parser.parse_known_args(rest)
    except argparse.ArgumentError as e:
        raise UserError(f"eval: {e}; see `python -m nl_jax eval --help`") from None
    if unknown:
        raise UserError(f"eval: unknown arguments {unknown}; see `python -m nl_jax eval --help`")
    from nl_jax.eval import results as results_lib
    if args.tasks is not None:
        if args.files or args.batches is not None:
            raise UserError("eval: --files and --batches are for the held-out loss; "
                            "--tasks runs the bundled tasks (use one or the other)")
        return results_lib.run_tasks(
            config, workdir, spec=args.tasks,
            limit=results_lib.positive_int("--limit", args.limit), json_path=args.json,
            batch_size=results_lib.positive_int("--batch_size", args.batch_size),
            overrides=[a for a in argv if a.startswith("--config")])
    for flag in ("limit", "batch_size"):
        if getattr(args, flag) is not None:
            raise UserError(f"eval: --{flag} goes with --tasks (the held-out loss takes "
                            f"--batches N)")
    if args.files:
        config.data.eval_files = tuple(args.files)
    if args.batches is not None:
        batches = results_lib.positive_int("--batches", args.batches)
        config.train.eval_batches = batches
    if not config.train.eval_batches:
        raise UserError("eval: train.eval_batches is 0 in this run's config (no held-out "
                        "evaluation); pass --batches N")
    results_lib.check_new_path(args.json)
    trainer = _restored_trainer(config, workdir, "eval")
    step = int(trainer.state["step"])
    result = {"step": step, **trainer.evaluate(), "files": list(config.data.eval_files)}
    print(json.dumps(result))
    key = results_lib.heldout_key(step, config.data.eval_files, config.train.eval_batches)
    for path in results_lib.save(workdir, key, result, args.json):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_generate(argv: list[str]) -> int:
    config, workdir, rest = _load_run(argv, "generate")
    parser = argparse.ArgumentParser(prog="nl_jax generate")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", action="store_true",
                        help="slide a window of data.seq_len tokens even for models whose "
                             "memory carries the whole text (Titans, Hope)")
    args = parser.parse_args(rest)
    if args.tokens < 1:
        raise UserError(f"generate: --tokens must be a positive integer, got {args.tokens}")
    if args.temperature < 0:
        raise UserError(f"generate: --temperature must be >= 0 (0: greedy), got "
                        f"{args.temperature}")
    trainer = _restored_trainer(config, workdir, "generate")
    from nl_jax.eval.generate import generate
    print(generate(trainer.model_def, trainer.state["params"], trainer.tokenizer,
                   prompt=args.prompt, num_tokens=args.tokens,
                   max_len=config.data.seq_len, temperature=args.temperature,
                   seed=args.seed, stream=False if args.window else None))
    return 0


BENCHMARKS = ("checkpoint", "data_startup", "forgetting", "memory", "mqar", "optimizers",
              "schedules", "throughput")


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        raise UserError("bench: choose a benchmark: "
                        + ", ".join(f"`bench {name}`" for name in BENCHMARKS))
    import importlib
    module = importlib.import_module(f"nl_jax.bench.{argv[0]}")
    return module.main(argv[1:])


def cmd_aot(argv: list[str]) -> int:
    from nl_jax.train import aot
    return aot.main(argv)


def cmd_levels(argv: list[str]) -> int:
    from nl_jax import config as config_lib
    from nl_jax import levels as levels_lib
    config, rest = config_lib.load(argv)
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--json")
    try:
        args, unknown = parser.parse_known_args(rest)
    except argparse.ArgumentError:
        raise UserError("levels: --json needs a file path: --json PATH") from None
    if unknown:
        raise UserError(f"levels: unknown arguments {unknown}; use --config, "
                        f"--config.KEY=VALUE and --json PATH")
    tree = levels_lib.levels_tree(config)
    print(levels_lib.format_tree(tree))
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(tree, f, indent=2)
        except OSError as e:
            raise UserError(f"levels: cannot write --json {args.json}: {e.strerror}") from None
    return 0


def cmd_data(argv: list[str]) -> int:
    from nl_jax.data import prepared
    return prepared.main(argv)


def cmd_tokenizer(argv: list[str]) -> int:
    from nl_jax.data import tokenizer
    return tokenizer.main(argv)


_CONFIG = """
  --config FILE[:ARG]   a config file with get_config() (default: nl_jax/configs/hope/tiny.py)
  --config.KEY=VALUE    override a key of it, e.g. --config.train.steps=500"""
_RUN_CONFIG = """
  --workdir DIR         the run's folder, made by `train` (required)
  --config FILE[:ARG]   a config file with get_config() (default: the run's own,
                        DIR/config.json, saved by `train`)
  --config.KEY=VALUE    override a key of it, e.g. --config.data.seq_len=256"""
_SWAP = """
  --config.levels.L.optimizer.name=X  run level L on optimizer X with X's own
                        settings (learning rate and schedule included); other
                        --config.levels.L.optimizer.* flags apply on top"""
_COMMON = _CONFIG + """
  --workdir DIR         the run's folder (checkpoints, metrics, config.json)"""
HELP = {
    "train": "usage: python -m nl_jax train [--config FILE[:ARG]] [--config.KEY=VALUE ...] "
             "[--workdir DIR]\n\nTrains, or resumes from the latest checkpoint in "
             "--workdir." + _COMMON + _SWAP + """
  --fresh_start         train from scratch although the workdir holds only damaged
                        checkpoints (they are moved aside, never deleted)
  --distributed         multi-process (TPU pod slices, SLURM, Open MPI), or
  --coordinator HOST:PORT --num_processes N --process_id I""",
    "eval": "usage: python -m nl_jax eval --workdir DIR [--files GLOB ...] [--batches N] "
            "[--tasks TASKS [--limit N] [--batch_size N]] [--json PATH] [--config FILE] "
            "[--config.KEY=VALUE ...]\n\nEvaluates the latest checkpoint: held-out loss and "
            "perplexity (default), or zero-shot tasks with --tasks (lm-evaluation-harness "
            "0.4.13 prompts and metrics, bundled data, nothing fetched).  Each result is "
            "printed and written to a new file DIR/evals/step<S>-<what>-<settings>.json "
            "(never overwritten)." + _RUN_CONFIG + """
  --files GLOB ...      held-out text files (default: the run's data.eval_files)
  --batches N           number of batches (default: the run's train.eval_batches)
  --tasks TASKS         comma-separated: lambada_openai, piqa, arc_easy, arc_challenge,
                        boolq, winogrande, openbookqa, copa, wikitext, or paper (the
                        bundled part of the papers' table; HellaSwag and SIQA are not
                        bundled).  wikitext is the tokenized v1 test split: not
                        comparable to published wikitext-2-raw numbers.  Prints the
                        harness's table and {"tasks": {name: {metric: value}},
                        "checkpoint_step", "seq_len"}
  --limit N             the first N documents of each task
  --batch_size N        rows per batch (default: fit about 512 MiB of logits)
  --json PATH           also write the result here (a new file; never overwritten)
  (the harness's own command line: python -m nl_jax.lm_eval --model_args workdir=DIR
  --tasks ...; needs pip install 'nl_jax[lm_eval]')
  (needle-in-a-haystack, --tasks niah_single_1,2,3 with --lengths, --depths, --samples:
  python -m nl_jax eval --tasks niah_single_1 --help)""",
    "generate": "usage: python -m nl_jax generate --workdir DIR [--prompt TEXT] "
                "[--tokens N] [--temperature T] [--seed S] [--window] [--config FILE] "
                "[--config.KEY=VALUE ...]\n\nSamples text from the latest checkpoint."
                + _RUN_CONFIG + """
  --prompt TEXT         the start of the text (empty: an unconditional sample)
  --tokens N            tokens to sample (default 64)
  --temperature T       softmax temperature, 0 for greedy (default 0.8)
  --window              slide a window of data.seq_len tokens even for models whose
                        memory carries the whole text (Titans, Hope)""",
    "bench": "usage: python -m nl_jax bench {" + ",".join(BENCHMARKS) + "} [flags]\n\n"
             "Benchmarks (each prints a table; --json PATH writes its rows and a PNG):\n"
             "  checkpoint   what integrity checksums add to a checkpoint save and restore\n"
             "  memory       one token-clock memory level alone: oracle scan vs chunked "
             "form\n"
             "  optimizers   the nl_jax/configs/optimizers configs on a tiny byte-level LM\n"
             "  schedules    CMS update-frequency schedules on a tiny byte-level LM\n"
             "  data_startup startup of a run on 100x the bundled corpus: prepared shards "
             "vs text files\n"
             "  forgetting   continual learning: held-out loss on every domain after each "
             "stage, average forgetting (Transformer++, Titans, Hope with 1-3 CMS levels)\n"
             "  mqar         multi-query associative recall: trains each model on it, "
             "accuracy by length and key-value pairs\n"
             "  throughput   training speed (tokens/s, step memory) of every family's "
             "tiny config\n\n"
             "`python -m nl_jax bench NAME --help` lists a benchmark's flags.",
    "aot": "usage: python -m nl_jax aot --topology TOPOLOGY [--config FILE[:ARG]] "
           "[--config.KEY=VALUE ...] [--json PATH]\n\nPre-flight: compiles the train "
           "step of a config for a TPU slice without one, and reports per-chip memory "
           "(exit 1 if it does not fit) and an estimated step time and MFU (a roofline: "
           "model FLOPs vs the chips' peak, bytes accessed vs HBM bandwidth; collective "
           "bytes reported).  Needs the tpu extra (libtpu)." + _CONFIG + """
  --topology TOPOLOGY   e.g. v5p:4x4x8 or v5e:4x4; local: the devices of this machine
  --json PATH           write the report (memory, estimates) here""",
    "levels": "usage: python -m nl_jax levels [--config FILE[:ARG]] [--config.KEY=VALUE ...] "
              "[--json PATH]\n\nPrints a config's nested levels, slowest to fastest: the "
              "step-clock levels (config.levels: parameters owned, optimizer with every "
              "resolved setting, period, schedule; for matrix optimizers which parameters "
              "fall back to AdamW) and the token-clock levels of the model (in-context "
              "memories and CMS levels: map, objective, update rule, chunk or period, "
              "inner learning rate, bounds).  Builds nothing: shapes only." + _CONFIG
              + _SWAP + """
  --json PATH           also write the tree as JSON""",
}

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "bench": cmd_bench, "aot": cmd_aot, "levels": cmd_levels,
            "tokenizer": cmd_tokenizer, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv.pop(0)
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    asks_help = any(a in ("-h", "--help") for a in argv)
    if command == "bench" and argv and argv[0] in BENCHMARKS:
        asks_help = False     # `bench NAME --help`: the benchmark's own flags
    if command == "eval" and any("niah_" in a for a in argv):
        asks_help = False     # the long-context tasks' own flags (eval.longcontext)
    if command in HELP and asks_help:
        print(HELP[command])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax", "orbax", "tensorstore", "grain", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # orbax logs through absl, and warns about what nl_jax reports itself in one
    # line (e.g. the missing metadata of a damaged checkpoint it then skips).
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return COMMANDS[command](argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C outside the training loop (which saves first)
        print(f"interrupted: {command} stopped (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
