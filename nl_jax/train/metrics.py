"""Metrics sinks: JSONL, TensorBoard, Weights & Biases, terminal progress, loss-curve PNG."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import Any

import numpy as np

from nl_jax.errors import ConfigError, UserError

WANDB_MODES = ("offline", "online")
WANDB_INSTALL = "pip install 'nl_jax[wandb]'"


def to_python(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.dtype.kind != "f" else float(v)
    return out


def wandb_settings(train_config) -> dict[str, Any] | None:
    """``train.wandb`` as a dict when it is enabled (None when off or absent: a
    config saved before the key existed), checked: a known ``mode``, a
    ``project``, and ``wandb`` importable; else one ``ConfigError``."""
    settings = train_config.get("wandb", None)
    settings = dict(settings) if settings else {}
    if not settings.get("enabled", False):
        return None
    mode = settings.get("mode", "offline")
    if mode not in WANDB_MODES:
        raise ConfigError(f"config key train.wandb.mode={mode!r}: choose one of "
                          f"{', '.join(WANDB_MODES)}")
    if not str(settings.get("project", "")).strip():
        raise ConfigError("config key train.wandb.project is empty: name the W&B project, "
                          "e.g. --config.train.wandb.project=nl_jax")
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"config key train.wandb.enabled=True, but wandb cannot be "
                          f"imported ({e}): {WANDB_INSTALL}, or set "
                          f"--config.train.wandb.enabled=False") from None
    return settings


class WandbRun:
    """A Weights & Biases run next to TensorBoard: the same records (as
    ``split/key`` at the record's step) and the resolved config.

    Its files go to ``$WANDB_DIR`` when set, else ``WORKDIR/wandb/``.  The run id
    is kept in ``WORKDIR/wandb_run_id``: a resumed training run continues its W&B
    run (``resume="allow"``), a run that starts from step 0 is a new one.  W&B
    cannot delete logged steps (``truncate`` cannot reach them): the records a
    killed run logged past its last checkpoint stay, and W&B ignores a resumed
    run's records at steps it already holds (with bit-exact resume their losses
    are the same; timings may differ).  W&B's console capture is off (the loop
    prints its own lines).
    """

    def __init__(self, settings: dict[str, Any], workdir: str, run_config: dict | None):
        self.settings = settings
        self.workdir = workdir
        self.run_config = run_config
        self.id_path = os.path.join(workdir, "wandb_run_id")
        self.run = None

    def start(self, resume: bool) -> None:
        """Starts (or, with ``resume`` and a kept run id, continues) the W&B run;
        a ``UserError`` if W&B refuses (e.g. online without credentials)."""
        import wandb
        run_id = None
        if resume and os.path.exists(self.id_path):
            with open(self.id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        new = run_id is None
        run_id = secrets.token_hex(4) if new else run_id
        s = self.settings
        directory = None if os.environ.get("WANDB_DIR") else self.workdir
        try:
            self.run = wandb.init(project=s["project"], entity=s.get("entity") or None,
                                  name=s.get("name") or None, mode=s.get("mode", "offline"),
                                  id=run_id, resume="allow", dir=directory,
                                  config=self.run_config,
                                  settings=wandb.Settings(console="off"))
        except Exception as e:      # wandb raises its own error types (UsageError, ...)
            message = " ".join(str(e).split())
            raise UserError(f"train.wandb: cannot start the W&B run ({type(e).__name__}: "
                            f"{message}); for mode=online run `wandb login` or set "
                            f"WANDB_API_KEY, or use --config.train.wandb.mode=offline or "
                            f"--config.train.wandb.enabled=False") from None
        if new:
            with open(self.id_path, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")

    def log(self, step: int, split: str, record: dict[str, Any]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in record.items()
                      if k not in ("step", "split") and isinstance(v, (int, float))},
                     step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricsWriter:
    """Writes each record to ``metrics.jsonl``, TensorBoard event files and,
    with ``wandb`` settings (``train.wandb``, see ``wandb_settings``), a Weights
    & Biases run (``WandbRun``; ``run_config``: the resolved config it records).

    Files are opened at the first record, so a run that fails before its first
    step leaves nothing behind (but the W&B run's, once ``start`` was called).
    ``truncate(step)`` (on resume) drops the records after ``step`` that a
    killed run logged past its last checkpoint, from the JSONL file and
    (``purge_step``) from TensorBoard, so a resumed run's curves have each step
    once.
    """

    def __init__(self, workdir: str, enabled: bool = True,
                 wandb: dict[str, Any] | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._file = None
        self._purge_step = None
        self._wandb = WandbRun(wandb, workdir, run_config) if wandb and enabled else None

    def start(self) -> None:
        """Starts the W&B run now, before the first record (the other files wait
        for it): a W&B run that cannot start fails the run before its step is
        compiled."""
        if self._wandb is not None and self._wandb.run is None:
            self._wandb.start(resume=bool(self._purge_step and self._purge_step > 1))

    def truncate(self, step: int) -> None:
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def _records(self, split: str):
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("split") == split:
                    yield record

    def first(self, split: str) -> dict[str, Any] | None:
        """The earliest record of ``split`` already in the JSONL file (None if none):
        a resumed run reports the run's first loss, not its invocation's."""
        return next(self._records(split), None)

    def last(self, split: str) -> dict[str, Any] | None:
        """The latest record of ``split`` already in the JSONL file (None if none)."""
        record = None
        for record in self._records(split):   # noqa: B007 (the last one is kept)
            pass
        return record

    def _open(self) -> None:
        from tensorboardX import SummaryWriter
        self.start()     # first: a W&B failure leaves no metrics files
        os.makedirs(self.workdir, exist_ok=True)
        self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                                 purge_step=self._purge_step)
        # open for the writer's lifetime; closed by close()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        record = {"step": int(step), "split": split, **to_python(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            # a non-finite loss is in the JSONL record; TensorBoard cannot plot it
            if (k not in ("step", "split") and isinstance(v, (int, float))
                    and np.isfinite(v)):
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        if self._wandb is not None:
            self._wandb.log(step, split, record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None
        if self._wandb is not None:
            self._wandb.close()


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")      # a torn last line of a killed run: dropped


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise; silent when not enabled
    (processes other than 0 of a multi-process run)."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool = True):
        self.every = every
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.bar = None
        if self.tty and enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float] | None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                extra = {"mfu": f"{metrics['mfu']:.3f}"} if "mfu" in metrics else {}
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", **extra)
        elif metrics and self.enabled:
            print(format_line(step, metrics), flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_line(step: int, metrics: dict[str, float]) -> str:
    keys = ("loss", "perplexity", "grad_norm", "lr", "tokens_per_s", "step_ms", "mfu",
            "compile_s")
    parts = [f"step {step}"]
    for k in keys:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def plot_loss_curve(metrics_path: str, out_path: str) -> None:
    """Train and eval loss against step, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                xs, ys = series.setdefault(r["split"], ([], []))
                xs.append(r["step"])
                ys.append(r["loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o" if split != "train" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` (spent on something else) out of the current lap."""
        self.t += seconds
