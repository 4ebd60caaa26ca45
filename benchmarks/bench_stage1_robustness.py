"""Does cpu-tiny's stage-1 GRPO rise whichever warm model a machine builds? One run per (warm-up seed, learning rate).

    .venv/bin/python benchmarks/bench_stage1_robustness.py [--seeds 0 1 2] [--lrs 1e-2 5e-3]

A different CPU can round differently and so build a slightly different warm model; different warm-up seeds stand
in for that. Each run is the preset's stage 1 (50 steps x 32 completions, one thread) from one warm model; it prints
the mean reward and its components over the first and last 20 % of steps (``training.reward_trend``'s windows).
Warm models are cached under ``data/models/`` (about a minute each to build the first time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mmrag_lite import data, modeling, training
from mmrag_lite.config import get_preset


def trend(history: list[dict], key: str) -> str:
    first, last = training.reward_trend(history, key=key)
    return f"{first:.3f} -> {last:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 5e-3])
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = get_preset("cpu-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        ds = data.ensure_mini_webqa(base, Path(tmp) / "run")
        rows = training.build_stage1_dataset(ds["train"], base, seed=base.seed)
        for seed in args.seeds:
            folder = modeling.ensure_tiny_vlm(base, warm_settings=modeling.WarmUpSettings(seed=seed))
            for lr in args.lrs:
                preset = base.with_overrides(**{"stage1.grpo.learning_rate": lr})
                model, proc = modeling.load_model_and_processor(preset, model_path=folder, for_training=True)
                t0 = time.perf_counter()
                res = training.train_stage1(preset, rows, Path(tmp) / f"s{seed}-lr{lr:g}", model=model, processor=proc,
                                            verbose=False)
                h = res.log_history
                print(f"warm-up seed {seed}  lr {lr:g}: reward {trend(h, 'reward')}  format "
                      f"{trend(h, 'rewards/format/mean')}  relevance {trend(h, 'rewards/relevance/mean')}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
