#!/usr/bin/env bash
# One GPU-machine call for the NF4 kernels issue: kernel table, then the GPU suite (logs under $OUT).
# Usage there: bash bench/gpu_nf4.sh   (carry .whl; see ../shared/gpu/wheels.sh)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
# The CUDA NF4 extension takes ~90 s to build on a fresh machine: build it into .torch_ext, send it back
# as $OUT/torch_ext.tgz, and next time unpack that into .torch_ext here and name it in `carry`
# (torch reuses a build whose sources and flags are unchanged).
export TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/smi.txt"
timeout "${KERNELS_TIMEOUT:-330}" python3 -m bench.kernels --out "$OUT" ${KERNELS_ARGS:-} 2>&1 | tee "$OUT/kernels.log"
timeout "${PREFILL_TIMEOUT:-150}" python3 -m bench.prefill --out "$OUT" 2>&1 | tee "$OUT/prefill.log"
timeout "${PROFILE_TIMEOUT:-120}" python3 -m bench.profile_step --model 1b --out "$OUT" 2>&1 | tee "$OUT/profile.log"
timeout "${TESTS_TIMEOUT:-220}" python3 -m pytest tests/gpu -q -m gpu -p no:cacheprovider ${TESTS_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
tar czf "$OUT/torch_ext.tgz" -C .torch_ext . 2>/dev/null || true
