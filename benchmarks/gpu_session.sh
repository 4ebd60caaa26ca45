#!/usr/bin/env bash
# One device call's worth of GPU measurements (run on the lent machine, repo root, after `bash benchmarks/gpu_wheels.sh`
# here and with carry [".whl"]). Each bench has its own time limit and writes its JSON and log to $OUT as it goes, so
# one failure or a short budget still returns the others. Usage there: bash benchmarks/gpu_session.sh [run names, e.g. l4-stage1 l4-stage2]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers, trl, peft, bitsandbytes; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, bitsandbytes.__version__)'
} 2>&1 | tee "$OUT/versions.txt"
bench() {  # name, seconds allowed, bench arguments...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" python3 benchmarks/bench_gpu_preset.py "$@" --world-questions 400 --out "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? $(date +%T)"
  grep -E '"(seconds_per_step|peak_allocated_gib|peak_reserved_gib|prompt_tokens_max|images_per_prompt_max)"|Error' "$OUT/$name.log" | tail -7
}
# name -> seconds allowed and the bench's arguments; run the names given (default: the first three, one call's worth)
declare -A RUNS=(
  [colab-t4-stage1]="160 --preset colab-t4 --steps 4"
  [colab-t4-stage2]="140 --preset colab-t4 --stage 2 --steps 2"
  [a100-stage2]="270 --preset a100 --stage 2 --steps 2"
  [l4-stage1]="120 --preset l4 --steps 3"
  [l4-stage2]="150 --preset l4 --stage 2 --steps 2"
  [a100-stage1]="110 --preset a100 --steps 2"
  # stage 2 with every prompt filled to the preset's stage2.max_prompt_tokens: the longest prompt a preset admits
  [colab-t4-stage2-cap]="170 --preset colab-t4 --stage 2 --steps 2 --fill-to-cap"
  [l4-stage2-cap]="160 --preset l4 --stage 2 --steps 2 --fill-to-cap"
  [a100-stage2-cap]="270 --preset a100 --stage 2 --steps 2 --fill-to-cap"
  [a100-stage2-cap-8img]="270 --preset a100 --stage 2 --steps 2 --fill-to-cap --images-first"
)
names=("$@"); (( ${#names[@]} )) || names=(colab-t4-stage1 colab-t4-stage2 a100-stage2)
for n in "${names[@]}"; do
  [[ -n "${RUNS[$n]:-}" ]] || { echo "unknown run $n; known: ${!RUNS[*]}"; exit 2; }
  bench "$n" ${RUNS[$n]}
done
