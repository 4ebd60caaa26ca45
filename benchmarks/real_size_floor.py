"""The GPU presets' models at real size, counted on the CPU: parameters, 4-bit share, LoRA, and the memory floor.

    .venv/bin/python benchmarks/real_size_floor.py

Builds each GPU preset's model from its published config on the ``meta`` device (no weights, no download, no GPU),
swaps its Linear layers for 4-bit ones by transformers' own rule, and prices weights + LoRA + AdamW on the QLoRA
training path (``mmrag_lite.modeling.architectures``). These figures are *counted*, not measured: activations,
logits, generation's KV cache and the CUDA allocator come on top and need a GPU to measure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmrag_lite.config import PRESETS
from mmrag_lite.modeling import architectures


def main() -> None:
    rows = []
    for preset in PRESETS.values():
        if preset.model.is_miniature:
            continue
        t0 = time.perf_counter()
        floor = architectures.memory_floor(preset)
        rows.append((floor, time.perf_counter() - t0))
    header = ["preset", "model", "parameters", "vision", "in 4-bit", "float32", "LoRA modules", "LoRA params",
              "weights GiB", "LoRA+AdamW GiB", "floor GiB", "preset estimate GiB", "counted in"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for f, seconds in rows:
        cells = [f.preset, f"`{f.model_id}`", f"{f.parameters / 1e9:.3f} B", f"{f.vision_parameters / 1e9:.3f} B",
                 f"{f.quantized_parameters / 1e9:.3f} B", f"{f.full_precision_parameters / 1e6:.1f} M",
                 str(f.lora_modules), f"{f.lora_parameters / 1e6:.2f} M", f"{f.weights_gb:.2f}",
                 f"{f.lora_and_optimizer_gb:.2f}", f"**{f.floor_gb:.2f}**", f"{f.expected_memory_gb:g}",
                 f"{seconds:.1f} s"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
