"""Does cpu-tiny's stage-2 GRPO rise whatever GRPO samples? One run per (variant, training seed), same warm model.

    .venv/bin/python benchmarks/bench_stage2_robustness.py [--run runs/course-*/work] [--seeds 0 1 2 3 4]
        [--variant "NAME: key=value key=value" ...]

A 20-step stage-2 curve of the miniature is a sample: GRPO's sampling and the candidate permutations change with
the preset's seed while the warm model stays fixed (the course's own unless ``--warm-seed`` says otherwise). Every
run reads one finished course run's Mini-WebQA train split and stage-1 train scores (``make course`` writes them),
so each variant sees the same pools.
Each variant is dotted preset overrides (``stage2.grpo.max_steps=40``); the default compares the preset alone.
It prints the mean reward and its components over the first and last 20 % of steps (``training.reward_trend``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from mmrag_lite import data, modeling, scoring, training
from mmrag_lite.cli import parse_override
from mmrag_lite.config import get_preset


def has_stage1_scores(work_dir: Path) -> bool:
    return scoring.scores_path(work_dir, "train").is_file()


def newest_course_run() -> Path | None:
    runs = sorted(p for p in (ROOT / "runs").glob("course-*/work") if has_stage1_scores(p))
    return runs[-1] if runs else None


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, sets = text.partition(":")
    return name.strip(), dict(parse_override(s) for s in sets.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a finished course run's work folder (default: newest)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--warm-seed", type=int, default=0,
                    help="the miniature's warm-up seed (0: the course's; others stand in for another CPU's rounding)")
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME: key=value ...'")
    args = ap.parse_args()
    run = args.run or newest_course_run()
    if run is None or not has_stage1_scores(run):
        sys.exit("no finished course run with stage-1 scores: run `make course` first, or pass --run <work folder>")
    variants = [parse_variant(v) for v in args.variant] or [("the preset", {})]
    torch.set_num_threads(1)
    base = get_preset("cpu-tiny")
    # one warm model for every run, whatever seed the run trains with (built once, ~1.5 min, when not cached)
    warm = modeling.ensure_tiny_vlm(base, warm_settings=modeling.WarmUpSettings(seed=args.warm_seed))
    train_split = data.ensure_mini_webqa(base, run)["train"]
    print(f"course run {run}; warm model {warm.name} (warm-up seed {args.warm_seed}); one thread", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants:
            for seed in args.seeds:
                preset = base.with_overrides(seed=seed, **overrides)
                model, proc = modeling.load_model_and_processor(preset, model_path=warm, for_training=True)
                rows, _ = training.stage2_dataset_for_run(preset, run, train_split, processor=proc, verbose=False)
                t0 = time.perf_counter()
                res = training.train_stage2(preset, rows, Path(tmp) / f"{name}-{seed}", model=model, processor=proc,
                                            verbose=False)
                first, last = res.first_reward, res.last_reward
                parts = "  ".join(f"{k} {a:.2f}->{b:.2f}"
                                  for k, (a, b) in training.component_trends(res.log_history).items() if k != "total")
                cut = training.reward_trend(res.log_history, key="completions/clipped_ratio")
                cut_text = f"  cut off {cut[0]:.2f}->{cut[1]:.2f}" if cut[0] is not None else ""
                print(f"{name:<16} seed {seed}: reward {first:.3f} -> {last:.3f} ({last - first:+.3f})  {parts}"
                      f"{cut_text}  ({res.global_step} steps, {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
