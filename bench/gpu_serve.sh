#!/usr/bin/env bash
# One GPU-machine call for the serving issues: bench.serve presets, then prefill and step profiles.
# Usage there: SERVE_RUNS="1b:c32 1b:lora-modes:280" [COLD_LOAD=8b] bash bench/gpu_serve.sh  (carry .whl, .torch_ext and .triton_cache; see ../shared/gpu/wheels.sh)
# Each run is shape:preset[:timeout_s]; a run without its own timeout gets SERVE_TIMEOUT (240).
# Each step has its own timeout so one slow step cannot eat the others' time; JSON, one run.log and
# build_cache.tgz go to $OUT (at most 8 files come back: keep to 5 result files a call). A c32 run needs
# SERVE_TIMEOUT >= 240 (server start, upload, two loads, the engine alone); at 105 its loads were skipped.
# LOGS=1: each run keeps its work dir under /tmp/work, and the server logs go to $OUT/logs.tgz with the step
# traces of LORAPLEX_STEP_TRACE (server/engine/step_trace.py) when that is set; each trace's summary
# (python -m bench.trace_summary) goes to run.log.
# HOP_TRACE=1: each run's requests timed hop by hop (server/hop_trace.py); the table of each run goes to run.log.
# GPU_TESTS="-k expr": first, the GPU tests that match (pytest -m gpu), their tail to $OUT/gpu_tests.txt.
# ENGINE_THREAD=1: the runs keep the engine in a thread of the HTTP process (default: --engine-process).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# The engine imports these; the GPU machine has none of them: `bash ../shared/gpu/wheels.sh pyzmq msgspec llguidance
# httptools uvloop` then `python -m bench.slim_wheels` here (the first call of the fourteenth session lost its run to that)
python3 -c "import msgspec, zmq, llguidance, fastapi, bitsandbytes" \
  || { echo "missing wheels in .whl: see the comment above this check in $0"; exit 1; }
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
# Triton's compiled kernels: the server's start compiles every kernel and variant on a fresh machine; they come back
# with the CUDA extension in $OUT/build_cache.tgz (below), to unpack here and carry next time (mind carry's 64 MiB)
export TRITON_CACHE_DIR=$PWD/.triton_cache && mkdir -p "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader > "$OUT/smi.txt"
if [ -n "${GPU_TESTS:-}" ]; then
  eval "gpu_test_args=($GPU_TESTS)"  # GPU_TESTS is pytest arguments, quoted as on a command line
  timeout "${GPU_TESTS_TIMEOUT:-150}" python3 -m pytest -q -s tests/gpu -m gpu "${gpu_test_args[@]}" 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
fi
# COLD_LOAD=8b (a shape): the stages of a cold adapter first (python -m bench.cold_load), about 20 s.
[ -n "${COLD_LOAD:-}" ] && timeout 120 python3 -m bench.cold_load --model "$COLD_LOAD" --out "$OUT" 2>&1 | tail -12 >> "$OUT/run.log"
# The serving targets are measured with the engine in its own process: unless SERVE_ARGS names --engine-process
# itself or ENGINE_THREAD=1 asks for the thread mode, every run gets it (the twenty-fourth session's lora-modes run
# went out without it and measured the thread mode by mistake).
engine_args=()
case " ${SERVE_ARGS:-} " in *engine-process*) ;; *) [ -z "${ENGINE_THREAD:-}" ] && engine_args=(--server-arg=--engine-process);; esac
for run in ${SERVE_RUNS:-1b:c32}; do
  IFS=: read -r shape preset limit <<< "$run"
  limit=${limit:-${SERVE_TIMEOUT:-240}}
  work=()
  [ -n "${LOGS:-}" ] && work=(--work-dir "/tmp/work/$shape-$preset")
  [ -n "${HOP_TRACE:-}" ] && export LORAPLEX_HOP_TRACE="/tmp/hops/$shape-$preset"
  timeout "$limit" python3 -m bench.serve --model "$shape" --preset "$preset" --out "$OUT" \
    --budget-s $(( limit - 20 )) "${work[@]}" "${engine_args[@]}" ${SERVE_ARGS:-} 2>&1 | tail -40 >> "$OUT/run.log"
  if [ -n "${HOP_TRACE:-}" ]; then  # every load of the run, warm-ups included (the first 100 requests left out)
    { echo "== hops of $shape:$preset"; python3 -m bench.hop_trace "$LORAPLEX_HOP_TRACE" --skip 100; } >> "$OUT/run.log" 2>&1
  fi
done
if [ -n "${LOGS:-}" ]; then
  (cd /tmp/work && find . -name '*.log'; [ -n "${LORAPLEX_STEP_TRACE:-}" ] && find "$LORAPLEX_STEP_TRACE" -name '*.jsonl') \
    | tar czf "$OUT/logs.tgz" -C /tmp/work -T - 2>/dev/null || true
fi
if [ -n "${LORAPLEX_STEP_TRACE:-}" ]; then
  for trace in "$LORAPLEX_STEP_TRACE"/steps-*.jsonl; do
    [ -s "$trace" ] || continue
    echo "== $trace" >> "$OUT/run.log"
    python3 -m bench.trace_summary "$trace" --slow-ms 50 2>&1 | head -60 >> "$OUT/run.log"
  done
  for loads in "$LORAPLEX_STEP_TRACE"/loads-*.jsonl "$LORAPLEX_STEP_TRACE"/uploads-*.jsonl; do  # reads, uploads
    [ -s "$loads" ] && { echo "== $loads"; head -24 "$loads"; } >> "$OUT/run.log"
  done
fi
[ -n "${PREFILL_TIMEOUT:-}" ] && timeout "$PREFILL_TIMEOUT" python3 -m bench.prefill --out "$OUT" 2>&1 | tail -40 >> "$OUT/run.log"
for shape in ${PROFILE_SHAPES:-}; do
  timeout "${PROFILE_TIMEOUT:-90}" python3 -m bench.profile_step --model "$shape" --out "$OUT" 2>&1 | tail -40 >> "$OUT/run.log"
done
# The built CUDA NF4 extension (~90 s to build) and Triton's kernels: `tar xzf build_cache.tgz` in the checkout here
# and carry .torch_ext and .triton_cache next time.
tar czf "$OUT/build_cache.tgz" .torch_ext .triton_cache 2>/dev/null && du -h "$OUT/build_cache.tgz" >> "$OUT/run.log" || true
cat "$OUT/run.log"
