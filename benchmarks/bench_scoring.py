"""Stage-1 judging: P(yes) from one forward pass vs generate-and-parse, same model, same candidates.

    .venv/bin/python benchmarks/bench_scoring.py [--preset cpu-tiny] [--candidates 64] [--repeats 3]

The generate-and-parse judge is timed at the completion budgets stage 1 really trains with: cpu-tiny's (16 tokens,
``<think></think><answer>yes</answer>`` and little else) and colab-t4's (128 tokens of ``<think>..</think>`` first),
with ``min_new_tokens`` = budget so the miniature writes as much as a judge with that budget would.
Uses the cold miniature (no warm-up needed: timing does not depend on what the weights know).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image

from mmrag_lite import modeling, scoring
from mmrag_lite.config import get_preset


def candidates(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            out.append({"id": f"t{i}", "modality": "text", "title": f"place {i}", "text": f"The place {i} was built in {1900 + i}.",
                        "image": None, "is_gold": i == 1})
        else:
            out.append({"id": f"i{i}", "modality": "image", "title": f"place {i}", "text": "A photo of a red building.",
                        "image": Image.new("RGB", (80, 60), (200, 10 * (i % 20), 0)), "is_gold": False})
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up call (allocations, lazy inits)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=scoring.DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared 2-core box (2 threads under contention ran ~30x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    folder = modeling.ensure_tiny_vlm(preset, warm=False) if preset.model.is_miniature else None
    model, proc = modeling.load_model_and_processor(preset, model_path=folder, for_training=False)
    cands = candidates(args.candidates)
    q = "What color is place 3?"
    fwd = timed(lambda: scoring.score_candidates(model, proc, q, cands, preset, batch_size=args.batch_size), args.repeats)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}, "
          f"{args.candidates} candidates, batch {args.batch_size}")
    print(f"forward-pass P(yes):                 {fwd:8.3f} s  ({1000 * fwd / len(cands):.1f} ms/candidate)")
    budgets = [(f"{name} stage-1 budget", p.stage1.grpo.max_completion_length, p.stage1.reasoning)
               for name, p in ((preset.name, preset), ("colab-t4", get_preset("colab-t4")))]
    orig_generate = model.generate
    for label, tokens, reasoning in budgets:
        model.generate = lambda *a, _t=tokens, **kw: orig_generate(*a, min_new_tokens=_t, **kw)  # judge uses its budget
        gen = timed(lambda: scoring.judge_by_generation(model, proc, q, cands, preset, batch_size=args.batch_size,
                                                        max_new_tokens=tokens, reasoning=reasoning), args.repeats)  # noqa: B023
        print(f"generate+parse, {label:32s} {tokens:4d} tokens: {gen:8.3f} s  -> forward pass is {gen / fwd:5.1f}x faster")
    model.generate = orig_generate


if __name__ == "__main__":
    main()
