"""The lm-evaluation-harness's own command line with nl_jax models and the bundled tasks.

    python -m nl_jax.lm_eval --model_args workdir=RUN --tasks arc_easy,piqa [--limit N] [...]

lm-eval 0.4.13 discovers no plugin models, so this registers ``nl_jax`` (the
``NLJaxHarnessLM`` below) with the harness, points its ``--include_path`` at the
bundled task definitions (``nl_jax.eval.tasks``: the harness's prompts on the
files in ``nl_jax/data/assets/eval/``; these shadow the harness's tasks of the
same names, which would download their data), switches the Hugging Face
libraries offline, and hands over to ``lm_eval``'s CLI (``--model nl_jax`` is
added unless given; every other harness flag works as usual).  Needs the
``lm_eval`` extra: ``pip install -e '.[lm_eval]'``.

``--model_args``: ``workdir=RUN`` (required), ``batch_size=N``, and the run's
config overrides as ``config=FILE`` or ``config.KEY=VALUE`` pairs (e.g.
``config.data.seq_len=256``).
"""

from __future__ import annotations

import os
import sys
import tempfile

from nl_jax.errors import UserError
from nl_jax.eval.harness import NLJaxLM

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1"}


def _require_harness():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError:
        raise UserError("lm_eval: the lm-evaluation-harness is not installed; pip install "
                        "-e '.[lm_eval]' (lm-eval 0.4.13), or use `python -m nl_jax eval "
                        "--tasks ...`, which needs no harness") from None
    return LM


def harness_class():
    """``NLJaxHarnessLM``: ``NLJaxLM`` as a subclass of the harness's ``LM``."""
    base = _require_harness()

    class NLJaxHarnessLM(NLJaxLM, base):
        def __init__(self, workdir: str | None = None, batch_size=None, max_batch_size=None,
                     device=None, config: str | None = None, **overrides):
            base.__init__(self)
            if not workdir:
                raise UserError("lm_eval: --model_args needs workdir=RUN (a folder made by "
                                "`python -m nl_jax train`)")
            from nl_jax.__main__ import _load_run, _restored_trainer
            argv = ["--workdir", str(workdir)]
            if config:
                argv += ["--config", str(config)]
            argv += [f"--{k}={v}" for k, v in overrides.items()]
            cfg, workdir, rest = _load_run(argv, "eval")
            if rest:
                raise UserError(f"lm_eval: unknown --model_args {rest}; use workdir=, "
                                f"batch_size=, config= and config.KEY=VALUE")
            with cfg.unlocked():
                cfg.train.eval_batches = 0
            trainer = _restored_trainer(cfg, workdir, "eval")
            self.checkpoint_step = int(trainer.state["step"])
            rows = None if batch_size in (None, "", "auto") else int(batch_size)
            NLJaxLM.__init__(self, trainer.model_def, trainer.state["params"],
                             trainer.tokenizer, max_len=cfg.data.seq_len, batch_size=rows)

    return NLJaxHarnessLM


def register() -> type:
    """Registers the model with the harness as ``nl_jax``; returns its class."""
    _require_harness()
    from lm_eval.api.registry import register_model
    cls = harness_class()
    register_model("nl_jax")(cls)
    return cls


def write_task_yamls(folder: str) -> None:
    from nl_jax.eval import tasks as tasks_lib
    for name in tasks_lib.TASKS:
        with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(tasks_lib.harness_yaml(name))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.update(OFFLINE)
    try:
        register()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate
    with tempfile.TemporaryDirectory(prefix="nl_jax_tasks_") as folder:
        write_task_yamls(folder)
        if not any(a == "--model" or a.startswith("--model=") for a in argv):
            argv = ["--model", "nl_jax", *argv]
        argv += ["--include_path", folder]
        saved = sys.argv
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
