"""Overhead of ``training.train_stage1`` over a bare TRL ``GRPOTrainer`` (same config, dataset, model, steps).

    .venv/bin/python benchmarks/bench_trainer_overhead.py [--steps 6] [--repeats 3] [--threads 1]

Both sides: a fresh cold miniature, the same ``GRPOConfig(**grpo_config_kwargs(...))``, the same reward functions
and LoRA config; timed from trainer construction to the end of ``train()`` (+ for ours: the adapter save and
log_history.json, i.e. everything the wrapper adds). Runs alternate (bare, bare-fp32, ours, ...) to spread noise.

Two baselines, because the wrapper changes one thing on purpose: TRL casts a 4-bit model's LoRA weights to bf16,
and ``build_trainer`` casts them back to float32 (``training.keep_trainable_in_float32``), which is also faster on a
CPU. "bare" is TRL as it comes; "bare, LoRA float32" makes the same cast and nothing else, so the wrapper's own
bookkeeping (callbacks, progress bar, adapter save, log file) is the gap between it and ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mmrag_lite import modeling, training
from mmrag_lite.config import get_preset


def rows(n: int = 16) -> list[dict]:
    from PIL import Image

    out = []
    for q in range(n):
        cands = []
        for j in range(6):
            if j % 2 == 0:
                cands.append({"id": f"{q}i{j}", "modality": "image", "title": f"place {q}-{j}", "text": "A red building.",
                              "image": Image.new("RGB", (60, 40), (200, 20 * j, 0)), "is_gold": j == 0})
            else:
                cands.append({"id": f"{q}t{j}", "modality": "text", "title": f"place {q}-{j}", "text": f"Built in {1900 + j}.",
                              "image": None, "is_gold": j == 1})
        out.append({"guid": f"q{q}", "question": f"What colour is place {q}?", "answer": "red", "keywords": "red",
                    "qcate": "color", "topic": "t", "candidates": cands, "gold_ids": [c["id"] for c in cands if c["is_gold"]]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("cpu-tiny", **{"stage1.grpo.save_steps": 1000})
    folder = modeling.ensure_tiny_vlm(preset, warm=False)
    ds = training.build_stage1_dataset(rows(), preset, seed=0)

    def bare(out: Path, lora_float32: bool = False) -> float:
        from trl import GRPOConfig, GRPOTrainer

        model, proc = modeling.load_model_and_processor(preset, model_path=folder, for_training=True)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        funcs, _ = training.reward_funcs_for(preset, 1)
        cfg = GRPOConfig(**training.grpo_config_kwargs(preset, 1, out / "stage1", max_steps=args.steps))
        trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=cfg, train_dataset=ds, processing_class=proc,
                              peft_config=modeling.lora_config(preset))
        if lora_float32:
            training.keep_trainable_in_float32(trainer.model)
        trainer.train()
        return time.perf_counter() - t0

    def ours(out: Path) -> float:
        model, proc = modeling.load_model_and_processor(preset, model_path=folder, for_training=True)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        training.train_stage1(preset, ds, out, max_steps=args.steps, model=model, processor=proc, verbose=False)
        return time.perf_counter() - t0

    runs = {"bare GRPOTrainer": bare, "bare, LoRA float32": lambda out: bare(out, lora_float32=True),
            "train_stage1": ours}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:  # untimed: the process's one-off first forward/backward and trainer setup
        bare(Path(tmp))
    order = list(runs.items())
    for repeat in range(args.repeats):  # the order rotates, so no side always runs first (or after the same one)
        for name, fn in order[repeat % len(order):] + order[: repeat % len(order)]:
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(fn(Path(tmp)))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"threads {args.threads}, {args.steps} steps x {preset.stage1.grpo.per_device_train_batch_size} completions, "
          f"repeats {args.repeats}")
    for name, t in times.items():
        print(f"{name:<19}: {median[name]:7.2f} s  {[f'{x:.2f}' for x in t]}")
    ours_s = median["train_stage1"]
    for base in ("bare GRPOTrainer", "bare, LoRA float32"):
        print(f"overhead vs {base:<19}: {100 * (ours_s - median[base]) / median[base]:+6.1f} %  (target <= 5 %)")


if __name__ == "__main__":
    main()
