"""The training loop: config -> data + model + levels -> steps -> metrics + checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from nl_jax import config as config_lib
from nl_jax.errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointStructureError,
    ConfigError,
)
from nl_jax.train import checkpoint as ckpt_lib
from nl_jax.train import metrics as metrics_lib
from nl_jax.train import mfu as mfu_lib
from nl_jax.train.distributed import agreed_max, is_primary
from nl_jax.train.lock import RunLock
from nl_jax.train.mesh import check_process_rows
from nl_jax.train.state import count_params

log = logging.getLogger("nl_jax")


PURPOSES = ("train", "eval", "generate")


class Trainer:
    """Everything a run needs, built once from a validated config.

    ``purpose``: ``"train"`` builds the training data stream and restores it
    with the state; ``"eval"`` and ``"generate"`` read a trained workdir and
    touch neither the training data nor the workdir's files (eval builds only
    the held-out batches, generate no data at all).  ``lock``: take the
    workdir's writer lock (``train`` does; see ``train/lock.py``).
    ``fresh_start``: see ``maybe_restore``.
    """

    def __init__(self, config, workdir: str, *, devices=None, write_metrics: bool = True,
                 purpose: str = "train", fresh_start: bool = False, lock: bool = False):
        from nl_jax.data.pipeline import build_eval_batches, build_train_iterator
        from nl_jax.data.tokenizer import load_tokenizer

        if purpose not in PURPOSES:
            raise ValueError(f"Trainer purpose {purpose!r}; one of {PURPOSES}")
        self.purpose = purpose
        self.fresh_start = fresh_start
        self.devices = devices if devices is not None else jax.devices()
        config_lib.validate(config, len(self.devices), jax.process_count())
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise ConfigError(f"--workdir {workdir} is a file, not a folder; give a folder "
                              f"(it is created if missing)")
        self.config, self.workdir = config, workdir
        root = config_lib.REPO_ROOT

        self.tokenizer = load_tokenizer(config.data.tokenizer, root)
        if self.tokenizer.vocab_size != config.model.vocab_size:
            raise ConfigError(
                f"config key model.vocab_size={config.model.vocab_size} does not match "
                f"the tokenizer {config.data.tokenizer.path} "
                f"(vocab size {self.tokenizer.vocab_size}); set "
                f"--config.model.vocab_size={self.tokenizer.vocab_size}")
        # train.wandb checked (installed, a known mode) before anything is written
        wandb = metrics_lib.wandb_settings(config.train) if purpose == "train" else None

        # The one program builder (train/aot.py), shared with the pre-flight.
        from nl_jax.train.aot import train_program
        program = train_program(config, self.devices, allocate=True)
        self.program = program
        self.mesh, self.rules = program.mesh, program.rules
        self.abstract_params = program.abstract_params
        self.optimizer = program.optimizer
        self.model_def, self.shardings = program.model_def, program.shardings
        self.abstract_state = program.abstract_state
        # The state is allocated by maybe_restore: restored from a checkpoint, or
        # initialised when there is none (never both at once).
        self._init_state = program.init
        self.state = None
        self.num_params = count_params(self.abstract_state["params"])

        self.batch_sharding = program.batch_sharding
        check_process_rows(self.batch_sharding, config.data.batch_size, config.data.seq_len,
                           [d for d in self.mesh.devices.flat
                            if d.process_index == jax.process_index()],
                           jax.process_index(), jax.process_count())
        self.teach_paths, self.loss = program.teach_paths, program.loss
        self.train_step = program.step
        self.eval_step = program.eval_step

        self.data = (build_train_iterator(
            config.data, self.tokenizer, seed=config.train.seed, base_dir=root,
            process_index=jax.process_index(), process_count=jax.process_count())
            if purpose == "train" else None)
        self.eval_batches = (build_eval_batches(
            config.data, self.tokenizer, base_dir=root, num_batches=config.train.eval_batches,
            process_index=jax.process_index(), process_count=jax.process_count(),
            train_hashes=self.data.file_hashes if self.data else None)
            if config.train.eval_batches and purpose != "generate" else [])
        # Nothing is written to the workdir before here: a config or data mistake
        # leaves no empty folder behind.  A training run (``lock``) holds the
        # workdir's writer lock (process 0, for all processes) until ``close``.
        self.lock = None
        if lock and purpose == "train" and is_primary():
            self.lock = RunLock(workdir)
            self.lock.acquire()
        try:
            self.checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints,
                                                      config.to_dict(),
                                                      create=purpose == "train")
        except BaseException:
            self.close()
            raise
        self.writer = metrics_lib.MetricsWriter(
            workdir, enabled=write_metrics and is_primary() and purpose == "train",
            wandb=wandb, run_config=config.to_dict())
        self.compile_s = None        # seconds the train step took to compile (compile())
        self.resumed_from = None
        self.saved_config = None     # the checkpoint's config, once restored

    def close(self) -> None:
        """Lets checkpoint writes under way finish (a run stopped by an error keeps
        its last save), then releases the workdir's writer lock; safe to call
        twice."""
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None and self.purpose == "train":
            with contextlib.suppress(Exception):
                checkpointer.manager.wait_until_finished()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- pieces -----------------------------------------------------------------
    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in batch.items()}

    def maybe_restore(self) -> int:
        """Restores the newest checkpoint that reads and verifies into
        ``self.state`` (0 and a freshly initialised state if there is none); the
        metrics log is cut back to that step (a run killed after it logged later
        steps).

        Damaged checkpoints (unreadable, or not matching their checksums) are
        skipped with a notice; ``train`` moves them to
        ``WORKDIR/damaged_checkpoints/``, eval and generate leave them in place.
        When none verifies, or when only damaged ones remain from an earlier
        attempt, nothing starts from scratch unless ``fresh_start``.
        """
        steps = self.checkpointer.steps()
        if not steps:
            moved = self.checkpointer.damaged_steps() if self.purpose == "train" else []
            if moved and not self.fresh_start:
                raise CheckpointError(
                    f"{self.workdir} holds no usable checkpoint, only damaged ones moved "
                    f"to {self.checkpointer.damaged_directory} ({', '.join(moved)}); "
                    f"pass --fresh_start to train from scratch in this workdir anyway")
            self.state = self._init_state()
            self.writer.truncate(0)
            return 0
        damaged = []
        for step in steps:
            try:
                restored = self._restore(step)
            except CheckpointDamagedError as e:
                damaged.append((step, str(e)))
                continue
            if is_primary():
                for bad, reason in damaged:
                    print(f"warning: skipped the damaged checkpoint of step {bad}: {reason}; "
                          f"using step {step}", file=sys.stderr)
            self._set_aside(damaged)
            return restored
        listing = "; ".join(reason for _, reason in damaged)
        if self.purpose == "train" and self.fresh_start:
            self._set_aside(damaged)
            self.state = self._init_state()
            self.writer.truncate(0)
            return 0
        raise CheckpointError(
            f"no checkpoint in {self.checkpointer.directory} verifies: {listing}. "
            + ("Move them away (or pass --fresh_start, which moves them to "
               f"{self.checkpointer.damaged_directory}) to train from scratch"
               if self.purpose == "train" else "Train again to write a good one"))

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """train: moves damaged checkpoints aside (process 0; the others wait), so
        that a scheduler's rerun resumes at once and rotation never sees them."""
        if self.purpose != "train" or not damaged:
            return
        if is_primary():
            for step, reason in damaged:
                target = self.checkpointer.move_aside(step, reason)
                print(f"moved the damaged checkpoint of step {step} to {target}",
                      file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("nl_jax: damaged checkpoints moved")
            self.checkpointer.manager.reload()

    def _restore(self, step: int) -> int:
        """Restores ``step`` (raises CheckpointDamagedError if it does not verify)."""
        if self.purpose != "train":
            # eval and generate: the weights alone, the optimizer state is never read
            self.saved_config = self.checkpointer.check_compatible(
                step, ckpt_lib.READ_KEYS, self.purpose)
            keys = ("step", "params")
            self.state = self.checkpointer.restore_params(step, ckpt_lib.abstract_with_shardings(
                {k: self.abstract_state[k] for k in keys}, {k: self.shardings[k] for k in keys}))
            self.resumed_from = step
            return step
        self.saved_config = self.checkpointer.check_compatible(step, ckpt_lib.RESUME_KEYS)
        abstract = ckpt_lib.abstract_with_shardings(self.abstract_state, self.shardings)
        try:
            self.state, data_state = self.checkpointer.restore(step, abstract)
        except CheckpointStructureError:
            self.state, data_state = self._restore_legacy(step, abstract)
        self.data.set_state(data_state)
        self.writer.truncate(step)
        self.resumed_from = step
        return step

    def _restore_legacy(self, step: int, abstract: dict):
        """Checkpoints written before the optimizer always began with the (stateless)
        clip step hold the levels' state alone; restore that and put it back in
        place.  Any other structure difference raises CheckpointStructureError."""
        legacy = dict(abstract, opt_state=abstract["opt_state"][1])
        state, data_state = self.checkpointer.restore(step, legacy)
        state["opt_state"] = (abstract["opt_state"][0], state["opt_state"])
        return state, data_state

    def save(self, force: bool = False) -> None:
        step = int(self.state["step"])
        self.checkpointer.save(step, self.state, self.data.get_state(), force=force)

    def evaluate(self) -> dict[str, float]:
        total = count = 0.0
        for batch in self.eval_batches:   # summed on device: one host sync at the end
            s, c = self.eval_step(self.state["params"], self.device_batch(batch))
            total, count = total + s, count + c
        total, count = float(total), float(count)
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
                "tokens": int(count)}

    def compile(self) -> None:
        """Compiles the step once (its time in ``compile_s``: lowering and
        compilation, or reading the compilation cache) and logs its memory
        footprint."""
        batch = self.device_batch(_peek_batch(self.config))
        start = time.perf_counter()
        compiled = self.train_step.lower(self.state, batch).compile()
        self.compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        if mem is not None:
            log.info("step memory per device: args %.1f MiB, temp %.1f MiB, out %.1f MiB",
                     mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                     mem.output_size_in_bytes / 2**20)
        self.train_step = compiled


def _levels_spanning_the_run(levels_cfg) -> list[str]:
    """Names of the trainable levels whose schedule's shape depends on train.steps."""
    from nl_jax.optim.schedules import SPAN_TOTAL_STEPS
    return [name for name, level in levels_cfg.items() if level.get("every") != "never"
            and (level.get("optimizer", {}).get("schedule") or {}).get("name")
            in SPAN_TOTAL_STEPS]


def _peek_batch(config) -> dict[str, np.ndarray]:
    shape = (config.data.batch_size // jax.process_count(), config.data.seq_len)
    return {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32)}


FINITE_KEYS = ("loss", "grad_norm", "update_norm")


def all_finite(metrics: dict) -> bool:
    """Whether a step's loss and gradient/update norms are finite (a NaN gradient can
    come with a finite loss, and would reach the parameters)."""
    return all(np.isfinite(metrics[k]) for k in FINITE_KEYS if k in metrics)


class StopSignals:
    """Ctrl-C / SIGTERM handling for the whole of ``train``, installed first thing
    (a signal during startup is never swallowed by a library callback).

    First signal: ``stop`` is set (with several processes only the signal is
    noted; the stop is agreed at the next logging step, so all save the same
    step).  Second signal: during startup (nothing trained yet) the process
    exits at once with 128 + signal; later it raises KeyboardInterrupt, which
    the loop turns into "exit without saving" and the final save into "let the
    writes under way finish".
    """

    def __init__(self, multi_process: bool):
        self.signal = 0
        self.agreed = 0
        self.stop = False
        self.phase = "startup"
        self.multi_process = multi_process
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal:
            if self.phase == "startup":
                print(f"interrupted twice during startup ({signal.Signals(signum).name}): "
                      f"exiting; nothing was trained or written", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            raise KeyboardInterrupt
        self.signal = signum
        if self.phase == "final save":
            print("interrupted: finishing the final checkpoint first (again to skip)",
                  file=sys.stderr, flush=True)
        if not self.multi_process:
            self.stop = True


def train(config, workdir: str, *, devices=None, fresh_start: bool = False) -> dict[str, Any]:
    """Runs (or resumes) a training job; returns the final metrics.

    ``fresh_start``: train from scratch although the workdir holds only
    damaged checkpoints (they are moved aside, never deleted).
    """
    t_start = time.perf_counter()
    stop = StopSignals(multi_process=jax.process_count() > 1)
    stop.install()
    trainer = None
    try:
        trainer = Trainer(config, workdir, devices=devices, fresh_start=fresh_start,
                          lock=True)
        return _train(trainer, config, workdir, stop, t_start)
    except KeyboardInterrupt:
        if stop.phase != "startup":
            raise
        print("interrupted during startup: nothing was trained or written",
              file=sys.stderr)
        return {"interrupted": True, "step": 0, "signal": stop.signal or signal.SIGINT}
    finally:
        stop.restore()
        if trainer is not None:
            trainer.close()


def _utilisation_inputs(config, devices, primary: bool, say):
    """(model FLOPs per token, the devices' peak) for the ``model_flops_per_token``
    and ``mfu`` log keys (``train/mfu.py``), on process 0 (the one that logs);
    either is None where unknown, with a notice."""
    if not primary:
        return None, None
    from nl_jax.models.flops import model_flops_per_token
    try:
        flops_per_token = model_flops_per_token(config)
    except ConfigError as e:
        say(f"notice: no model_flops_per_token or mfu in the logs: {e}")
        return None, None
    peak = mfu_lib.device_peak(devices, config.model.dtype)
    if peak is None:
        say(f"notice: {mfu_lib.unknown_peak_note(devices[0].device_kind)}")
    else:
        say(f"model FLOPs per token {flops_per_token:.4g} (nl_jax/models/flops.py); mfu "
            f"against {peak.flops:.4g} FLOP/s peak ({peak.source})")
    return flops_per_token, peak


def _outputs_complete(workdir: str) -> bool:
    """Whether a finished run wrote its end-of-run outputs (``final_metrics.json``
    is written last, atomically)."""
    return os.path.exists(os.path.join(workdir, "final_metrics.json"))


def _train(trainer: Trainer, config, workdir: str, stop: StopSignals,
           t_start: float) -> dict[str, Any]:
    cfg = config.train
    start = trainer.maybe_restore()
    primary = is_primary()     # process 0 prints and writes the workdir's files
    say = print if primary else (lambda *args, **kwargs: None)
    if start >= cfg.steps:
        trainer.checkpointer.close()
        results = os.path.join(workdir, "final_metrics.json")
        if _outputs_complete(workdir):
            # A finished run: nothing to do, and nothing already written is touched.
            say(f"nothing to do: {workdir} holds a checkpoint at step {start} and "
                f"train.steps={cfg.steps}; raise --config.train.steps to train further "
                f"(its results are in {results})")
            return {"step": start, "already_done": True}
        # Stopped between its last checkpoint and its end-of-run outputs.
        say(f"finishing the run: {workdir} holds the checkpoint of step {start} but not "
            f"its end-of-run outputs; writing them")
        stop.phase = "finish"
        logged = trainer.writer.first("train")
        last = trainer.writer.last("train")
        return _finish(trainer, config, workdir, start,
                       logged.get("loss") if logged else None, last, t_start)
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"nl_jax: {config.model.mixer}+{config.model.mlp} LM, "
        f"{trainer.num_params:,} parameters, mesh {dict(trainer.mesh.shape)}{processes}, "
        f"workdir {workdir}")
    if primary:
        from nl_jax import levels as levels_lib
        say(levels_lib.summary(config, trainer.abstract_params))
    if trainer.teach_paths:
        t, paths = config.teach_signal, trainer.teach_paths
        say(f"teach signal: {len(paths)} weight arrays ({', '.join(paths[:3])}"
            f"{', ...' if len(paths) > 3 else ''}) step on the LM loss every {t.segment} "
            f"tokens, lr {t.lr}, max_update {t.max_update}")
    if start:
        before = ckpt_lib.lookup(trainer.saved_config, "train.steps")
        stretched = ""
        if before not in (None, cfg.steps):
            spanning = _levels_spanning_the_run(config.levels)
            stretched = (f" (train.steps {before} -> {cfg.steps}"
                         + (f": the learning-rate schedule of level(s) {', '.join(spanning)} "
                            f"now spans {cfg.steps} steps)" if spanning else ")"))
        say(f"resuming from step {start}{stretched}")
        changed = trainer.checkpointer.changed_on_resume(trainer.saved_config)
        if changed:
            say(f"  with changed settings: {'; '.join(changed)}")
    if primary:
        _write_json_atomically(os.path.join(workdir, "config.json"), config.to_dict(),
                               default=str)
    trainer.writer.start()    # a W&B run that cannot start fails before the compile
    flops_per_token, peak = _utilisation_inputs(config, trainer.devices, primary, say)
    if not stop.stop:      # a stop signal during startup: no step will run
        trainer.compile()
    compile_s = trainer.compile_s     # logged with the first record of this invocation

    # Ctrl-C or SIGTERM (a preempted VM): finish the step, save, exit; a second
    # signal exits at once without saving (``StopSignals``).  These handlers
    # replace the SIGTERM handler of JAX's preemption service, so orbax's own
    # preemption checks stay off: the loop alone decides.
    stop.phase = "loop"
    multi_process = stop.multi_process
    progress = metrics_lib.Progress(cfg.steps, start, cfg.log_every, enabled=primary)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    last = diverged = unchecked = None
    logged = trainer.writer.first("train") if start else None   # the run's, across resumes
    first_loss = logged.get("loss") if logged else None
    timer, window_steps = metrics_lib.Timer(), 0
    aborted = False
    step = start
    try:
        while step < cfg.steps and not stop.stop:
            batch = trainer.device_batch(next(trainer.data))
            trainer.state, metrics = trainer.train_step(trainer.state, batch)
            step += 1
            window_steps += 1
            checkpoint_due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            log_now = (step % cfg.log_every == 0 or step == cfg.steps or step == start + 1
                       or checkpoint_due)  # a checkpoint is only written after a finite loss
            if multi_process and log_now:
                # (a signal may land during the collective: never overwrite the local one)
                agreed = agreed_max(stop.signal)
                if agreed:
                    stop.stop, stop.agreed = True, agreed
            if log_now:
                m = metrics_lib.to_python(jax.device_get(metrics))
                dt = timer.lap()
                m.update(perplexity=float(np.exp(min(m["loss"], 50.0))),
                         step_ms=1000 * dt / window_steps,
                         tokens_per_s=tokens_per_step * window_steps / dt)
                m.update(mfu_lib.utilisation(m["tokens_per_s"], flops_per_token, peak))
                if compile_s is not None:
                    m["compile_s"], compile_s = compile_s, None
                if "lr" not in m:
                    lrs = [v for k, v in m.items() if k.startswith("lr/")]
                    if lrs:
                        m["lr"] = lrs[0]
                window_steps = 0
                unchecked = None
                if not all_finite(m):
                    diverged = step
                    trainer.writer.write(step, "train", m)
                    break
                first_loss = m["loss"] if first_loss is None else first_loss
                last = m
                trainer.writer.write(step, "train", m)
                progress.update(step, m)
            else:
                unchecked = (step, metrics)   # checked before any save that follows
                progress.update(step, None)
            stopping = stop.stop     # no eval or periodic save: save and go
            evaluating = (cfg.eval_every and trainer.eval_batches and step % cfg.eval_every == 0
                          and step < cfg.steps and not stopping)
            if evaluating or (checkpoint_due and not stopping):
                # Eval and checkpoint time is kept out of step_ms / tokens_per_s: the
                # steps dispatched so far finish first and count as training time.
                jax.block_until_ready(trainer.state)
                paused = time.perf_counter()
                if evaluating:
                    ev = trainer.evaluate()
                    trainer.writer.write(step, "eval", ev)
                    progress.write(f"eval step {step}: loss={ev['loss']:.4f} "
                                   f"perplexity={ev['perplexity']:.2f}")
                if checkpoint_due and not stopping:
                    trainer.save()
                timer.exclude(time.perf_counter() - paused)
    except KeyboardInterrupt:   # a second signal: the state may be mid-step, no save
        aborted = True
    finally:
        progress.close()
    # Stopped by a signal after an unlogged step: check it before the final save.
    if (diverged is None and not aborted and unchecked is not None
            and not all_finite(metrics_lib.to_python(jax.device_get(unchecked[1])))):
        diverged = unchecked[0]
    if diverged is not None:
        # Keep the last good checkpoint; never save a non-finite state over it.
        trainer.checkpointer.close()
        trainer.writer.close()
        good = trainer.checkpointer.latest_step()
        say(f"error: the loss or gradient became non-finite at step {diverged} (last "
            f"logged finite loss: {last['loss'] if last else 'none'}); stopped without "
            f"saving. Last "
            f"checkpoint: {'step ' + str(good) if good is not None else 'none'}. Lower "
            f"the learning rate (levels.*.optimizer.learning_rate) or "
            f"train.grad_clip_norm.", file=sys.stderr)
        return {"diverged": True, "step": diverged}
    if aborted:
        if not multi_process:    # the others may be stuck in a collective: no wait
            with contextlib.suppress(KeyboardInterrupt):
                trainer.checkpointer.close()
        trainer.writer.close()
        good = trainer.checkpointer.latest_step()
        say(f"interrupted twice: exiting without saving; last checkpoint: "
            f"{'step ' + str(good) if good is not None else 'none'}", file=sys.stderr)
        return {"interrupted": True, "step": step, "signal": stop.signal}
    step = int(trainer.state["step"])
    if stop.stop and step == start:
        # Stopped before the first step: the state is the checkpoint's (or a fresh
        # initialisation), so there is nothing new to save.
        trainer.checkpointer.close()
        trainer.writer.close()
        signum = stop.agreed or stop.signal
        say(f"interrupted ({signal.Signals(signum).name}) before the first step: nothing "
            f"to save" + (f"; last checkpoint: step {start}" if start else ""),
            file=sys.stderr)
        return {"interrupted": True, "step": step, "signal": signum}
    stop.phase = "final save"
    try:
        trainer.save(force=True)
        trainer.checkpointer.close()
    except KeyboardInterrupt:   # a second signal while the final checkpoint is written
        say("interrupted during the final save: finishing the checkpoint writes "
            "already under way (Ctrl-C again to skip)", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            trainer.checkpointer.wait()
        done = trainer.checkpointer.finished_steps()
        saved = (f"the checkpoint of step {step} is complete" if step in done else
                 f"step {step} was not saved; last complete checkpoint: "
                 f"{'step ' + str(max(done)) if done else 'none'}")
        say(f"interrupted at the end of the run: {saved}", file=sys.stderr)
        trainer.writer.close()
        return {"interrupted": True, "step": step, "signal": stop.signal or signal.SIGINT}
    if stop.stop or stop.signal:
        signum = stop.agreed or stop.signal
        finished = "" if step < cfg.steps else (
            "; run the same command again to write the end-of-run outputs")
        say(f"interrupted ({signal.Signals(signum).name}): checkpoint saved at step {step} "
            f"in {trainer.checkpointer.directory}{finished}")
        trainer.writer.close()
        return {"interrupted": True, "step": step, "signal": signum}
    stop.phase = "finish"
    return _finish(trainer, config, workdir, step, first_loss, last, t_start)


def _write_json_atomically(path: str, value: Any, **kwargs) -> None:
    """Writes ``path`` through a temporary file and a rename: a kill never leaves
    a torn file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, **kwargs)
    os.replace(tmp, path)


def _finish(trainer: Trainer, config, workdir: str, step: int, first_loss, last,
            t_start: float) -> dict[str, Any]:
    """End-of-run outputs: final eval, loss plot, sample, ``final_metrics.json``
    (written last: its presence marks a finished run)."""
    cfg = config.train
    final = {"step": step, "train_loss_first": first_loss,
             "train_loss_last": last["loss"] if last else None,
             "tokens_per_s": last.get("tokens_per_s") if last else None,
             "num_params": trainer.num_params,
             "wall_s": time.perf_counter() - t_start}
    if trainer.eval_batches:
        ev = trainer.evaluate()
        trainer.writer.write(step, "eval", ev)
        final.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
    trainer.writer.close()
    if not is_primary():
        return final
    metrics_lib.plot_loss_curve(trainer.writer.path, os.path.join(workdir, "loss_curve.png"))
    if cfg.sample_tokens and jax.process_count() == 1:   # several: `generate` afterwards
        from nl_jax.eval.generate import generate
        final["sample"] = generate(trainer.model_def, trainer.state["params"],
                                   trainer.tokenizer, prompt="The",
                                   num_tokens=cfg.sample_tokens,
                                   max_len=config.data.seq_len, seed=cfg.seed)
    _write_json_atomically(os.path.join(workdir, "final_metrics.json"), final)
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in final.items() if k != "sample"))
    if "sample" in final:
        print("sample: " + final["sample"].replace("\n", " "))
    return final
