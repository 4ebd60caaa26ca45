"""Does cpu-tiny's stage-1 GRPO rise whichever warm model a machine builds, and does the filter get better?

    .venv/bin/python benchmarks/bench_stage1_robustness.py [--seeds 0 1 2] [--lrs 1e-2 5e-3] [--grpo-seeds 0 1]
                                                           [--set stage1.reasoning=false ...]

A different CPU can round differently and so build a slightly different warm model; different warm-up seeds stand
in for that, and ``--grpo-seeds`` changes only GRPO's own sampling. Each run is the preset's stage 1 (50 steps x 32
completions, one thread) from one warm model, with ``--set`` overrides as on the CLI; it prints the mean reward and
its components over the first and last 20 % of steps (``training.reward_trend``'s windows) and the held-out
validation recall@k of the filter (the preset's k) before and after: the sampled reward is not the ranking.
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

from mmrag_lite import data, modeling, scoring, training
from mmrag_lite.cli import parse_override
from mmrag_lite.config import get_preset


def trend(history: list[dict], key: str) -> str:
    first, last = training.reward_trend(history, key=key)
    return f"{first:.3f} -> {last:.3f}"


def recall_at_k(model, processor, split, preset) -> float:
    report = scoring.filter_report(scoring.score_split(model, processor, split, preset, progress=False), split)
    return next(r["recall"] for r in report if r["k"] == preset.stage1.k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="warm-up seeds (0: the course's model)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 5e-3])
    ap.add_argument("--grpo-seeds", type=int, nargs="+", default=None, help="GRPO seeds (default: the preset's)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="dotted preset override")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = get_preset("cpu-tiny", **dict(parse_override(s) for s in args.set))
    with tempfile.TemporaryDirectory() as tmp:
        ds = data.ensure_mini_webqa(base, Path(tmp) / "run")
        val = ds["validation"].select(range(min(len(ds["validation"]), base.evaluation.questions)))
        rows = training.build_stage1_dataset(ds["train"], base, seed=base.seed)
        k = base.stage1.k
        for seed in args.seeds:
            folder = modeling.ensure_tiny_vlm(base, warm_settings=modeling.WarmUpSettings(seed=seed))
            warm, proc = modeling.load_model_and_processor(base, model_path=folder, for_training=False)
            print(f"warm-up seed {seed}: validation recall@{k} {recall_at_k(warm, proc, val, base):.3f}", flush=True)
            for lr in args.lrs:
                for grpo_seed in args.grpo_seeds or [base.seed]:
                    preset = base.with_overrides(**{"stage1.grpo.learning_rate": lr, "seed": grpo_seed})
                    model, proc = modeling.load_model_and_processor(preset, model_path=folder, for_training=True)
                    t0 = time.perf_counter()
                    res = training.train_stage1(preset, rows, Path(tmp) / f"s{seed}-lr{lr:g}-g{grpo_seed}", model=model,
                                                processor=proc, verbose=False)
                    h = res.log_history
                    print(f"warm-up seed {seed}  lr {lr:g}  GRPO seed {grpo_seed}: reward {trend(h, 'reward')}  "
                          f"format {trend(h, 'rewards/format/mean')}  relevance {trend(h, 'rewards/relevance/mean')}  "
                          f"validation recall@{k} {recall_at_k(res.model, proc, val, preset):.3f}  "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
