#!/bin/bash
# Transformer++, the engine's baselines (and Samba-style), Titans MAG and Hope at tiny scale: the
# same data, steps and tokens, parameters matched within 10%; prints each
# run's final line (held-out loss, tokens/s).  docs/benchmarks.md "Baselines at
# tiny scale".  Usage: bash experiments/baselines/compare.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-200}
OUT=${1:-/tmp/cmp}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
run() {
  name=$1; shift
  rm -rf "$OUT/$name"
  "$PY" -m nl_jax train "$@" --config.train.steps="$STEPS" --config.train.eval_every=0 \
      --config.train.eval_batches=8 --config.train.sample_tokens=0 \
      --config.train.checkpoint_every=0 --config.train.log_every=50 \
      --workdir "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: $(grep '^final' "$OUT/$name.log")"
}
run transformer --config experiments/transformer/tiny.py
run linear_attention --config experiments/baselines/linear_attention.py
run mamba2 --config experiments/baselines/mamba2.py
run deltanet --config experiments/baselines/deltanet.py
run gated_deltanet --config experiments/baselines/gated_deltanet.py
run titans_mag --config experiments/titans/tiny.py --config.model.mixer=titans_mag \
    --config.model.d_ff=320
run hope --config experiments/hope/tiny.py --config.model.d_ff=192
run samba --config experiments/baselines/samba.py
run ttt_linear --config experiments/baselines/ttt_linear.py
