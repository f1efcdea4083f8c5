#!/bin/bash
# GPU checks and timings of the chunk-scan kernels (Triton), for one call of a lent
# GPU machine (no network there; its image has jax 0.11.2 with CUDA 13, Python 3.12).
# Prepare on the host, in the repo root (the project's pinned pure-Python packages and
# grain's binary wheel, which the image lacks or has at other versions):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu; cp docs/gpu_check.sh .gpu/run.sh
#   for p in flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 grain==0.2.18 \
#            ml_collections==1.1.0 tensorboardX==2.6.5 array-record==0.8.6 portpicker==1.6.0; do
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .gpu $p; done
# then run `bash .gpu/run.sh` there, carrying .gpu and runs/token_cache (~5 minutes).
# One device call: Triton linear-memory kernel checks and timings on the GPU.
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"          # the device tool sets OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
echo "== 1. kernel tests on the GPU"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_memory_kernel.py tests/test_self_modifying_kernel.py -k "gpu or oracle or streams or equals or state_starts" 2>&1 | tail -25 | tee $OUT/pytest.txt
echo "== 2. bench memory (issue 3 shape), oracle / chunked / kernel"
timeout 100 python3 -m nl_jax bench memory --paths oracle,chunked,kernel --json $OUT/memory.json 2>&1 | grep -v Warning | tail -14
echo "== 3. bench memory, B=16 H=8"
timeout 70 python3 -m nl_jax bench memory --paths chunked,kernel --batch 16 --heads 8 --json $OUT/memory_b16h8.json 2>&1 | grep -v Warning | tail -8
echo "== 3b. bench memory, the issue's kernel shape (B=4 H=16 d=128), each level, chunked vs kernel"
for level in titans_linear titans_mlp hope; do
  timeout 100 python3 -m nl_jax bench memory --level $level --paths chunked,kernel --batch 4 --heads 16 --dim 128 --lengths 2048,8192 --json $OUT/memory_$level.json 2>&1 | grep -v Warning | tail -6
done
echo "== 4. Titans MAG training, chunked vs kernel"
TINY="--config experiments/titans/tiny.py --config.train.eval_every=0 --config.train.eval_batches=1 --config.train.checkpoint_every=1000 --config.train.log_every=10 --config.train.sample_tokens=0"
BIG="--config.model.d_model=512 --config.model.n_layers=4 --config.model.n_heads=8 --config.model.d_ff=1536 --config.data.seq_len=1024 --config.data.batch_size=16 --config.model.dtype=bfloat16 --config.model.memory.chunk_size=64"
for p in chunked kernel; do
  echo "-- tiny $p"; timeout 60 python3 -m nl_jax train $TINY --workdir /tmp/tiny_$p --config.train.steps=100 --config.model.memory.path=$p 2>&1 | grep -E "^step (50|90|100) |^final|memory per|Error|error" | cut -c1-220
  echo "-- big $p"; timeout 90 python3 -m nl_jax train $TINY $BIG --workdir /tmp/big_$p --config.train.steps=40 --config.model.memory.path=$p 2>&1 | grep -E "^step (10|30|40) |^final|memory per|Error|error" | cut -c1-220
done
echo "== done"
