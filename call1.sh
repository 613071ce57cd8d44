#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 150 python3 -m pytest tests/gpu/test_sampler_gpu.py -q -m gpu -p no:cacheprovider -rfE 2>&1 | tee $OUT/gpu-tests-sampler.txt | tail -15
timeout 90 python3 -m bench.sampler_profile --out $OUT 2>&1 | tail -25
timeout 150 python3 -m bench.dequant_pieces --out $OUT --piece-mb 32,16,8,4 2>&1 | tail -30
best=$(python3 - <<'PY'
import glob, json
d = json.load(open(glob.glob("$OUT".replace("$OUT", __import__("os").environ["OUT"]) + "/*dequant-pieces*.json")[0]))
r = d["ratios"]; print(r, file=__import__("sys").stderr)
pieces = {k: v for k, v in r.items() if k.startswith("pieces_")}
k = min(pieces, key=pieces.get)
print(k.split("_")[1][:-2] if pieces[k] < 0.95 * r["dequant_over_bf16_m128"] else 0)
PY
)
echo "best piece MB: $best"
LORAPLEX_DEQUANT_CHUNK_MB=$best timeout 200 python3 -m bench.kernels --out $OUT --models 8b,1b --rows 64,128,192,256 2>&1 | tail -12
tar czf $OUT/torch_ext.tgz .torch_ext
