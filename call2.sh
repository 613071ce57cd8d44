#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
for g in 256 1024; do
  mkdir -p $OUT/g$g
  timeout 130 python3 -m bench.engine_loop --model 1b --requests 64 --profile-steps 8 --carry 8 --graph-rows $g --out $OUT/g$g 2>&1 | tail -75 | grep -v '^ *"aten\|^ *"cuda' | tail -70
done
SERVE_ARGS="--tag s16-proc-r1024 --requests 1024 --server-arg=--engine-process" SERVE_RUNS="1b:c32:300" bash bench/gpu_serve.sh 2>&1 | tail -30
