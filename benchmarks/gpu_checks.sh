#!/usr/bin/env bash
# The GPU checks of one lent device session (a machine with JAX and no TensorFlow or Keras): Keras and its two
# missing dependencies come as wheels in .whl/, a trained demo run as runs/RUN. Every step is bounded in time and
# writes straight into $OUT.
#   bash benchmarks/gpu_checks.sh RUN PRIOR_BUDGET_S SIZE...
#   AUGMENT=2 STEP_CHECK=0 bash benchmarks/gpu_checks.sh RUN PRIOR_BUDGET_S SIZE...  # priors on augmented grids only
# The wheels, fetched here (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_28_x86_64 -d .whl keras==3.15.1 namex optree, .whl/ excluded from git); the run: a copy of a trained
# demo run's config.json, progress.json, vqvae.keras and codes_*.npz. 2026-12-04: `gpu 75 32x6 128x12k5 128x12k5a2`
# (docs/experiments.md).
set -u
run=$1 budget=$2
shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
timeout $(( (budget + 60) * $# + 30 )) python3 -m benchmarks.prior_capacity --run "runs/$run" --budget "$budget" \
  --sizes "$@" --augment "${AUGMENT:-0}" --out "$OUT" > "$OUT/capacity.log" 2>&1
echo "prior_capacity exit $?"
[ "${STEP_CHECK:-1}" = 1 ] && timeout 200 python3 -m benchmarks.jax_train_step --dtype mixed_bfloat16 --rounds 2 > "$OUT/jax_train_step.log" 2>&1
echo "jax_train_step exit $?"
tail -n 3 "$OUT/capacity.log" | cut -c 1-600
tail -n 4 "$OUT/jax_train_step.log"
