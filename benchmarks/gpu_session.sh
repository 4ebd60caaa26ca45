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
bench() {  # name, seconds allowed, script (train: bench_gpu_preset.py, infer: bench_gpu_inference.py), its arguments...
  local name=$1 limit=$2 script=benchmarks/bench_gpu_preset.py; shift 2
  [[ $1 == infer ]] && script=benchmarks/bench_gpu_inference.py; shift
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" python3 "$script" "$@" --world-questions 400 --out "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? $(date +%T)"
  grep -E '"(seconds_per_step|seconds_per_question|ms_per_candidate|peak_allocated_gib|peak_reserved_gib|prompt_tokens_max|images_per_prompt_max)"|Error|^PHASE' "$OUT/$name.log" | tail -9
}
# name -> seconds allowed, script and its arguments; run the names given (default: the first three, one call's worth)
declare -A RUNS=(
  [colab-t4-stage1]="160 train --preset colab-t4 --steps 4"
  [colab-t4-stage2]="140 train --preset colab-t4 --stage 2 --steps 2"
  [a100-stage2]="270 train --preset a100 --stage 2 --steps 2"
  [l4-stage1]="120 train --preset l4 --steps 3"
  [l4-stage2]="150 train --preset l4 --stage 2 --steps 2"
  [a100-stage1]="110 train --preset a100 --steps 2"
  # stage 2 with every prompt filled to the preset's stage2.max_prompt_tokens: the longest prompt a preset admits
  [colab-t4-stage2-cap]="170 train --preset colab-t4 --stage 2 --steps 2 --fill-to-cap"
  [l4-stage2-cap]="160 train --preset l4 --stage 2 --steps 2 --fill-to-cap"
  [a100-stage2-cap]="270 train --preset a100 --stage 2 --steps 2 --fill-to-cap"
  [a100-stage2-cap-8img]="270 train --preset a100 --stage 2 --steps 2 --fill-to-cap --images-first"
  # notebook 05's side: stage-1 scoring, the generating judge, stage-2 answers at two generate batch sizes
  [colab-t4-infer]="280 infer --preset colab-t4 --questions 32 --generate-batches 8 32"
  [a100-infer]="270 infer --preset a100 --questions 16 --generate-batches 8 16"  # ran past 270 s on an H100
  [colab-t4-infer-16]="80 infer --preset colab-t4 --questions 16 --judge-questions 1 --generate-batches 16"
  [a100-infer-short]="190 infer --preset a100 --questions 8 --judge-questions 1 --generate-batches 8"
  # notebook 05's ModelBank (one base, stage-1 and stage-2 LoRA): the adapters off and on; the every-candidate calls at the token cap
  [colab-t4-infer-lora]="330 infer --preset colab-t4 --questions 32 --judge-questions 1 --generate-batches 8 32 --adapters"
  [colab-t4-infer-lora-cap]="200 infer --preset colab-t4 --questions 16 --judge-questions 1 --adapters --systems all"
  # the 3B's generate call at 32 top-k prompts (a100-infer-short measured 8)
  [a100-infer-b32]="230 infer --preset a100 --questions 32 --judge-questions 1 --generate-batches 32 --systems top-k"
  # notebook 05's ModelBank on the 3B: its adapter cost, and every candidate at a100's 65,536-token cap (21 prompts a call)
  [a100-infer-lora-cap]="400 infer --preset a100 --questions 21 --judge-questions 1 --generate-batches 21 --adapters"
  # l4's every-candidate prompts under its answering prompt cap (evaluation.max_prompt_tokens, 5,120): past stage 2's 2,048
  [l4-infer-lora-answer-cap]="240 infer --preset l4 --questions 16 --judge-questions 1 --adapters --systems all"
)
names=("$@"); (( ${#names[@]} )) || names=(colab-t4-stage1 colab-t4-stage2 a100-stage2)
for n in "${names[@]}"; do
  [[ -n "${RUNS[$n]:-}" ]] || { echo "unknown run $n; known: ${!RUNS[*]}"; exit 2; }
  bench "$n" ${RUNS[$n]}
done
