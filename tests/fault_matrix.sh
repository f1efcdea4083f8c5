#!/bin/bash
# Environment-fault matrix of issue 23, run by hand as root (tmpfs mounts):
# read-only workdir, full disk, missing manifest, truncated _METADATA, empty step
# folder.  Each case prints rc, the number of stderr lines and tracebacks, and
# the first lines of stderr.  Uses /tmp/fa_* and /tmp/faults_*.
PY=${PY:-.venv/bin/python}
cd "$(dirname "$0")/.."
FLAGS="--config experiments/transformer/tiny.py --config.train.log_every=1 --config.train.eval_every=0 --config.train.eval_batches=1 --config.train.sample_tokens=0 --config.data.seq_len=32 --config.data.batch_size=8 --config.model.d_model=32 --config.model.n_layers=1 --config.model.n_heads=2 --config.model.d_ff=64 --config.data.cache_dir=/tmp/faults_cache"
run() { echo "== $1"; shift; "$@" > /tmp/faults_out.txt 2> /tmp/faults_err.txt; echo "rc=$?"; echo "stderr lines: $(grep -c . /tmp/faults_err.txt)"; grep -c Traceback /tmp/faults_err.txt | sed 's/^/tracebacks: /'; head -c 400 /tmp/faults_err.txt; echo; }
umount /tmp/fa_ro /tmp/fa_full 2>/dev/null; rm -rf /tmp/fa_base; mkdir -p /tmp/fa_ro /tmp/fa_full
$PY -m nl_jax train $FLAGS --config.train.steps=4 --config.train.checkpoint_every=2 --workdir /tmp/fa_base > /dev/null 2>&1
# 1. read-only workdir: train (resume) and eval
mount -t tmpfs -o size=50m tmpfs /tmp/fa_ro && cp -a /tmp/fa_base /tmp/fa_ro/run && mount -o remount,ro /tmp/fa_ro
run "read-only workdir: train" $PY -m nl_jax train $FLAGS --config.train.steps=6 --config.train.checkpoint_every=2 --workdir /tmp/fa_ro/run
run "read-only workdir: eval" $PY -m nl_jax eval --workdir /tmp/fa_ro/run --batches 1
cat /tmp/faults_out.txt | head -c 200; echo
umount /tmp/fa_ro
# 2. full disk: a tmpfs that holds the base run but not many more checkpoints
SIZE=$(du -sk /tmp/fa_base | cut -f1)
mount -t tmpfs -o size=$((SIZE + 900))k tmpfs /tmp/fa_full && cp -a /tmp/fa_base /tmp/fa_full/run
df -k /tmp/fa_full | tail -1
run "full disk: train 4 -> 40, checkpoint every step" $PY -m nl_jax train $FLAGS --config.train.steps=40 --config.train.checkpoint_every=1 --config.train.keep_checkpoints=50 --workdir /tmp/fa_full/run
ls /tmp/fa_full/run/checkpoints
run "full disk: eval still reads the last good checkpoint" $PY -m nl_jax eval --workdir /tmp/fa_full/run --batches 1
umount /tmp/fa_full
# 3. missing manifest.ocdbt of the latest checkpoint
rm -rf /tmp/fa_man && cp -a /tmp/fa_base /tmp/fa_man && rm /tmp/fa_man/checkpoints/4/state/manifest.ocdbt
run "missing manifest: eval" $PY -m nl_jax eval --workdir /tmp/fa_man --batches 1
run "missing manifest: train" $PY -m nl_jax train $FLAGS --config.train.steps=6 --config.train.checkpoint_every=2 --workdir /tmp/fa_man
ls /tmp/fa_man/checkpoints /tmp/fa_man/damaged_checkpoints
# 4. truncated _METADATA and an empty step folder
rm -rf /tmp/fa_meta && cp -a /tmp/fa_base /tmp/fa_meta && truncate -s 100 /tmp/fa_meta/checkpoints/4/state/_METADATA
run "truncated _METADATA: train" $PY -m nl_jax train $FLAGS --config.train.steps=6 --config.train.checkpoint_every=2 --workdir /tmp/fa_meta
rm -rf /tmp/fa_empty && cp -a /tmp/fa_base /tmp/fa_empty && mkdir /tmp/fa_empty/checkpoints/8
run "empty step folder: train" $PY -m nl_jax train $FLAGS --config.train.steps=6 --config.train.checkpoint_every=2 --workdir /tmp/fa_empty
