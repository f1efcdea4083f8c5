"""Metrics sinks: JSONL, TensorBoard, terminal progress, loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np


def to_python(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.dtype.kind != "f" else float(v)
    return out


class MetricsWriter:
    """Writes each record to ``metrics.jsonl`` and TensorBoard event files.

    Files are opened at the first record, so a run that fails before its first
    step leaves nothing behind.  ``truncate(step)`` (on resume) drops the
    records after ``step`` that a killed run logged past its last checkpoint,
    from the JSONL file and (``purge_step``) from TensorBoard, so a resumed
    run's curves have each step once.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._file = None
        self._purge_step = None

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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None


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
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
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
    keys = ("loss", "perplexity", "grad_norm", "lr", "tokens_per_s", "step_ms")
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
