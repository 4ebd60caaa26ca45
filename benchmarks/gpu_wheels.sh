#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (or holds at another version), for the GPU benchmarks (bench_gpu_preset.py, bench_gpu_inference.py).
# Run here, in the repo root; they land in .whl/ (git-ignored) and travel with the working tree when a device
# call names .whl in `carry` (about 23 MB of the 64 MiB a call may carry; the repo itself is under 1 MB).
# The image's Python is 3.12; versions are the ones this course tests (read from the lock, .ci/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  $(grep -E '^(bitsandbytes|trl|peft|transformers|datasets|dill|multiprocess)==' .ci/constraints.txt)
# bitsandbytes ships a library per CUDA / ROCm / XPU version (43 MB); the GPU image's torch is CUDA 13, so keep the CPU
# and CUDA 13.x libraries alone (7 MB; RECORD rewritten to match). What a call carries is capped at 64 MiB.
python3 - <<'PY'
import glob, os, re, zipfile
(src,) = glob.glob(".whl/bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".slim", "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.fullmatch(item.filename):
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not drop.match(l.decode().split(",")[0]))
        zout.writestr(item, data)
os.replace(src + ".slim", src)
PY
du -ch .whl/*.whl | tail -1
# Then, on the device (one call, carry [".whl"]): bash benchmarks/gpu_session.sh
# (it installs these with the device README's line and runs benchmarks/bench_gpu_preset.py for several presets)
