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

from mmrag_lite import config, data, modeling, prompts, scoring

T = prompts.DEFAULT_TAGS
VARIANTS = {  # name -> (reasoning prompt?, text appended after the assistant header)
    "no-reasoning prompt + <answer> (the scorer)": (False, T.open("answer")),
    "reasoning prompt + <answer>": (True, T.open("answer")),
    "reasoning prompt + <think></think><answer>": (True, T.open("think") + T.close("think") + T.open("answer")),
    "reasoning prompt + <think>\\n</think>\\n<answer>": (True, f"{T.open('think')}\n{T.close('think')}\n{T.open('answer')}"),
}


def score_rows(model, processor, rows, preset, reasoning: bool, prefill: str) -> scoring.Scored:
    """``scoring._score_pairs`` with the prompt and prefill swapped: one forward pass per question's pool."""
    yes_id, no_id = scoring.yes_no_token_ids(processor)
    out: scoring.Scored = {}
    model.eval()
    with torch.inference_mode(), scoring._left_padding(processor):
        for r in rows:
            texts = [processor.apply_chat_template(prompts.stage1_messages(r["question"], c, reasoning=reasoning),
                                                   add_generation_prompt=True, tokenize=False) + prefill for c in r["candidates"]]
            images = [scoring._prepare_images(prompts.stage1_images(c), preset) for c in r["candidates"]]
            logits = model(**scoring._encode(processor, texts, images), logits_to_keep=1).logits[:, -1, :].float()
            p_yes = torch.softmax(torch.stack([logits[:, yes_id], logits[:, no_id]], -1), -1)[:, 0].tolist()
            out[r["guid"]] = [(c["id"], p) for c, p in zip(r["candidates"], p_yes)]
    return out


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
    print(f"| split | weights | scorer prompt | recall@2 | recall@{k} | questions |\n|---|---|---|---|---|---|")
    for split in ("validation", "test"):
        rows = list(ds[split])[: preset.evaluation.questions]
        for who, path in (("base", None), ("stage 1", adapter)):
            model, processor = modeling.load_model_and_processor(preset, for_training=False, adapter_path=path)
            for name, (reasoning, prefill) in VARIANTS.items():
                report = {r["k"]: r for r in scoring.filter_report(score_rows(model, processor, rows, preset, reasoning, prefill), rows)}
                print(f"| {split} | {who} | {name} | {report[2]['recall']:.3f} | {report[k]['recall']:.3f} | {len(rows)} |", flush=True)


if __name__ == "__main__":
    main()
