"""Kill-and-resume soak (run by hand; not part of `make test`, ~5 min on 2 cores).

    .venv/bin/python tests/soak_kill_resume.py [--kills 12] [--steps 150] [--seed 0]

Trains a tiny Transformer++ with a checkpoint after every step (so that most
kills land while an async checkpoint write is under way), SIGKILLs the
`train` process at random moments ``--kills`` times, reruns the same command
until it finishes, and checks that the final parameters, optimizer state and
data-iterator state are bit-equal to an uninterrupted run of the same
command, and that `metrics.jsonl` holds every step once.  Prints one line per
kill (step reached, whether a checkpoint write was under way) and a summary;
exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int, cache: str) -> list[str]:
    return [sys.executable, "-m", "nl_jax", "train", "--config",
            "experiments/transformer/tiny.py", f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.eval_batches=1", "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=3", "--config.train.sample_tokens=0",
            "--config.data.seq_len=32", "--config.data.batch_size=8",
            f"--config.data.cache_dir={cache}", "--config.model.d_model=32",
            "--config.model.n_layers=1", "--config.model.n_heads=2",
            "--config.model.d_ff=64", "--workdir", workdir]


def final_state(workdir: str):
    sys.path.insert(0, REPO)
    import jax
    import ml_collections
    import numpy as np

    from nl_jax.train.loop import Trainer
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    trainer = Trainer(config, workdir, devices=jax.devices()[:1])
    trainer.maybe_restore()
    return ([np.asarray(x) for x in jax.tree.leaves(trainer.state)],
            trainer.data.get_state())


def verify(reference: str, victim: str, steps: int) -> bool:
    """Final state bit-equal to the reference, same data state, each step logged once."""
    (a, data_a), (b, data_b) = final_state(reference), final_state(victim)
    same = len(a) == len(b) and all((x == y).all() and x.dtype == y.dtype
                                    for x, y in zip(a, b, strict=True))
    with open(os.path.join(victim, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    once = [r["step"] for r in records if r["split"] == "train"] == list(range(1, steps + 1))
    if not (same and data_a == data_b and once):
        print(f"  differs: state {same}, data state {data_a == data_b}, steps once {once}")
    return same and data_a == data_b and once


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="nl_jax_soak_")
    cache = os.path.join(tmp, "cache")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    reference, victim = os.path.join(tmp, "reference"), os.path.join(tmp, "victim")
    t0 = time.time()
    subprocess.run(command(reference, args.steps, cache), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_s = time.time() - t0
    print(f"reference run: {run_s:.1f} s", flush=True)
    kills = during_write = checked = failures = 0
    while kills < args.kills:
        proc = subprocess.Popen(command(victim, args.steps, cache), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, max(4.0, 0.6 * run_s)))
        writing = bool(glob.glob(os.path.join(victim, "checkpoints", "*.orbax-checkpoint-tmp*")))
        if proc.poll() is not None:
            ok = verify(reference, victim, args.steps)
            checked += 1
            failures += not ok
            print(f"  the run finished before the kill: chain {checked} checked "
                  f"({'equal' if ok else 'DIFFERENT'}); starting over", flush=True)
            shutil.rmtree(victim)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_write += writing
        done = sorted(int(s) for s in os.listdir(os.path.join(victim, "checkpoints"))
                      if s.isdigit()) if os.path.isdir(os.path.join(victim, "checkpoints")) else []
        print(f"kill {kills}: latest complete checkpoint {done[-1] if done else 'none'}, "
              f"write under way: {writing}", flush=True)
    subprocess.run(command(victim, args.steps, cache), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = verify(reference, victim, args.steps)
    checked += 1
    failures += not ok
    print(f"{kills} SIGKILLs ({during_write} during a checkpoint write) over {checked} "
          f"resumed chains: {checked - failures} ended bit-equal to the uninterrupted run "
          f"(parameters, optimizer state, data state, each step logged once)")
    ok = failures == 0
    if ok:
        shutil.rmtree(tmp)
    else:
        print(f"kept {tmp} for inspection")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
