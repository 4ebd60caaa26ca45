"""How long the GPU presets' prompts are on a REAL WebQA question, counted with the REAL Qwen2 vocabulary.

    .venv/bin/python benchmarks/real_prompt_lengths.py     # needs ../shared/data/webqa-val and the vocabulary cache

Every GPU figure so far rendered the synthetic world's text with the miniature's tokenizer, and the presets' prompt
budgets lean on two estimates (``config.PROMPT_TEXT_FIXED_TOKENS``, ``config.PROMPT_TEXT_TOKENS_PER_CANDIDATE``). Here
the one complete real WebQA training record in ``../shared/data/webqa-val`` (1 gold image, 16 distractor images, 16
distractor snippets) becomes a Mini-WebQA row per preset (``data.record_to_row``: the preset's candidate cap, the
default filters), is rendered by the course's own prompt code, and is counted by a Qwen2-VL processor holding the real
Qwen2 vocabulary (``check_real_qwen2_tokenizer.py`` fetches it) and the preset's pixel budget. WebQA's pixels are
not here: every image is the record's one real render, resized as the pipeline resizes (a fixed token count per image
whatever the picture). Printed per preset:

* the fixed text (system prompt, template, question) and each candidate's text, against the two estimates;
* stage-1 prompts (one per candidate, the scorer's prompt) and stage-2 prompts of the gold with k-1 random
  distractors (``--draws`` draws), against ``stage2.max_prompt_tokens``; and the every-candidate prompt with how many
  candidates ``pipeline.fit_prompt`` keeps.

One question is a spot check, not a distribution: it says whether the estimates are of the right size on real text.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import check_real_qwen2_tokenizer as vocab

from mmrag_lite import config, data, pipeline, prompts, scoring

SHARED = (config.shared_data_dir() or HERE.parent.parent / "shared" / "data") / "webqa-val"  # MMRAG_SHARED_DATA overrides


def real_processor(tokenizer, preset: config.Preset):
    """A Qwen2-VL processor with the real vocabulary (vision tokens added), the course's chat template and the
    preset's pixel budget."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from mmrag_lite import modeling

    image_processor = Qwen2VLImageProcessor(min_pixels=preset.model.min_pixels, max_pixels=preset.model.max_pixels)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=modeling.build_tiny_processor().chat_template)


def load_real_vocabulary(cache: Path):
    """The real Qwen2 tokenizer with Qwen2-VL's vision tokens added."""
    vocab.ensure_gguf(cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vocab.fetch(cache)), gguf_file=vocab.GGUF)
    tok.add_special_tokens({"additional_special_tokens": vocab.VISION_TOKENS})
    return tok


def stats(values: list[int]) -> dict:
    return {"mean": round(statistics.mean(values), 1), "max": max(values), "min": min(values)}


def measure(preset: config.Preset, record, render, processor, draws: int, seed: int) -> dict:
    row = data.record_to_row(record, None, max_candidates=preset.data.max_candidates)
    for c in row["candidates"]:
        if c["modality"] == "image":
            c["image"] = render
    per_image = config.image_tokens(preset.model)
    resize = pipeline.image_fn(preset)

    def length(candidates: list[dict]) -> int:  # a stage-2 prompt as the pipeline renders and counts it
        return pipeline.prompt_length(processor, pipeline.build_request(
            row, candidates, reasoning=preset.stage2.reasoning, image_fn=resize))

    fixed = length([])  # system prompt, template and question
    text_tokens = {"image": [], "text": []}
    for cand in row["candidates"]:  # one candidate's own text: what it adds besides its image's tokens
        image = per_image if cand["modality"] == "image" else 0
        text_tokens[cand["modality"]].append(length([cand]) - fixed - image)

    stage1 = []
    for cand in row["candidates"]:
        text = processor.apply_chat_template(prompts.stage1_messages(row["question"], cand, reasoning=False),
                                             add_generation_prompt=True, tokenize=False) + scoring.answer_prefix()
        images = [resize(im) for im in prompts.stage1_images(cand)]
        stage1.append(len(processor(text=[text], images=[images] if images else None)["input_ids"][0]))

    rng = random.Random(seed)
    gold = [c for c in row["candidates"] if c["is_gold"]]
    distractors = [c for c in row["candidates"] if not c["is_gold"]]
    k = preset.stage1.k
    limit = preset.stage2.max_prompt_tokens
    topk = []
    for _ in range(draws):
        chosen = gold + rng.sample(distractors, k - len(gold))
        rng.shuffle(chosen)
        topk.append(length(chosen))
    everything = pipeline.fit_prompt(row, row["candidates"], processor, reasoning=preset.stage2.reasoning,
                                     max_tokens=limit, image_fn=resize)
    answering = pipeline.fit_prompt(row, row["candidates"], processor, reasoning=preset.stage2.reasoning,
                                    max_tokens=preset.answer_prompt_tokens, image_fn=resize)
    whole = length(row["candidates"])
    return {
        "preset": preset.name, "candidates": len(row["candidates"]),
        "images": sum(c["modality"] == "image" for c in row["candidates"]), "tokens_per_image": per_image,
        "fixed_text_tokens": fixed, "fixed_text_estimate": config.PROMPT_TEXT_FIXED_TOKENS,
        "candidate_text_tokens": {kind: stats(v) for kind, v in text_tokens.items() if v},
        "candidate_text_estimate": config.PROMPT_TEXT_TOKENS_PER_CANDIDATE,
        "stage1_prompt_tokens": stats(stage1),
        "k": k, "max_prompt_tokens": limit, "draws": draws, "stage2_topk_prompt_tokens": stats(topk),
        "stage2_topk_over_cap": sum(t > limit for t in topk),
        "budget_check_needs": config.stage2_prompt_tokens_needed(preset),
        "every_candidate_prompt_tokens": whole, "every_candidate_kept_by_fit_prompt": len(everything.source_ids),
        "answer_prompt_tokens": preset.answer_prompt_tokens,
        "every_candidate_kept_when_answering": len(answering.source_ids),  # what notebook 05's zero-shot row shows
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=vocab.default_cache(), help="the real vocabulary's cache folder")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder with train_record_*.json and the image render")
    ap.add_argument("--draws", type=int, default=200, help="random top-k pools (the gold + k-1 distractors) per preset")
    ap.add_argument("--out", type=Path, help="also write the reports here as JSON")
    args = ap.parse_args(argv)
    records = sorted(args.shared.glob("train_record_*.json"))
    renders = sorted(args.shared.glob("train_image_*_render.png"))
    if not records or not renders:
        raise SystemExit(f"no real WebQA record and render in {args.shared} (../shared/data/webqa-val): nothing to count")
    from PIL import Image

    (record,) = list(data.iter_webqa(records[0]))
    render = Image.open(renders[0]).convert("RGB")
    tokenizer = load_real_vocabulary(args.cache)
    reports = []
    for preset in config.PRESETS.values():
        if preset.model.is_miniature:
            continue
        report = measure(preset, record, render, real_processor(tokenizer, preset), args.draws, seed=0)
        print(json.dumps(report), flush=True)
        reports.append(report)
    if args.out:
        args.out.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")
    return reports


if __name__ == "__main__":
    main()
