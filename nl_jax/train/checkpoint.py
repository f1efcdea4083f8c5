"""Orbax checkpoints: train state, data iterator state and resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``.  Saves are async
(``CheckpointManager``), the last ``keep`` are kept.  A workdir that holds a
checkpoint resumes from its latest step; resuming with a config whose model,
levels or data pipeline differ is refused with a message naming the keys
(learning rates, schedules, ``model.remat`` and ``model.dtype`` may change).
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from nl_jax.errors import CheckpointError, CheckpointStructureError

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
              "levels.*.optimizer.schedule", "levels.*.optimizer.schedule.*")
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


class Checkpointer:
    def __init__(self, workdir: str, keep: int, config_dict: dict, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.config = _normalise(config_dict)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint in {self.directory} (a workdir made by "
                                  f"`python -m nl_jax train`)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def finished_steps(self) -> list[int]:
        """Steps whose checkpoint is complete on disk (orbax writes into a temporary
        folder and renames it to the step number when finished)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(self.config)), force=force)

    def _read(self, step: int, what: str, **items):
        """``manager.restore`` of some items; an unreadable checkpoint (missing or
        truncated files) is a CheckpointError that names the step's folder."""
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
            raise CheckpointError(
                f"cannot read the {what} of checkpoint step {step} ({folder}): {first}. "
                f"Move that folder away to use the previous checkpoint, or use a new "
                f"--workdir") from None

    def check_compatible(self, step: int, keys=RESUME_KEYS,
                         action: str = "resume from") -> dict:
        """Refuses a config that differs from the checkpoint's in ``keys``
        (``action``: what was refused, e.g. "resume from", "eval"); returns the
        checkpoint's config."""
        saved = self._read(step, "config", config=ocp.args.JsonRestore())["config"]
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
        """The whole train state and the data iterator state (to resume training)."""
        restored = self._read(step, "state", state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
        return restored["state"], restored["data"]

    def restore_params(self, step: int, abstract_state: Any) -> Any:
        """``{"step", "params"}`` of a checkpoint (``abstract_state`` holds those two
        keys): the optimizer state is never read, so evaluating or sampling a model
        needs memory for its weights alone, whatever optimizer trained it."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        return self._read(step, "state", state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=restore_args, partial_restore=True))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
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
