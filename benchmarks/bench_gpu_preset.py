"""Peak GPU memory and seconds per step of a GPU preset's stage-1 (or stage-2) GRPO, on its real-size architecture.

    python benchmarks/bench_gpu_preset.py --preset colab-t4 --steps 3 --out results.json   # on a CUDA machine
    python benchmarks/bench_gpu_preset.py --preset colab-t4 --stage 2 --steps 3            # stage 2: k candidates
    python benchmarks/bench_gpu_preset.py --preset colab-t4 --stage 2 --fill-to-cap        # stage 2, prompts at the cap
    python benchmarks/bench_gpu_preset.py --preset a100 --stage 2 --images-first --fill-to-cap  # ... with k images
    .venv/bin/python benchmarks/bench_gpu_preset.py --smoke                                 # CPU: the plumbing only
    bash benchmarks/gpu_session.sh     # on the lent GPU: several presets in one call (--world-questions 400)

The model is the preset's architecture at full size with RANDOM weights and the miniature's tokenizer
(``modeling.architectures.build_random_real_size_model``), so nothing is downloaded; shapes, not weight values, set
memory and time. It goes through the course's own path: ``load_model_and_processor`` (NF4 + double quantisation,
``prepare_model_for_kbit_training``, gradient checkpointing), the preset's synthetic Mini-WebQA at its image size,
``training.build_stage1_dataset`` and ``training.train_stage1`` (TRL ``GRPOTrainer`` + LoRA); with ``--stage 2``,
``training.build_stage2_dataset`` (gold + distractors up to the preset's k, every image at the preset's size, the
preset's prompt cap) and ``training.train_stage2`` from a fresh LoRA of the same size as stage 1's. Random weights
rarely emit an end token, so every completion runs to ``max_completion_length``: the slow end of a real step.
``--fill-to-cap`` (stage 2) lengthens every prompt with filler words before its question until it is as long as the
preset's ``stage2.max_prompt_tokens`` allows (the synthetic world's snippets are short, so its prompts never reach the
cap by themselves): the worst prompt length a preset admits, at the images the pool brought. ``--images-first``
(stage 2) shows each question's image candidates before its snippets (gold first), so prompts carry as many images as
the pool has, up to k.

Reported: seconds per optimizer step (median of the steps after the first, which pays for warm-up), CUDA peak
allocated / reserved memory of the training steps (as ``training.CudaMemoryCallback`` logs them), and the counted
floor (``architectures.memory_floor``) beside them. ``--smoke`` runs one step of a shrunken copy of the architecture
on the CPU under ``cpu-tiny`` settings, to check the script itself (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import TrainerCallback

from mmrag_lite import config, data, modeling, training
from mmrag_lite.modeling import architectures


def smoke_fields(architecture: str) -> tuple[dict, dict]:
    """--smoke: the published architecture at the miniature's size (widths bitsandbytes' CPU 4-bit kernel accepts);
    the published fields it does not set (tied embeddings, rope theta, ...) stay."""
    settings = modeling.TinyVLMSettings(architecture=architecture)
    tokenizer = modeling.build_tiny_processor(settings).tokenizer
    text, vision = modeling.miniature_config_fields(settings, vocab_size=len(tokenizer),
                                                    token_ids=modeling.special_token_ids(tokenizer))
    text.pop("tie_word_embeddings")
    return text, vision


FILLER_WORDS = ("the", "document", "describes", "a", "scene", "with", "several", "objects", "and", "their", "colours",
                "shapes", "and", "counts")


def _with_filler(prompt: list[dict], words: int) -> list[dict]:
    """A copy of a stage-2 prompt with ``words`` filler words in a text part just before its question."""
    messages = [{**m, "content": list(m["content"])} for m in prompt]
    text = " ".join(FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(words))
    messages[-1]["content"].insert(len(messages[-1]["content"]) - 1, {"type": "text", "text": text + "\n"})
    return messages


def _filled_to_cap(row: dict, processor, cap: int) -> tuple[list[dict], int]:
    """The row's prompt with as many filler words as keep it within ``cap`` tokens (bisection on the word count,
    measured with the course's own ``prompt_token_count``), and its length."""
    def length(words: int) -> int:
        return modeling.prompt_token_count(processor, _with_filler(row["prompt"], words), row["images"])

    low, high = 0, cap  # every word is at least one token, so ``cap`` words are always too many
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if length(mid) <= cap else (low, mid)
    return _with_filler(row["prompt"], low), length(low)


def fill_prompts_to_cap(rows, processor, cap: int):
    """Stage-2 rows whose prompts each reach (just under) ``cap`` tokens, and their lengths."""
    from datasets import Dataset

    filled, lengths = [], []
    for row in (rows[i] for i in range(len(rows))):
        prompt, n = _filled_to_cap(row, processor, cap)
        filled.append({**row, "prompt": prompt})
        lengths.append(n)
    return Dataset.from_list(filled, features=rows.features), lengths


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronised, so queued kernels are counted in their own step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._t0)


def _logged_peak(log_history: list[dict], key: str) -> float | None:
    """The largest per-step CUDA peak that ``training.CudaMemoryCallback`` logged (None off CUDA)."""
    values = [e[key] for e in log_history if isinstance(e.get(key), (int, float))]
    return max(values) if values else None


def images_first(split, k: int) -> dict[str, list[str]]:
    """Stage-2 pools (``kept_ids`` for ``build_stage2_dataset``) that show image candidates first, gold before
    distractors, then snippets: up to k images a prompt, the most the preset's pool admits."""
    def rank(c: dict) -> tuple[bool, bool]:
        return c.get("image") is None, not c["is_gold"]

    return {row["guid"]: [c["id"] for c in sorted(row["candidates"], key=rank)][:k] for row in split}


def bench_target(preset_name: str, smoke: bool) -> tuple[config.Preset, config.Preset, dict | None, dict | None, str, torch.dtype]:
    """(GPU preset, preset to run, text / vision overrides, device, dtype): on CUDA the GPU preset at full size; with
    ``smoke``, cpu-tiny's sizes and device with the GPU preset's architecture shrunk."""
    gpu_preset = config.get_preset(preset_name)
    if smoke:
        arch = architectures.PUBLISHED_CONFIGS[gpu_preset.model.model_id]["architecture"]
        return gpu_preset, config.get_preset("cpu-tiny"), *smoke_fields(arch), "cpu", torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --smoke to check the script on a CPU")
    return gpu_preset, gpu_preset, None, None, "cuda", modeling.torch_dtype(gpu_preset.model.compute_dtype)


def print_and_save(report: dict, out: Path | None) -> dict:
    """Print the report as JSON and, with ``out``, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    return report


def run(preset_name: str, steps: int, work: Path, smoke: bool, stage: int = 1, world_questions: int | None = None,
        fill_to_cap: bool = False, prefer_images: bool = False) -> dict:
    gpu_preset, preset, text, vision, device, dtype = bench_target(preset_name, smoke)
    model_id = gpu_preset.model.model_id
    settings = preset.stage1 if stage == 1 else preset.stage2
    grpo = settings.grpo
    per_step = grpo.per_device_train_batch_size * grpo.gradient_accumulation_steps
    preset = preset.with_overrides(**{f"stage{stage}.grpo.max_steps": steps, f"stage{stage}.grpo.save_steps": steps + 1,
                                      f"stage{stage}.max_examples": max(2 * steps * per_step // grpo.num_generations, 16)})
    if world_questions:  # a smaller world builds faster; a step's cost depends on the preset's sizes, not on it
        preset = preset.with_overrides(**{"data.world_questions": world_questions})
    answer_reward = "on"
    if stage == 2 and preset.stage2.weights.get("answer"):
        try:  # the answer reward lemmatises with spaCy; its wheels (~70 MB) are more than a device call may carry
            from mmrag_lite import metrics

            metrics.get_nlp()
        except (ImportError, RuntimeError) as exc:
            answer_reward = f"off: spaCy cannot load here ({str(exc).splitlines()[0][:120]}); its CPU cost is not in these figures"
            print(f"NOTE: the answer reward is {answer_reward}", flush=True)
            preset = preset.with_overrides(**{"stage2.weights": {k: v for k, v in preset.stage2.weights.items() if k != "answer"}})

    t0 = time.perf_counter()
    folder = architectures.build_random_real_size_model(model_id, work / "model", dtype=dtype, device=device,
                                                        text=text, vision=vision)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, processor = modeling.load_model_and_processor(preset, model_path=folder, for_training=True)
    loaded = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 1024**3 if device == "cuda" else None

    t0 = time.perf_counter()
    ds = data.ensure_mini_webqa(preset, work / "run")
    build_report = None
    if stage == 1:
        rows = training.build_stage1_dataset(ds["train"], preset)
    else:
        kept = images_first(ds["train"], preset.stage1.k) if prefer_images else None
        rows, build_report = training.build_stage2_dataset(ds["train"], preset, processor=processor, kept_ids=kept)
        if fill_to_cap:
            rows, lengths = fill_prompts_to_cap(rows, processor, preset.stage2.max_prompt_tokens)
            build_report.prompt_tokens_max, build_report.prompt_tokens_mean = max(lengths), sum(lengths) / len(lengths)
    prepared = time.perf_counter() - t0

    clock = StepClock()
    train = training.train_stage1 if stage == 1 else training.train_stage2
    result = train(preset, rows, work / "run", model=model, processor=processor, callbacks=[clock], verbose=False)
    after_first = clock.seconds[1:] or clock.seconds
    floor = architectures.memory_floor(gpu_preset)
    report = {
        "preset": gpu_preset.name, "model": model_id, "smoke": smoke, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "weights": "random (shapes as published; tiny tokenizer)", "compute_dtype": preset.model.compute_dtype,
        "quantized_4bit": bool(getattr(model, "mmrag_quantized", False)), "stage": stage, "steps": result.global_step,
        "completions_per_step": per_step, "max_completion_length": grpo.max_completion_length,
        "image_size": preset.model.image_size, "world_questions": preset.data.world_questions, "rows": len(rows),
        "prompt_tokens_max": build_report.prompt_tokens_max if build_report else None,
        "prompt_tokens_mean": round(build_report.prompt_tokens_mean, 1) if build_report else None,
        "filled_to_cap": fill_to_cap, "prompt_cap": preset.stage2.max_prompt_tokens if stage == 2 else None,
        "images_first": prefer_images, "answer_reward": answer_reward if stage == 2 else None,
        "images_per_prompt_mean": round(statistics.mean(len(r) for r in rows["images"]), 2) if stage == 2 else None,
        "images_per_prompt_max": build_report.images_per_prompt_max if build_report else None,
        "seconds_per_step": statistics.median(after_first) if after_first else None,
        "step_seconds": [round(s, 2) for s in clock.seconds],
        "peak_allocated_gib": _logged_peak(result.log_history, "memory/peak_gb"),
        "peak_reserved_gib": _logged_peak(result.log_history, "memory/reserved_gb"),
        "loaded_model_gib": weights_gib, "counted_floor_gib": floor.floor_gb,
        "preset_estimate_gib": gpu_preset.expected_memory_gb,
        "preset_estimate_seconds_per_step": gpu_preset.expected_seconds_per_step,
        "seconds": {"build_random_model": round(built, 1), "load_4bit": round(loaded, 1),
                    "data": round(prepared, 1), "train": round(result.seconds, 1)},
        "torch": torch.__version__,
    }
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="colab-t4", choices=[n for n, p in config.PRESETS.items() if not p.model.is_miniature])
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1, help="which GRPO stage to time")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (the first is reported but not in the median)")
    ap.add_argument("--out", type=Path, help="also write the report here as JSON")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--world-questions", type=int, help="synthetic world size (default: the preset's); smaller builds faster")
    ap.add_argument("--fill-to-cap", action="store_true",
                    help="stage 2: lengthen every prompt with filler to the preset's stage2.max_prompt_tokens")
    ap.add_argument("--images-first", action="store_true",
                    help="stage 2: show image candidates before snippets, up to k images a prompt")
    ap.add_argument("--smoke", action="store_true", help="CPU: a shrunken copy, one step; checks the script only")
    args = ap.parse_args(argv)
    steps = 1 if args.smoke else args.steps
    if (args.fill_to_cap or args.images_first) and args.stage != 2:
        ap.error("--fill-to-cap and --images-first apply to --stage 2 (stage 1 shows one candidate)")
    with tempfile.TemporaryDirectory(prefix="mmrag-gpu-bench-") as tmp:
        report = run(args.preset, steps, args.work or Path(tmp), args.smoke, args.stage, args.world_questions,
                     args.fill_to_cap, args.images_first)
    return print_and_save(report, args.out)


if __name__ == "__main__":
    main()
