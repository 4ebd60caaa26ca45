"""What notebook 05 pays per question on a GPU preset's real-size architecture: stage-1 scoring and stage-2 answers.

    python benchmarks/bench_gpu_inference.py --preset colab-t4 --out results.json   # on a CUDA machine
    .venv/bin/python benchmarks/bench_gpu_inference.py --smoke                      # CPU: the plumbing only

Training cost is ``bench_gpu_preset.py``'s; this is the evaluation side, which no GPU had timed. The model is the
preset's architecture at full size with RANDOM weights (``architectures.build_random_real_size_model``, no download),
loaded in 4-bit for inference by the course's loader, on the first ``--questions`` test questions of the preset's
synthetic Mini-WebQA. Timed, CUDA synchronised:

* stage-1 scoring, ``scoring.score_split`` (one forward pass per candidate, P(yes)), at ``--score-batches``;
* the generate-and-parse judge (``scoring.judge_by_generation``) on the first ``--judge-questions`` questions'
  candidates at the preset's stage-1 completion budget: issue 4's >= 5x ratio at real size;
* stage-2 answering, ``pipeline.run_pipeline`` for the base top-k system (the shape of every filtered system in
  notebook 05's table) and for zero-shot over every candidate (its longest prompts), at ``--generate-batches``
  prompts per ``generate`` call, each call holding exactly that many (the preset's token cap,
  ``evaluation.generation_max_batch_tokens``, is off while timing: it would split the calls).

Each timed call follows an untimed warm-up (a scoring batch, one judged candidate, one answering batch cut to 4 new
tokens), so lazy initialisation and kernel selection are not counted.

Random weights rarely emit an end token, so every completion runs to its ``max_new_tokens``: the slow end of real
answers (the report counts the tokens generated). Memory is the CUDA peak of each phase.

Without ``--adapters`` no LoRA is attached (ModelBank falls back to the base). With ``--adapters`` the model is held as
notebook 05 holds it: ``pipeline.ModelBank``'s default loader, one 4-bit base with a stage-1 and a stage-2 LoRA of
the preset's shape (random, saved and reloaded through PEFT) switched per call. Then stage-1 scoring runs with the
adapter off and on, and answering times the SAME base top-k prompts with the stage-2 adapter off and on (what an
unmerged LoRA adds to a generate call), and every-candidate prompts with it on under the preset's token cap
(``evaluation.generation_max_batch_tokens``, restored for that run): the longest calls notebook 05 makes, with
everything it holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch
from bench_gpu_preset import bench_target, print_and_save

from mmrag_lite import config, data, modeling, pipeline, scoring
from mmrag_lite.modeling import architectures


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured(fn, *, warm_up=None) -> tuple[object, float, dict]:
    """``fn()``'s result, wall seconds and CUDA peaks (GiB; None off CUDA), after ``warm_up()`` (untimed)."""
    if warm_up is not None:
        warm_up()
    _sync()
    if torch.cuda.is_available():  # the allocator's cache of earlier phases would count as this one's "reserved"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    seconds = time.perf_counter() - t0
    peaks = {"peak_allocated_gib": None, "peak_reserved_gib": None}
    if torch.cuda.is_available():
        peaks = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
                 "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2)}
    return out, seconds, peaks


def phase(name: str, figures: dict) -> dict:
    """Print one phase's figures as they come (a run cut short by its time limit still leaves them in its log)."""
    print(f"PHASE {name} {json.dumps(figures)}", flush=True)
    return figures


class TokenCounter:
    """Wraps ``model.generate`` to count the new tokens of every sequence it returns (padding included: random
    weights stop on no end token, so each row runs to ``max_new_tokens``)."""

    def __init__(self, model) -> None:
        self.model, self.inner, self.tokens = model, model.generate, 0

    def counted(self, fn, *args):
        """``fn(*args)`` with the count started afresh (a warm-up before it is not counted)."""
        self.tokens = 0
        return fn(*args)

    def __enter__(self) -> None:
        def counting(*args, **kwargs):
            out = self.inner(*args, **kwargs)
            self.tokens += int(out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1]))
            return out

        self.model.generate = counting

    def __exit__(self, *exc) -> None:
        self.model.generate = self.inner


def save_random_adapters(model, preset: config.Preset, folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """A LoRA of the preset's shape per name, with random ``lora_B`` (PEFT starts it at zero; a zero B costs the
    same but changes nothing), saved where ``ModelBank(adapters=...)`` reads them. ``model`` is modified: drop it."""
    from peft import get_peft_model

    from mmrag_lite.training import is_adapter_dir

    peft_model = get_peft_model(model, modeling.lora_config(preset), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, modeling.lora_config(preset))
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(std=1e-3)
    paths = {}
    for name in names:
        peft_model.save_pretrained(str(folder), selected_adapters=[name])  # a non-default name saves to folder/name
        paths[name] = folder / name
        if not is_adapter_dir(paths[name]):
            raise RuntimeError(f"PEFT did not save the {name} adapter in {paths[name]}")
    return paths


def run(preset_name: str, work: Path, smoke: bool, *, questions: int, judge_questions: int, world_questions: int | None,
        score_batches: list[int], generate_batches: list[int], adapters: bool = False,
        systems: tuple[str, ...] = ("top-k", "all")) -> dict:
    gpu_preset, preset, text, vision, device, dtype = bench_target(preset_name, smoke)
    model_id = gpu_preset.model.model_id
    if world_questions:  # a smaller world builds faster; the per-question cost depends on the preset's sizes
        preset = preset.with_overrides(**{"data.world_questions": world_questions})
    # each timed call holds exactly --generate-batches prompts: the preset's token cap would split it
    preset = preset.with_overrides(**{"evaluation.generation_max_batch_tokens": 0})

    t0 = time.perf_counter()
    folder = architectures.build_random_real_size_model(model_id, work / "model", dtype=dtype, device=device,
                                                        text=text, vision=vision)
    model, processor = modeling.load_model_and_processor(preset, model_path=folder, for_training=False)
    model.eval()
    bank = pipeline.ModelBank(preset, work / "run", loader=lambda *a, **kw: (model, processor), verbose=False)
    if adapters:  # notebook 05's way: one shared base, the adapters loaded into it by name
        saved = save_random_adapters(model, preset, work / "adapters", ("stage1", "stage2"))
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        bank = pipeline.ModelBank(preset, work / "run", adapters=saved, base_model=folder, verbose=False)
        for which in ("stage1", "stage2"):
            bank.get(which)
            assert bank.resolved(which) == which, bank.notes
        model, processor = bank.get("base")
    loaded = time.perf_counter() - t0
    weights_gib = round(torch.cuda.memory_allocated() / 1024**3, 2) if device == "cuda" else None
    t0 = time.perf_counter()
    rows = list(data.ensure_mini_webqa(preset, work / "run")["test"])[:questions]
    if len(rows) < 2:
        raise SystemExit(f"the test split has {len(rows)} question(s); raise --world-questions")
    prepared = time.perf_counter() - t0
    n_cands = sum(len(r["candidates"]) for r in rows)

    scoring_runs = []
    for judge_weights in ("base", "stage1") if adapters else ("base",):
        judge_model = bank.get(judge_weights)[0]
        for batch in score_batches:
            out, seconds, peaks = measured(
                lambda b=batch, m=judge_model: scoring.score_split(m, processor, rows, preset, batch_size=b, progress=False),
                warm_up=lambda b=batch, m=judge_model: scoring.score_split(m, processor, rows[:1], preset, batch_size=b,
                                                                             progress=False))
            if judge_weights == "base":  # answering reads the base judge's top-k
                scored = out
            scoring_runs.append(phase("scoring", {"weights": judge_weights, "batch_size": batch,
                                 "seconds": round(seconds, 2), "candidates": n_cands,
                                 "ms_per_candidate": round(1000 * seconds / n_cands, 1),
                                 "seconds_per_question": round(seconds / len(rows), 3), **peaks}))
    scores = pipeline._as_lookup(scored)

    budget = preset.stage1.grpo.max_completion_length
    judged = rows[:judge_questions]
    judge_batch = score_batches[0]
    n_judged = sum(len(r["candidates"]) for r in judged)

    def judge(rs) -> None:  # one question's candidates per call, as notebook 03 judges
        for r in rs:
            scoring.judge_by_generation(model, processor, r["question"], r["candidates"], preset, batch_size=judge_batch)

    counter = TokenCounter(model)
    with counter:
        _, judge_seconds, judge_peaks = measured(lambda: counter.counted(judge, judged), warm_up=lambda: scoring.judge_by_generation(
            model, processor, judged[0]["question"], judged[0]["candidates"][:1], preset, max_new_tokens=4))
    forward = scoring_runs[0]
    judge_ms = 1000 * judge_seconds / n_judged
    # one question a call: a call holds its pool (16 candidates at most), not judge_batch prompts, while the forward
    # pass packs judge_batch prompts of several questions; a generate call costs about the same however full it is,
    # so the ratio below is the course's two uses as they run, not the same fill on both sides
    calls = [len(r["candidates"][i:i + judge_batch]) for r in judged for i in range(0, len(r["candidates"]), judge_batch)]
    judge_report = phase("judge_by_generation", {"candidates": n_judged, "batch_size": judge_batch,
                    "prompts_per_call_mean": round(n_judged / len(calls), 1), "calls": len(calls), "max_new_tokens": budget,
                    "reasoning": preset.stage1.reasoning, "seconds": round(judge_seconds, 2),
                    "ms_per_candidate": round(judge_ms, 1), "new_tokens": counter.tokens,
                    "forward_pass_is_faster_by": round(judge_ms / forward["ms_per_candidate"], 1), **judge_peaks})

    standard = {s.name: s for s in pipeline.standard_systems(preset)}
    top_k, every = standard["zero-shot, base top-k"], standard["zero-shot"]
    capped = preset.with_overrides(**{"evaluation.generation_max_batch_tokens": gpu_preset.evaluation.generation_max_batch_tokens})
    plans = []  # (system, batch sizes, the preset it runs under)
    if "top-k" in systems:
        plans.append((top_k, generate_batches, preset))
        if adapters:  # the same prompts (the base judge's top-k), the stage-2 LoRA on
            plans.append((pipeline.SystemSpec("base top-k, stage-2 adapter on", "base", "stage2"), generate_batches, preset))
    if "all" in systems:
        if adapters:
            plans.append((pipeline.SystemSpec("every candidate, stage-2 adapter on, token cap", "all", "stage2"),
                          [capped.evaluation.generation_batch_size], capped))
        else:
            plans.append((every, generate_batches, preset))
    answering = []
    for system, batches, run_preset in plans:
        answer_counter = TokenCounter(bank.get(system.answerer)[0])
        for batch in batches:
            def answer(rs, new_tokens=None, b=batch, s=system, p=run_preset):
                return pipeline.run_pipeline(rs, p, system=s, bank=bank, scores=scores, batch_size=b,
                                             max_new_tokens=new_tokens, progress=False)

            with answer_counter:  # the warm-up: one batch's prefill and a few decoding steps
                results, seconds, peaks = measured(lambda a=answer, c=answer_counter: c.counted(a, rows),
                                                   warm_up=lambda a=answer, b=batch: a(rows[:b], 4))
            lengths = [pipeline.prompt_length(processor, pipeline.fit_prompt(
                r, pipeline.select_candidates(r, system, scores[str(r["guid"])], system.resolved_k(preset)), processor,
                reasoning=system.resolved_reasoning(preset), max_tokens=run_preset.answer_prompt_tokens,
                image_fn=pipeline.image_fn(preset))) for r in rows]
            answering.append(phase("answering", {
                "system": system.name, "answered_by": system.answerer, "batch_size": batch,
                "max_batch_tokens": run_preset.evaluation.generation_max_batch_tokens, "questions": len(rows),
                "max_new_tokens": preset.stage2.grpo.max_completion_length, "new_tokens": answer_counter.tokens,
                "seconds": round(seconds, 2), "seconds_per_question": round(seconds / len(rows), 3),
                "prompt_tokens_mean": round(statistics.mean(lengths), 1), "prompt_tokens_max": max(lengths),
                "candidates_shown_max": max(len(r.kept_ids) for r in results), **peaks}))

    return {
        "preset": gpu_preset.name, "model": model_id, "smoke": smoke,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "weights": "random (shapes as published; tiny tokenizer)", "compute_dtype": preset.model.compute_dtype,
        "quantized_4bit": bool(getattr(model, "mmrag_quantized", False)), "image_size": preset.model.image_size,
        "k": preset.stage1.k, "world_questions": preset.data.world_questions, "questions": len(rows),
        "loaded_model_gib": weights_gib, "scoring": scoring_runs, "judge_by_generation": judge_report,
        "answering": answering, "adapters": ["stage1", "stage2"] if adapters else [],
        "preset_generation_batch_size": gpu_preset.evaluation.generation_batch_size,
        "preset_generation_max_batch_tokens": gpu_preset.evaluation.generation_max_batch_tokens,
        "token_cap_while_timing": preset.evaluation.generation_max_batch_tokens,
        "seconds": {"build_and_load": round(loaded, 1), "data": round(prepared, 1)}, "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="colab-t4", choices=[n for n, p in config.PRESETS.items() if not p.model.is_miniature])
    ap.add_argument("--questions", type=int, default=32, help="test questions answered per system and batch size")
    ap.add_argument("--judge-questions", type=int, default=2, help="questions whose candidates the generating judge reads")
    ap.add_argument("--world-questions", type=int, help="synthetic world size (default: the preset's); smaller builds faster")
    ap.add_argument("--score-batches", type=int, nargs="+", default=[scoring.DEFAULT_BATCH_SIZE],
                    help="stage-1 prompts per forward pass to time (the first also batches the generating judge)")
    ap.add_argument("--generate-batches", type=int, nargs="+", help="stage-2 prompts per generate call to time "
                    "(default: the preset's evaluation.generation_batch_size)")
    ap.add_argument("--adapters", action="store_true", help="hold the model as notebook 05 does: one base, a stage-1 "
                    "and a stage-2 LoRA (random) switched per call; times the adapters off and on")
    ap.add_argument("--systems", nargs="+", choices=["top-k", "all"], default=["top-k", "all"],
                    help="which answering prompts to time: the base judge's top-k, all candidates (the longest)")
    ap.add_argument("--out", type=Path, help="also write the report here as JSON")
    ap.add_argument("--smoke", action="store_true", help="CPU: a shrunken copy of the architecture; checks the script only")
    args = ap.parse_args(argv)
    if min(args.questions, args.judge_questions, *args.score_batches, *(args.generate_batches or [1])) < 1:
        ap.error("--questions, --judge-questions and every batch size must be at least 1")
    generate_batches = args.generate_batches or [config.get_preset("cpu-tiny" if args.smoke else args.preset).evaluation.generation_batch_size]
    with tempfile.TemporaryDirectory(prefix="mmrag-gpu-infer-") as tmp:
        report = run(args.preset, Path(tmp), args.smoke, questions=args.questions, judge_questions=args.judge_questions,
                     world_questions=args.world_questions, score_batches=args.score_batches,
                     generate_batches=generate_batches, adapters=args.adapters, systems=tuple(args.systems))
    return print_and_save(report, args.out)


if __name__ == "__main__":
    main()
