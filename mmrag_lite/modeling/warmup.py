"""The miniature's supervised warm-up: just enough skill that GRPO's sampled rewards vary, so RL has a signal.

A random model earns the same (zero) reward on every sample, and GRPO learns nothing from a constant. So the
miniature is first taught, teacher-forced, the *formats* and a little of the task on the Mini-WebQA train split,
and stopped early on purpose. A pretrained VLM needs none of this.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from ..config import Preset, image_tokens, usable_cores
from ..data import ensure_mini_webqa
from ..prompts import (
    DEFAULT_TAGS,
    NO,
    YES,
    short_ids,
    stage1_images,
    stage1_messages,
    stage1_target,
    stage2_images,
    stage2_messages,
    stage2_target,
)
from .common import as_preset, miniature_progress_off, prepare_image, set_pixel_budget
from .tiny import model_card


@dataclass(frozen=True)
class WarmUpSettings:
    """Supervised warm-up of the miniature: just enough skill that GRPO rewards are not all zero."""

    max_steps: int = 800  # hard cap; relevance (title matching) only starts to move after ~250-450 steps, and not
    # on every run: the early stop below usually ends the warm-up well before the cap
    batch_size: int = 16
    learning_rate: float = 3e-3  # peak; 6e-3 and 1e-2 never left the relevance plateau in 800 steps (measured)
    warmup_steps: int = 10  # then cosine decay to 10% at max_steps (steadier than a constant rate)
    weight_decay: float = 0.0
    stage2_every: int = 4  # every 4th step is a stage-2 batch; separate batches keep short stage-1 prompts unpadded
    stage2_batch_size: int = 8  # and keep the long stage-2 answers from drowning the one-token stage-1 verdict
    eval_every: int = 20
    eval_items: int = 128  # balanced items (as many as half of the validation questions give) for the early stop
    target_accuracy: float = 0.65  # stop once stage-1 accuracy reaches this: above majority (0.5), far from solved
    # ... on this many checks in a row. One check is noisy: on the 48 items cpu-tiny's validation split gives, a
    # chance-level model passes 0.65 once in ~70 checks (binomial), and over 40 that happened (a 2026-11-27 rebuild
    # stopped at step 320 with held-out accuracy 0.50).
    patience: int = 2
    max_seconds: float = 600.0  # guard for a very busy machine: the cached result records steps, seconds and
    # stopped_by="time", and ensure_tiny_vlm warns on every use of such a (less trained, not reproducible) model
    # Stage-1 items shown with the reasoning prompt, and how many of those get the (empty) <think></think> block.
    # The miniature cannot read instructions, so it learns the reasoning format only as often as it is shown:
    # it starts GRPO writing it ~30% of the time, a gap RL closes visibly on a CPU. No reasoning text is taught.
    reasoning_prompt_fraction: float = 0.5
    think_fraction: float = 0.3
    max_questions: int = 400
    seed: int = 0
    # A fixed torch thread count, not the machine's: the float sums (hence the warm model) depend on it, and with it
    # fixed a rebuild is bit-identical (measured for 1 and 2; unless the max_seconds guard cuts it short). Two
    # threads: 0.18 s/step vs 0.24 s on one (2 cores). Capped at the cores this process may use (more threads than
    # cores contend), see warm_up_threads.
    threads: int = 2
    version: int = 1  # part of the cache key: bump when the warm-up code changes in a way the settings do not show

    def __post_init__(self) -> None:  # fail at construction, not after the first eval_every steps of training
        if self.patience < 1:
            raise ValueError(f"WarmUpSettings.patience must be at least 1, got {self.patience}")


def warm_up_threads(settings: WarmUpSettings = WarmUpSettings()) -> int:
    """Threads the warm-up runs on: ``settings.threads``, never more than the cores this process may use."""
    return max(1, min(settings.threads, usable_cores()))


def reached_target(accuracies: Sequence[float], target: float, patience: int) -> bool:
    """True when the last ``patience`` checks all reached ``target``: one lucky check on a small set is not skill."""
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    recent = list(accuracies)[-patience:]
    return len(recent) == patience and all(a >= target for a in recent)


# =============================================================================================== warm-up data
WARMUP_DATA_SOURCE = "mmrag_lite.data"  # the course's own Mini-WebQA (in the cache key; an early version had a stand-in)


@dataclass
class _Example:
    kind: int  # 1 or 2
    input_ids: torch.Tensor  # prompt ids (image pads expanded) + completion ids
    prompt_len: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    label: str  # stage 1: yes/no; stage 2: the answer
    gold: list[str] = field(default_factory=list)
    keyword: str = ""  # stage 2: WebQA's Keywords_A (colour, shape, number, yes/no), "" when absent


def _encode(processor: Any, messages: list, images: list, target: str | None) -> tuple[torch.Tensor, int, Any, Any]:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0]
    plen = ids.shape[0]
    if target is not None:
        tgt = processor.tokenizer(target + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([ids, tgt])
    return ids, plen, enc.get("pixel_values"), enc.get("image_grid_thw")


def _stage1_items(rows: Iterable[Mapping[str, Any]], rng: random.Random, n: int) -> list[tuple]:
    """Balanced (yes/no) stage-1 items: (messages, images, label)."""
    pos, neg = [], []
    for row in rows:
        for c in row["candidates"]:
            (pos if c["is_gold"] else neg).append((row["question"], c))
    rng.shuffle(pos)
    rng.shuffle(neg)
    half = min(n // 2, len(pos), len(neg))
    items = [(q, c, YES) for q, c in pos[:half]] + [(q, c, NO) for q, c in neg[:half]]
    rng.shuffle(items)
    return items


def _stage2_items(rows: Iterable[Mapping[str, Any]], rng: random.Random, k: int) -> list[tuple]:
    """Stage-2 items: (question, shown candidates (gold + distractors, shuffled), gold short ids, answer)."""
    items = []
    for row in rows:
        cands = list(row["candidates"])
        gold = [c for c in cands if c["is_gold"]]
        rest = [c for c in cands if not c["is_gold"]]
        rng.shuffle(rest)
        shown = (gold + rest)[: max(k, len(gold))]
        rng.shuffle(shown)
        sids = short_ids(len(shown))
        gold_sids = [s for s, c in zip(sids, shown) if c["is_gold"]]
        items.append((row["question"], shown, gold_sids, row["answer"]))
    return items


def _build_examples(processor: Any, preset: Preset, rows: Sequence[Mapping[str, Any]], rng: random.Random,
                    n_stage1: int, with_targets: bool = True,
                    settings: WarmUpSettings | None = None) -> tuple[list[_Example], list[_Example]]:
    settings = settings or WarmUpSettings()
    s1: list[_Example] = []
    for q, c, label in _stage1_items(rows, rng, n_stage1):
        c = dict(c, image=prepare_image(c["image"], preset) if c.get("image") is not None else None)
        reasoning_prompt = rng.random() < settings.reasoning_prompt_fraction
        think = reasoning_prompt and rng.random() < settings.think_fraction
        ids, plen, pv, thw = _encode(processor, stage1_messages(q, c, reasoning=reasoning_prompt), stage1_images(c),
                                     stage1_target(label, reasoning=think) if with_targets else None)
        s1.append(_Example(1, ids, plen, pv, thw, label))
    s2: list[_Example] = []
    for (q, shown, gold, answer), keyword in zip(_stage2_items(rows, rng, preset.stage1.k),
                                                 [r.get("keywords", "") for r in rows]):
        shown = [dict(c, image=prepare_image(c["image"], preset) if c.get("image") is not None else None)
                 for c in shown]
        ids, plen, pv, thw = _encode(processor, stage2_messages(q, shown, reasoning=False), stage2_images(shown),
                                     stage2_target(gold, answer) if with_targets else None)
        s2.append(_Example(2, ids, plen, pv, thw, answer, gold, keyword=(keyword or "").strip()))
    return s1, s2


def _collate(batch: Sequence[_Example], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on completion tokens only (prompt and padding are -100).

    ``mm_token_type_ids`` (1 on image tokens) is what Qwen2-VL's mRoPE needs in transformers 5 alongside images.
    """
    width = max(int(e.input_ids.shape[0]) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    pvs, thws = [], []
    for i, e in enumerate(batch):
        n = int(e.input_ids.shape[0])
        input_ids[i, :n] = e.input_ids
        attention[i, :n] = 1
        labels[i, e.prompt_len:n] = e.input_ids[e.prompt_len:]
        if e.pixel_values is not None:
            pvs.append(e.pixel_values)
            thws.append(e.image_grid_thw)
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
           "mm_token_type_ids": (input_ids == image_token_id).long()}
    if pvs:
        out["pixel_values"] = torch.cat(pvs)
        out["image_grid_thw"] = torch.cat(thws)
    return out


def completion_loss(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (completion) positions only.

    Same value as ``model(**inputs).loss``, but ``lm_head`` runs only where there is a label: on the miniature the
    vocabulary projection is over a third of the compute, and prompts are ~95% of the tokens.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _image_token_id(model: Any) -> int:
    return int(model.config.image_token_id)


@torch.no_grad()
def _stage1_next_token_accuracy(model: Any, processor: Any, examples: Sequence[_Example], batch_size: int = 32) -> float:
    """Greedy choice of the token right after ``<answer>`` (teacher-forced prefix) == the label token."""
    tok = processor.tokenizer
    answer_id = tok.convert_tokens_to_ids(DEFAULT_TAGS.open("answer"))
    label_ids = {YES: tok.encode(YES, add_special_tokens=False)[0], NO: tok.encode(NO, add_special_tokens=False)[0]}
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prefixed = [_Example(1, torch.cat([e.input_ids[:e.prompt_len], torch.tensor([answer_id])]), e.prompt_len,
                             e.pixel_values, e.image_grid_thw, e.label) for e in chunk]
        batch = _collate(prefixed, tok.pad_token_id, _image_token_id(model))
        batch.pop("labels")
        logits = model(**batch).logits
        for j, e in enumerate(prefixed):
            pred = int(logits[j, e.input_ids.shape[0] - 1].argmax())
            correct += int(pred == label_ids[e.label])
    return correct / max(len(examples), 1)


@torch.no_grad()
def greedy_generate(model: Any, processor: Any, examples: Sequence[_Example], max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy completions for pre-encoded prompts (left-padded batches), decoded without special tokens."""
    tok = processor.tokenizer
    outs: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(e.prompt_len for e in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, width - e.prompt_len:] = e.input_ids[:e.prompt_len]
            att[j, width - e.prompt_len:] = 1
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": att,
                              "mm_token_type_ids": (ids == _image_token_id(model)).long()}
        pv = [e.pixel_values for e in chunk if e.pixel_values is not None]
        if pv:
            kw["pixel_values"] = torch.cat(pv)
            kw["image_grid_thw"] = torch.cat([e.image_grid_thw for e in chunk if e.image_grid_thw is not None])
        gen = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
        outs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def _extract(tag: str, text: str) -> str | None:
    o, c = f"<{tag}>", f"</{tag}>"
    if o in text and c in text.split(o, 1)[1]:
        return text.split(o, 1)[1].split(c, 1)[0].strip()
    return None


def evaluate_tiny(model: Any, processor: Any, s1: Sequence[_Example], s2: Sequence[_Example]) -> dict[str, float]:
    """Greedy held-out accuracy of both stages, with the majority baselines to compare against.

    Stage 2 counts an answer right when it contains the question's keyword (WebQA's QA-Acc idea, without the
    lemmatiser), and the baseline always answers the most frequent keyword.
    """

    gen1 = greedy_generate(model, processor, s1, max_new_tokens=6)
    acc1 = sum((_extract("answer", g) or "") == e.label for g, e in zip(gen1, s1)) / max(len(s1), 1)
    maj1 = Counter(e.label for e in s1).most_common(1)[0][1] / max(len(s1), 1) if s1 else 0.0
    gen2 = greedy_generate(model, processor, s2, max_new_tokens=32)

    def target(e: _Example) -> str:  # keyword when the question has one (as in WebQA's QA-Acc), else the answer
        return (e.keyword or e.label).lower()

    def hit(pred: str | None, e: _Example) -> bool:  # the keyword as whole words: "no" is not in "Northern"
        pred = (pred or "").lower()
        return bool(re.search(rf"(?<!\w){re.escape(target(e))}(?!\w)", pred)) if e.keyword else pred == target(e)

    acc2 = sum(hit(_extract("answer", g), e) for g, e in zip(gen2, s2)) / max(len(s2), 1)
    best = Counter(target(e) for e in s2).most_common(1)[0][0] if s2 else ""
    maj2 = sum(hit(best, e) for e in s2) / max(len(s2), 1)
    fmt2 = sum(_extract("sources", g) is not None and _extract("answer", g) is not None for g in gen2) / max(len(s2), 1)
    return {"stage1_accuracy": acc1, "stage1_majority": maj1, "stage2_accuracy": acc2, "stage2_majority": maj2,
            "stage2_format": fmt2, "stage1_n": len(s1), "stage2_n": len(s2)}


# =============================================================================================== warm-up
def warm_up_tiny_vlm(cold_dir: str | Path, out_dir: str | Path, *, preset: Preset | str = "cpu-tiny",
                     settings: WarmUpSettings = WarmUpSettings(), verbose: bool = True) -> dict[str, Any]:
    """Teacher-forced SFT of the miniature on the world's TRAIN split; saves to ``out_dir`` and returns the report.

    Loss on completion tokens only; full-parameter AdamW in float32; balanced stage-1 verdict batches, with a stage-2
    ``<sources>..</sources><answer>..</answer>`` batch every ``stage2_every`` steps. Stops early once the stage-1
    validation accuracy reaches ``target_accuracy`` on ``patience`` checks in a row: the point is a policy whose
    sampled rewards vary (so GRPO has a signal), not a solved task. Held-out numbers come from the validation split;
    the test split is never touched.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(warm_up_threads(settings))
    try:
        return _warm_up(cold_dir, out_dir, preset=preset, settings=settings, verbose=verbose)
    finally:
        torch.set_num_threads(threads)


def _warm_up(cold_dir: str | Path, out_dir: str | Path, *, preset: Preset | str, settings: WarmUpSettings,
             verbose: bool) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    preset = as_preset(preset)
    cold_dir, out_dir = Path(cold_dir), Path(out_dir)
    t0 = time.time()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    work = out_dir.parent / "_warmup_data" / out_dir.name
    ds, source = ensure_mini_webqa(preset, work), WARMUP_DATA_SOURCE
    train_rows = list(ds["train"].select(range(min(len(ds["train"]), settings.max_questions))))
    val_split = "validation" if "validation" in ds else "train"
    val_rows = list(ds[val_split].select(range(min(len(ds[val_split]), 80))))
    # Early stopping and the reported accuracy use different questions, so the report is not selected on.
    stop_rows, report_rows = val_rows[0::2], val_rows[1::2]

    processor = AutoProcessor.from_pretrained(cold_dir)
    set_pixel_budget(processor, preset.model.min_pixels, preset.model.max_pixels)
    with miniature_progress_off():
        model = AutoModelForImageTextToText.from_pretrained(cold_dir, dtype=torch.float32)
    model.train()
    pad_id = processor.tokenizer.pad_token_id

    n_s1 = sum(len(r["candidates"]) for r in train_rows)
    tr1, tr2 = _build_examples(processor, preset, train_rows, rng, n_stage1=n_s1, settings=settings)
    stop1, _ = _build_examples(processor, preset, stop_rows, rng, n_stage1=settings.eval_items, settings=settings)
    va1, va2 = _build_examples(processor, preset, report_rows, rng, n_stage1=10_000, settings=settings)
    if verbose:
        print(f"warm-up data ({source}): {len(tr1)} stage-1 and {len(tr2)} stage-2 train examples; "
              f"{len(stop1)} stage-1 items for early stopping, {len(va1)}/{len(va2)} for the report "
              f"(validation split) — {time.time() - t0:.1f}s")

    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def lr_factor(i: int) -> float:
        if i < settings.warmup_steps:
            return (i + 1) / settings.warmup_steps
        frac = (i - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict[str, float]] = []
    losses: dict[int, list[float]] = {1: [], 2: []}
    step, acc = 0, 0.0
    stopped_by = "max_steps"
    for step in range(1, settings.max_steps + 1):
        kind = 2 if (tr2 and settings.stage2_every and step % settings.stage2_every == 0) else 1
        if kind == 2:
            batch = rng.sample(tr2, min(settings.stage2_batch_size, len(tr2)))
        else:
            batch = rng.sample(tr1, min(settings.batch_size, len(tr1)))
        inputs = _collate(batch, pad_id, _image_token_id(model))
        loss = completion_loss(model, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses[kind].append(float(loss.detach()))
        if step % settings.eval_every == 0:
            model.eval()
            acc = _stage1_next_token_accuracy(model, processor, stop1)
            model.train()
            l1 = sum(losses[1]) / max(len(losses[1]), 1)
            l2 = sum(losses[2]) / max(len(losses[2]), 1)
            losses = {1: [], 2: []}
            history.append({"step": step, "stage1_loss": l1, "stage2_loss": l2, "stage1_val_acc": acc})
            if verbose:
                print(f"  step {step:4d}  loss stage-1 {l1:.3f} stage-2 {l2:.3f}  stage-1 val acc {acc:.3f}  "
                      f"({time.time() - t0:.0f}s)")
            if reached_target([h["stage1_val_acc"] for h in history], settings.target_accuracy, settings.patience):
                stopped_by = "target accuracy"
                break
            if time.time() - t0 > settings.max_seconds:
                stopped_by = "time"  # not bit-identical to an idle machine's model: ensure_tiny_vlm warns on every use
                break
    model.eval()
    report = evaluate_tiny(model, processor, va1, va2)
    report.update({"steps": step, "seconds": time.time() - t0, "threads": torch.get_num_threads(), "data_source": source,
                   "history": history, "split": val_split, "settings": asdict(settings), "stopped_by": stopped_by})
    if verbose:
        print(f"warm-up done in {report['seconds']:.0f}s, {step} steps on {report['threads']} thread(s). Held-out: "
              f"stage-1 greedy accuracy {report['stage1_accuracy']:.3f} vs majority {report['stage1_majority']:.3f}; "
              f"stage-2 answer accuracy {report['stage2_accuracy']:.3f} vs majority answer "
              f"{report['stage2_majority']:.3f} (format {report['stage2_format']:.2f})")

    with atomic_dir(out_dir) as tmp:
        with miniature_progress_off():
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = json.loads((cold_dir / "mmrag_tiny.json").read_text(encoding="utf-8"))
        info.update({"warmed_up": True, "warm_up": {k: v for k, v in report.items() if k != "history"},
                     "images": {"image_size": preset.model.image_size,  # the pixel budget it learned to read
                                "tokens_per_image": image_tokens(preset.model) - 2}})  # less the vision wrappers
        (tmp / "mmrag_tiny.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "warmup_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    _remove_warm_up_data(work)
    return report


def _remove_warm_up_data(work: Path) -> None:
    """The warm-up's own Mini-WebQA is only needed while it runs: once the model is saved, its folder goes (and the
    ``_warmup_data`` parent with its last child), so the cache holds models, not a copy of the data per warm model."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()
    except OSError:  # another warm-up's data is still there (or the folder is gone already)
        pass
