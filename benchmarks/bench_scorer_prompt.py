"""Which prompt should the forward-pass scorer read P(yes) from, once stage 1 trained the judge to think first?

    .venv/bin/python benchmarks/bench_scorer_prompt.py runs/<preset>   # a run folder after notebook 03

Stage 1 trains with the reasoning prompt (``<think>..</think><answer>yes</answer>``), while ``scoring`` reads
P(yes) right after ``<answer>`` under the *no-reasoning* prompt (docs/CONTRACTS.md). This script prints the
filter's gold recall@2 and recall@k on the validation and test splits for the base model and the stage-1 adapter
under four prompt/prefill pairs, so the choice rests on a measurement, not on taste.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mmrag_lite import config, data, modeling, pipeline, prompts, scoring

T = prompts.DEFAULT_TAGS
VARIANTS = {  # name -> (reasoning prompt?, text appended after the assistant header)
    "no-reasoning prompt + <answer> (the scorer)": (False, T.open("answer")),
    "reasoning prompt + <answer>": (True, T.open("answer")),
    "reasoning prompt + <think></think><answer>": (True, T.open("think") + T.close("think") + T.open("answer")),
    "reasoning prompt + <think>\\n</think>\\n<answer>": (True, f"{T.open('think')}\n{T.close('think')}\n{T.open('answer')}"),
}


def score_rows(model, processor, rows, preset, reasoning: bool, prefill: str) -> scoring.Scored:
    """The scorer's own forward pass, with the prompt and prefill swapped."""
    pairs = [(r["question"], c) for r in rows for c in r["candidates"]]
    flat = iter(scoring._score_pairs(model, processor, pairs, preset, batch_size=scoring.DEFAULT_BATCH_SIZE,
                                     reasoning_prompt=reasoning, prefill=prefill))
    return {r["guid"]: [(c["id"], next(flat)) for c in r["candidates"]] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a run folder holding mini_webqa/ and stage1/adapter/")
    ap.add_argument("--preset", default="cpu-tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = config.get_preset(args.preset)
    ds = data.ensure_mini_webqa(preset, args.run)
    k = preset.stage1.k
    adapter = Path(args.run) / "stage1" / "adapter"
    if not adapter.is_dir():
        sys.exit(f"no stage-1 adapter in {adapter}: run notebook 03 (or `python -m mmrag_lite train-stage1`) first")
    # the weights the adapter was trained on, not whatever miniature this checkout builds today (a rebuilt warm-up
    # is another model: the adapter would be scored on weights it never saw)
    base_model = pipeline.adapter_base(adapter)
    if base_model is None:
        sys.exit(f"{adapter}/adapter_config.json records no base model")
    print(f"| split | weights | scorer prompt | recall@2 | recall@{k} | questions |\n|---|---|---|---|---|---|")
    for split in ("validation", "test"):
        rows = list(ds[split])[: preset.evaluation.questions]
        for who, path in (("base", None), ("stage 1", adapter)):
            model, processor = modeling.load_model_and_processor(preset, model_path=base_model, for_training=False,
                                                                 adapter_path=path)
            for name, (reasoning, prefill) in VARIANTS.items():
                report = {r["k"]: r for r in scoring.filter_report(score_rows(model, processor, rows, preset, reasoning, prefill), rows)}
                print(f"| {split} | {who} | {name} | {report[2]['recall']:.3f} | {report[k]['recall']:.3f} | {len(rows)} |", flush=True)


if __name__ == "__main__":
    main()
