#!/usr/bin/env bash
# One GPU-machine call for the NF4 kernels issue: GPU tests, Nsight Compute, kernel table, prefill, step profile.
# Usage there: bash bench/gpu_nf4.sh   (carry .whl, .torch_ext and .triton_cache; see ../shared/gpu/wheels.sh)
# Each step has its own timeout; a timeout of 0 skips the step. TESTS_ARGS: pytest arguments for tests/gpu
# (quoted as on a command line); NCU_ROWS=1,32: ncu sections of the NF4 kernels (bench.nf4_ncu); PROFILE_ARGS:
# bench.profile_step's (default --model 1b).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# The engine imports these; the GPU machine has none of them: `bash ../shared/gpu/wheels.sh pyzmq msgspec llguidance
# httptools uvloop` then `python -m bench.slim_wheels` here (the first call of the fourteenth session lost its run to that)
python3 -c "import msgspec, zmq, llguidance, fastapi, bitsandbytes" \
  || { echo "missing wheels in .whl: see the comment above this check in $0"; exit 1; }
export PYTHONUNBUFFERED=1
# The CUDA NF4 extension takes ~90 s to build on a fresh machine (about half that since 47919fd: csrc/nf4_mma.cu
# includes only the torch headers it uses): build it into .torch_ext, send it back
# in $OUT/torch_ext.tgz, and next time unpack that here (`tar xzf torch_ext.tgz` in the checkout) and name
# .torch_ext in `carry`
# (the build is named by a digest of server/kernels/nf4/csrc, so a changed source or header rebuilds).
export TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
# A carried build is older than the checkout's copied sources: newer outputs tell ninja it is up to date (the build's
# name is a digest of csrc, so a changed source still builds anew)
[ -d .torch_ext ] && find .torch_ext -type f -exec touch {} +
# Triton's compiled kernels likewise (a fresh machine compiles every kernel and variant again at first launch):
# .triton_cache, in the same archive, carried next time too (mind carry's 64 MiB in all)
export TRITON_CACHE_DIR=$PWD/.triton_cache && mkdir -p "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/smi.txt"
step() {  # step TIMEOUT LOG COMMAND...: run unless TIMEOUT is 0
  local limit=$1 log=$2; shift 2
  [ "$limit" = 0 ] && return 0
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log" | tail -40
}
python3 -c "import time; t = time.time(); from server.model import cuda_nf4; ok = cuda_nf4.is_available(); \
print('cuda_nf4 available:', ok, f'(built or loaded in {time.time() - t:.0f} s)')" 2>&1 | tail -5
# SOL_TIMEOUT (default 0: skipped): the one-row kernel's speed-of-light probes (bench.nf4_sol), first
eval "sol_args=(${SOL_ARGS:-})"  # e.g. SOL_ARGS="--probes pair_regs,pair_regs_trunc --warps 4,32"
step "${SOL_TIMEOUT:-0}" nf4_sol.log python3 -m bench.nf4_sol --out "$OUT" "${sol_args[@]}"
# WGMMA_SOL_TIMEOUT (default 0: skipped): the 17-32 row wgmma kernel's stage loop with parts left out
# (bench.wgmma_sol; WGMMA_SOL_ARGS e.g. "--models 8b --rows 16,32")
eval "wgmma_sol_args=(${WGMMA_SOL_ARGS:-})"
step "${WGMMA_SOL_TIMEOUT:-0}" wgmma_sol.log python3 -m bench.wgmma_sol --out "$OUT" "${wgmma_sol_args[@]}"
eval "test_args=(${TESTS_ARGS:-})"
step "${TESTS_TIMEOUT:-220}" gpu_tests.log python3 -m pytest tests/gpu -q -m gpu -p no:cacheprovider "${test_args[@]}"
# NCU_ROWS=1,32: Nsight Compute sections of the kernels the dispatch runs at those rows (8B gate_up; NCU_LAYER for
# another); NCU_PROBES=stream,dequant,x: also bench.nf4_sol's probes at one row (NCU_PROBE_CONFIG warps,splits);
# NCU_PAIRS=1: also the byte-pair table's kernel (gemv_pairs) at those rows up to 8
# The stall reasons a warp's cycles between issues split into (the sections print only their sum and the largest)
NCU_KERNELS='regex:nf4_(tile|gemv|gemv_pairs|sol|wide|wgmma|wgmma_resident)_kernel'  # every NF4 kernel, the probes
NCU_STALLS="long_scoreboard short_scoreboard mio_throttle lg_throttle barrier wait math_pipe_throttle not_selected \
selected dispatch_stall no_instruction branch_resolving membar sleeping"
# NCU_WGMMA_PROBES=loads,kernel: also bench.wgmma_sol's probes at 32 rows (NCU_ROWS=none: no dispatch kernel, so no
# build of the CUDA extension); NCU_MEMORY_TABLES=1: the memory workload's per-unit tables (L1, L2, DRAM sectors);
# NCU_RESIDENT=4,7: the x-resident wgmma kernel at 32 rows with those warpgroup counts
# NCU_PIPES=1: also each pipe's share of its peak, the L1's shared-memory wavefronts, L1 and DRAM throughput, the clock
[ -n "${NCU_PIPES:-}" ] && NCU_PIPES=",$(printf 'sm__pipe_%s_cycles_active.avg.pct_of_peak_sustained_active,' alu fma \
  fmaheavy shared)sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg.per_second"
if [ -n "${NCU_ROWS:-}" ]; then
  [ "$NCU_ROWS" = none ] && NCU_ROWS=""
  step "${NCU_TIMEOUT:-120}" ncu.txt ncu --clock-control none \
    --kernel-name "$NCU_KERNELS" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
    ${NCU_MEMORY_TABLES:+--section MemoryWorkloadAnalysis_Tables} \
    --metrics "$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' $NCU_STALLS | sed 's/,$//')${NCU_PIPES:-}" \
    python3 -m bench.nf4_ncu --rows "$NCU_ROWS" --layer "${NCU_LAYER:-gate_up}" --probes "${NCU_PROBES:-}" \
    --probe-config "${NCU_PROBE_CONFIG:-2,8}" ${NCU_PAIRS:+--pairs} --wgmma-probes "${NCU_WGMMA_PROBES:-}" \
    --resident "${NCU_RESIDENT:-}"
fi
# ATTN_NCU="default;fresh_kv=true": Nsight Compute sections and warp stalls of the decode step's attention kernel
# (bench.attention_ncu: 8B batch 32, cold) under each LORAPLEX_DECODE_TUNING of the list, into attention_ncu_<i>.txt
if [ -n "${ATTN_NCU:-}" ]; then
  IFS=';' read -r -a attn_tunings <<< "$ATTN_NCU"
  for i in "${!attn_tunings[@]}"; do
    tuning=${attn_tunings[$i]}; [ "$tuning" = default ] && tuning=""
    echo "attention ncu $i: LORAPLEX_DECODE_TUNING=$tuning"
    LORAPLEX_DECODE_TUNING=$tuning timeout "${ATTN_NCU_TIMEOUT:-90}" ncu --clock-control none \
      --kernel-name regex:_decode_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section InstructionStats --section SchedulerStats \
      --metrics "$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' $NCU_STALLS | sed 's/,$//')" \
      python3 -m bench.attention_ncu > "$OUT/attention_ncu_$i.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Registers Per|Achieved Active|stalled_(long|wait|barrier)" \
      "$OUT/attention_ncu_$i.txt" | head -12
  done
fi
# NCU_SOURCE=1 (with NCU_ROWS): the same kernels' warp-stall samples per SASS instruction (SourceCounters), as
# $OUT/source_sass.csv.gz (ncu's source page): where in a kernel's loop its warps wait, and on what
if [ -n "${NCU_SOURCE:-}" ] && [ -n "${NCU_ROWS:-}" ]; then
  timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none \
    --kernel-name "$NCU_KERNELS" --launch-count "${NCU_SOURCE_LAUNCHES:-4}" \
    --section SourceCounters --section WarpStateStats -f -o "$OUT/source" \
    python3 -m bench.nf4_ncu --rows "$NCU_ROWS" --layer "${NCU_LAYER:-gate_up}" ${NCU_PAIRS:+--pairs} 2>&1 | tail -8
  { ncu -i "$OUT/source.ncu-rep" --page source --csv --print-source sass \
      || ncu -i "$OUT/source.ncu-rep" --page source --csv; } 2> "$OUT/source_err.txt" | gzip > "$OUT/source_sass.csv.gz"
  ncu -i "$OUT/source.ncu-rep" --page details 2>&1 | grep -E "nf4_|Duration|Warp Cycles|Issued" | head -20
  rm -f "$OUT/source.ncu-rep"
fi
# LORA_TIMEOUT (default 0: skipped): the LoRA shrink and expand kernels and their launch sweeps (bench.lora_kernels;
# LORA_ARGS, default "--models 8b --scenarios decode32": the mixed-adapter decode step's launches)
eval "lora_args=(${LORA_ARGS:---models 8b --scenarios decode32})"
step "${LORA_TIMEOUT:-0}" lora_kernels.log python3 -m bench.lora_kernels --out "$OUT" "${lora_args[@]}"
eval "kernel_args=(${KERNELS_ARGS:-})"
step "${KERNELS_TIMEOUT:-330}" kernels.log python3 -m bench.kernels --out "$OUT" "${kernel_args[@]}"
step "${PREFILL_TIMEOUT:-150}" prefill.log python3 -m bench.prefill --out "$OUT"
eval "profile_args=(${PROFILE_ARGS:---model 1b})"
step "${PROFILE_TIMEOUT:-120}" profile.log python3 -m bench.profile_step --out "$OUT" "${profile_args[@]}"
# PROFILE_AB="NAME=value ...[; NAME=value ...]": the step profile once more for each ';'-separated set of variables,
# into $OUT/ab1, $OUT/ab2, ... (JSON) and one profile_ab.log (its wall_ms_per_step against the first's: an A/B of a
# launch change in ~70 s a set, where the 8B engine bench takes 150; mind the 8 files a call brings back)
if [ -n "${PROFILE_AB:-}" ] && [ "${PROFILE_TIMEOUT:-120}" != 0 ]; then
  IFS=';' read -ra profile_ab_sets <<< "$PROFILE_AB"
  index=0
  for set in "${profile_ab_sets[@]}"; do
    index=$(( index + 1 ))
    mkdir -p "$OUT/ab$index"
    eval "profile_ab_env=(${set})"
    echo "== PROFILE_AB $index: ${set}" | tee -a "$OUT/profile_ab.log"
    timeout "${PROFILE_TIMEOUT:-120}" env "${profile_ab_env[@]}" python3 -m bench.profile_step --out "$OUT/ab$index" \
      "${profile_args[@]}" 2>&1 | tee -a "$OUT/profile_ab.log" | tail -20
  done
fi
# ENGINE_TIMEOUT (default 0: skipped): python -m bench --model 8b --skip-baseline (b1 tokens/s, swap, mixed/merged);
# 150 fits every row on a fresh machine (at 100-110 the bench's own budget skipped the merged rows twice)
step "${ENGINE_TIMEOUT:-0}" engine.log python3 -m bench --model 8b --skip-baseline --budget-s $(( ${ENGINE_TIMEOUT:-0} - 30 )) \
  --out "$OUT"
# ENGINE_AB="NAME=value ...": the engine bench once more with those variables set, into $OUT/ab (an A/B in one call;
# it takes the first run's NF4 tuning picks from the cache file unless the variables are LORAPLEX_NF4_* or
# LORAPLEX_PDL* ones, so its start is shorter and the two run the same NF4 kernels)
if [ -n "${ENGINE_AB:-}" ] && [ "${ENGINE_TIMEOUT:-0}" != 0 ]; then
  mkdir -p "$OUT/ab"
  eval "ab_env=(${ENGINE_AB})"
  step "$ENGINE_TIMEOUT" engine_ab.log env "${ab_env[@]}" python3 -m bench --model 8b --skip-baseline \
    --budget-s $(( ENGINE_TIMEOUT - 30 )) --out "$OUT/ab"
fi
# At most 8 files come back from a call (the forty-third session lost an A/B run's JSON and a test log to that): the
# subfolders (ENGINE_AB's ab/, PROFILE_AB's ab1/..., any a command moved its logs into) travel as one archive
folders=$(cd "$OUT" && find . -mindepth 1 -maxdepth 1 -type d -printf '%P\n')
if [ -n "$folders" ]; then (cd "$OUT" && tar czf folders.tgz $folders && rm -rf $folders); fi
# One archive a build cache: the two together (28 MB) were more than a file that comes back may be (16 MiB)
tar czf "$OUT/torch_ext.tgz" .torch_ext 2>/dev/null && du -h "$OUT/torch_ext.tgz" || true
tar czf "$OUT/triton_cache.tgz" .triton_cache 2>/dev/null && du -h "$OUT/triton_cache.tgz" || true
