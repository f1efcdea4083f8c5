"""Orbax checkpoints: train state, data iterator state and resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config,integrity}``.  Saves
are async (``CheckpointManager``), the last ``keep`` are kept.  A workdir that
holds a checkpoint resumes from its latest step; resuming with a config whose
model, levels or data pipeline differ is refused with a message naming the
keys (learning rates, schedules, ``model.remat`` and ``model.dtype`` may
change).

Integrity: ``integrity`` records sharding-independent checksums of every
array and of the JSON items (``train/integrity.py``), verified on every
restore.  A checkpoint that cannot be read or does not verify raises
``CheckpointDamagedError``; callers fall back to the next older one, and
``train`` moves the damaged ones to ``WORKDIR/damaged_checkpoints/`` (never
deleted; checkpoint rotation does not see them).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from nl_jax.errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointStructureError,
    WorkdirError,
)
from nl_jax.train import integrity

DAMAGED_DIR = "damaged_checkpoints"
# Free space asked for beyond a checkpoint's array bytes (metadata, JSON items).
SAVE_MARGIN_BYTES = 2**20
SAVE_MARGIN_FRACTION = 0.05

# Config groups whose change makes a checkpoint unusable for training (shapes,
# optimizer state structure, token stream).  Other keys (steps, logging) may change.
RESUME_KEYS = ("model", "levels", "data.seq_len", "data.batch_size", "data.tokenizer",
               "data.train_files")
# ... and for reading its weights (eval, generate restore step and params alone):
# any optimizer levels, context length, batch size or data files will do.
READ_KEYS = ("model", "data.tokenizer")
# Keys inside those groups that may change anyway: they shape no saved array.
# Learning rates and schedules are recomputed from the restored update counts
# (other optimizer hyperparameters live in the optimizer state and may not).
CHANGEABLE = ("model.remat", "model.dtype", "levels.*.optimizer.learning_rate",
              "levels.*.optimizer.schedule", "levels.*.optimizer.schedule.*",
              # how a token-clock level runs (chunked, kernel, auto): the same function
              "model.memory.path", "model.self_modifying.path",
              # the in-context CMS step size (shapes nothing; named on the resume line,
              # e.g. runs made before its default went from 1e-3 to 1e-5)
              "model.cms.lr")
# Training keys outside RESUME_KEYS that a resume reports when they change.
REPORTED_ON_RESUME = ("train.grad_clip_norm", "teach_signal", "teach_signal.*")


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def lookup(d: dict, dotted: str):
    """``d['a']['b']`` for ``'a.b'``; None where a key is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def config_differences(saved: dict, current: dict, prefix: str = "",
                       skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except keys that
    match a ``skip`` pattern (fnmatch, e.g. ``levels.*.optimizer.learning_rate``)."""
    if any(fnmatch.fnmatchcase(prefix[:-1], pattern) for pattern in skip):
        return []
    out = []
    if isinstance(saved, dict) and isinstance(current, dict):
        for k in sorted(set(saved) | set(current)):
            out += config_differences(saved.get(k), current.get(k), f"{prefix}{k}.", skip)
        return out
    if saved != current:
        out.append(f"{prefix[:-1]} (checkpoint: {saved!r}, now: {current!r})")
    return out


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (orbax and tensorstore wrap them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        text = str(e)
        for code, needle in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file"),
                             (errno.EACCES, "Permission denied"),
                             (errno.EDQUOT, "quota exceeded")):
            if needle in text:
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def tree_bytes(tree: Any) -> int:
    """Global bytes of the arrays of ``tree`` (what a checkpoint of it writes)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype"))


class Checkpointer:
    def __init__(self, workdir: str, keep: int, config_dict: dict, create: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.damaged_directory = os.path.join(self.workdir, DAMAGED_DIR)
        self.config = _normalise(config_dict)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint in {self.directory} (a workdir made by "
                                  f"`python -m nl_jax train`)")
        self._keep, self._create = keep, create
        self.manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=self._create, enable_async_checkpointing=True)
        return ocp.CheckpointManager(
            self.directory, options=options,
            item_names=("state", "data", "config", "integrity"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every step orbax lists (complete or not), newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def finished_steps(self) -> list[int]:
        """Steps whose checkpoint is complete on disk (orbax writes into a temporary
        folder and renames it to the step number when finished)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def damaged_steps(self) -> list[str]:
        """Folders moved aside by ``move_aside`` (never deleted)."""
        if not os.path.isdir(self.damaged_directory):
            return []
        return sorted(os.listdir(self.damaged_directory))

    # -- writing ---------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Starts an async save of ``step`` with its integrity record.

        Refuses (``WorkdirError``) when the file system cannot hold it, before
        anything is written; a write error of an earlier async save surfaces
        here as a ``WorkdirError`` too.  The checkpoints folder is re-created
        (with a warning) if it vanished.
        """
        if not os.path.isdir(self.workdir):
            raise WorkdirError(f"the workdir {self.workdir} vanished during the run (deleted "
                               f"or unmounted); step {step} was not saved. Restore the "
                               f"folder or start again with a new --workdir")
        if not os.path.isdir(self.directory):
            print(f"warning: {self.directory} vanished during the run; re-creating it "
                  f"(the checkpoints it held are gone)", file=sys.stderr)
            with self.guard(f"re-creating {self.directory}"):
                self.manager.wait_until_finished()
                os.makedirs(self.directory, exist_ok=True)
                self.manager.reload()
        if self.manager.latest_step() == step:
            return False
        needed = int(tree_bytes(state) * (1 + SAVE_MARGIN_FRACTION)) + SAVE_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            good = self.latest_step()
            raise WorkdirError(
                f"not enough free space for the checkpoint of step {step} in "
                f"{self.directory}: it needs about {needed / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB are free. Free some space and run the same "
                f"command again to resume from "
                f"{'step ' + str(good) if good is not None else 'the start'}")
        record = integrity.record(state, data_state, self.config)
        with self.guard(f"saving step {step}"):
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(self.config),
                integrity=ocp.args.JsonSave(record)), force=force)

    def guard(self, what: str):
        """Context: a file-system error (full disk, read-only or vanished folder)
        inside becomes one ``WorkdirError`` line naming the folder."""
        checkpointer = self

        class _Guard:
            def __enter__(self):
                return self

            def __exit__(self, kind, e, tb):
                if e is None or isinstance(e, (KeyboardInterrupt, CheckpointError)):
                    return False
                os_error = _os_error(e)
                if os_error is None:
                    return False
                good = checkpointer.finished_steps()
                raise WorkdirError(
                    f"{what} in {checkpointer.directory} failed: "
                    f"{os_error.strerror or os_error}. The last complete checkpoint is "
                    f"{'step ' + str(max(good)) if good else 'none'}; fix the file system "
                    f"(space, permissions) and run the same command again") from None

        return _Guard()

    def move_aside(self, step: int, reason: str) -> str:
        """Moves a damaged step folder to ``WORKDIR/damaged_checkpoints/`` (with a
        REASON.txt); returns its new path.  Nothing is deleted."""
        os.makedirs(self.damaged_directory, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = os.path.join(self.damaged_directory, f"{step}-{stamp}")
        suffix = 0
        while os.path.exists(target + (f"-{suffix}" if suffix else "")):
            suffix += 1
        target += f"-{suffix}" if suffix else ""
        os.rename(os.path.join(self.directory, str(step)), target)
        with open(os.path.join(target, "REASON.txt"), "w", encoding="utf-8") as f:
            f.write(f"moved aside by nl_jax train at {stamp}: {reason}\n")
        self.manager.reload()
        return target

    # -- reading ---------------------------------------------------------------
    def _read(self, step: int, what: str, **items):
        """``manager.restore`` of some items; an unreadable checkpoint (missing or
        truncated files) is a CheckpointDamagedError that names the step's folder."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except (KeyboardInterrupt, CheckpointError):
            raise
        except Exception as e:  # orbax/tensorstore raise many types for bad files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            folder = os.path.join(self.directory, str(step))
            if "tree structures do not match" in str(e):
                raise CheckpointStructureError(
                    f"cannot read the {what} of checkpoint step {step} ({folder}): its "
                    f"tree differs from the one this config builds (other optimizer "
                    f"levels, or written by another nl_jax version). Use the config it was "
                    f"made with, or a new --workdir") from None
            raise CheckpointDamagedError(
                f"cannot read the {what} of checkpoint step {step} ({folder}): "
                f"{first}") from None

    def _check_files(self, step: int, items: tuple[str, ...]) -> None:
        """Refuses a step whose folder lacks files every complete checkpoint has,
        before orbax reads it (a missing OCDBT manifest would otherwise leave
        tensorstore callbacks firing on a closed event loop, one traceback each)."""
        folder = os.path.join(self.directory, str(step))
        needed = ["_CHECKPOINT_METADATA"] + [os.path.join(i, "metadata") for i in items
                                             if i != "state"]
        if "state" in items:
            state = os.path.join(folder, "state")
            needed.append(os.path.join("state", "_METADATA"))
            shards = [d for d in (os.listdir(state) if os.path.isdir(state) else [])
                      if d.startswith("ocdbt.process_")]
            if shards:       # OCDBT layout: a root manifest and one per writing process
                needed.append(os.path.join("state", "manifest.ocdbt"))
                needed += [os.path.join("state", d, "manifest.ocdbt") for d in shards]
        missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise CheckpointDamagedError(
                f"checkpoint step {step} ({folder}) is incomplete: "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing")

    def _integrity_record(self, step: int) -> dict | None:
        """The step's integrity record; None for checkpoints written before nl_jax
        recorded one."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "integrity")):
            return None
        return self._read(step, "integrity record",
                          integrity=ocp.args.JsonRestore())["integrity"]

    def _verify(self, step: int, state: Any, data_state: dict | None = None) -> None:
        record = self._integrity_record(step)
        if record is None:
            return
        bad = integrity.mismatches(record, state, data_state)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise CheckpointDamagedError(
                f"checkpoint step {step} ({os.path.join(self.directory, str(step))}) "
                f"does not match its recorded checksums: {'; '.join(bad[:3])}{more}")

    def check_compatible(self, step: int, keys=RESUME_KEYS,
                         action: str = "resume from") -> dict:
        """Refuses a config that differs from the checkpoint's in ``keys``
        (``action``: what was refused, e.g. "resume from", "eval"); returns the
        checkpoint's config."""
        self._check_files(step, ("config", "state") if keys is READ_KEYS
                          else ("config", "data", "state"))
        saved = self._read(step, "config", config=ocp.args.JsonRestore())["config"]
        record = self._integrity_record(step)
        if record is not None and record.get("config") != integrity.json_checksum(saved):
            raise CheckpointDamagedError(
                f"checkpoint step {step} ({os.path.join(self.directory, str(step))}) "
                f"does not match its recorded checksums: the config")
        diffs = self._differences(saved, keys, skip=CHANGEABLE)
        if diffs:
            raise CheckpointError(
                f"cannot {action} {self.directory} (step {step}): the config "
                f"differs in {'; '.join(diffs)}. Use the same values"
                + (", or a new --workdir to start a fresh run." if keys is RESUME_KEYS
                   else "."))
        return saved

    def changed_on_resume(self, saved: dict) -> list[str]:
        """The ``CHANGEABLE`` and ``REPORTED_ON_RESUME`` keys whose values differ
        from the checkpoint's."""
        return [d for d in self._differences(saved, RESUME_KEYS + REPORTED_ON_RESUME)
                if any(fnmatch.fnmatchcase(d.split(" ", 1)[0], p)
                       for p in CHANGEABLE + REPORTED_ON_RESUME)]

    def _differences(self, saved: dict, keys, skip: tuple[str, ...] = ()) -> list[str]:
        return [d for key in keys for d in config_differences(
            lookup(saved, key), lookup(self.config, key), key + ".", skip)]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The whole train state and the data iterator state (to resume training),
        verified against the step's integrity record."""
        restored = self._read(step, "state", state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
        self._verify(step, restored["state"], restored["data"])
        return restored["state"], restored["data"]

    def restore_params(self, step: int, abstract_state: Any) -> Any:
        """``{"step", "params"}`` of a checkpoint (``abstract_state`` holds those two
        keys), verified: the optimizer state is never read, so evaluating or
        sampling a model needs memory for its weights alone, whatever optimizer
        trained it."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state = self._read(step, "state", state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=restore_args, partial_restore=True))["state"]
        self._verify(step, state)
        return state

    def wait(self) -> None:
        with self.guard("writing a checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self.guard("writing a checkpoint"):
            self.manager.wait_until_finished()
            self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying ``shardings`` (a leaf-order match:
    the shardings tree is a prefix tree without the ``nnx.Param`` wrappers)."""
    leaves, treedef = jax.tree.flatten(state)
    shards = jax.tree.leaves(shardings)
    assert len(leaves) == len(shards), (len(leaves), len(shards))
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, shards, strict=True)])
