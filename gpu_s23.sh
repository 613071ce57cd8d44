#!/usr/bin/env bash
# session 23, call 1: unrun GPU tests, engine tests with the fill kernel, 1B profiles A/B
TESTS_ARGS="-rfE -q -k 'test_engine_gpu or test_glue_gpu or step_inputs or rotary or deferred or graph or embed'" \
  TESTS_TIMEOUT=260 KERNELS_TIMEOUT=0 PREFILL_TIMEOUT=0 PROFILE_TIMEOUT=100 bash bench/gpu_nf4.sh
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=$PWD/.torch_ext PYTHONUNBUFFERED=1
LORAPLEX_FILL_KERNEL=1 timeout 150 python3 -m pytest tests/gpu/test_engine_gpu.py -q -m gpu -p no:cacheprovider -rfE 2>&1 | tee $OUT/gpu_tests_fill.log | tail -8
mkdir -p $OUT/fill $OUT/sums
LORAPLEX_FILL_KERNEL=1 timeout 100 python3 -m bench.profile_step --model 1b --out $OUT/fill 2>&1 | tee $OUT/profile_fill.log | tail -25
LORAPLEX_FILL_KERNEL=1 LORAPLEX_NORM_SPLIT_SUMS=1 timeout 100 python3 -m bench.profile_step --model 1b --out $OUT/sums 2>&1 | tee $OUT/profile_sums.log | tail -25
cd $OUT && tar czf logs.tgz *.log && rm -f *.log torch_ext.tgz smi.txt
