"""Stage-1 scoring: turn the point-wise judge into a ranker, keep the top-k, and measure what the filter costs.

MMRAG-RFT's first stage judges each (question, candidate) pair on its own and keeps only the best-ranked
candidates for the list-wise second stage. A judge that *generates* a verdict gives a label, not a score, and
pays for every generated token. Here the judge is read with **one forward pass** instead:

    score(q, c) = P(yes | prompt(q, c), "<answer>")
                = exp(z_yes) / (exp(z_yes) + exp(z_no))

where ``z_yes``/``z_no`` are the next-token logits of the first token of ``yes``/``no`` right after the assistant
prefix ``<answer>`` (the stage-1 no-reasoning format of docs/CONTRACTS.md); where ``Yes``/``YES`` (``No``/``NO``)
start with tokens of their own, ``z_yes`` (``z_no``) is the log-sum-exp over them, as the parser reads them all as
the same verdict. Where a tokenizer merges the tag's ``>`` with the word (Qwen2's ``>yes``), the prompt ends with
``<answer`` and the verdict tokens are ``>yes``/``>no`` (``verdict_readout``). The two-way softmax is our choice: it
ignores the mass the model puts on other tokens, so the score stays a clean relevance probability even for a
model whose format is still shaky. Scores are comparable across candidates, so ranking and top-k are cheap. The
GPU presets train the judge with the reasoning prompt; that reading it under the no-reasoning one is best was measured
on the miniature only (docs/modeling.md, "Not measured on a hub model"; ``benchmarks/bench_scorer_prompt.py``).

``judge_by_generation`` keeps the generate-and-parse judge for comparison (``benchmarks/bench_scoring.py``).
``filter_report`` answers the paper's open question "which k?": recall/precision of the gold sources at each k
against the stage-2 prompt tokens each k saves.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import prompts
from .atomic import write_json_atomic
from .config import IMAGE_WRAPPER_TOKENS, Preset
from .data import is_saved_split, one_split, rows_by_guid
from .metrics import top_k_ids
from .modeling import GREEDY_DECODING, encode_prompts, prepare_images

Scored = dict[str, list[tuple[str, float]]]  # guid -> [(candidate_id, P(yes)), ...] in pool order

DEFAULT_BATCH_SIZE = 32  # prompts per forward pass; the tiny model and a 2B model in 4-bit both fit 32 short prompts
SCORES_FORMAT_VERSION = 1  # bumped when the JSON layout of saved scores changes


# ------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _left_padding(processor: Any) -> Iterator[None]:
    """Left-pad while scoring/generating, so the last position of every row is its real last token."""
    tok = getattr(processor, "tokenizer", processor)
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = old


def _model_device(model: Any) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover - a model always has parameters
        return torch.device("cpu")


def answer_prefix(tags: prompts.Tags = prompts.DEFAULT_TAGS) -> str:
    """What the scorer appends after the chat template's assistant header: ``<answer>``."""
    return tags.open("answer")


# other spellings the parser (hence the relevance reward) reads as the same verdict, so GRPO pays them as much: other
# cases, and a space after the tag ("<answer> Yes", Qwen2's "Ġyes" token), which an instruct model may drift to
VERDICT_VARIANTS = {prompts.YES: ("Yes", "YES", " yes", " Yes", " YES"), prompts.NO: ("No", "NO", " no", " No", " NO")}


@dataclass(frozen=True)
class VerdictReadout:
    """Where the scorer reads the verdict: the prompt ends with ``prefill`` (token ids ``prefill_ids``); the next
    token is one of ``yes_ids`` (``yes_ids[0]``: lower-case ``yes``) or one of ``no_ids``."""

    prefill: str
    prefill_ids: tuple[int, ...]
    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    @property
    def yes_id(self) -> int:
        return self.yes_ids[0]

    @property
    def no_id(self) -> int:
        return self.no_ids[0]


def verdict_readout(processor: Any, prefix: str | None = None) -> VerdictReadout:
    """The first token where ``prefix + "yes"`` and ``prefix + "no"`` part, and the text before it.

    Usually that is ``<answer>`` then ``yes`` / ``no``. But a tokenizer may merge the tag's last character with the
    word: Qwen2's pre-tokenizer makes ``>yes`` one piece (``[^\\r\\n\\p{L}\\p{N}]?\\p{L}+``), and where its BPE
    has that merge the verdict token is ``>yes``, after a prompt that ends with ``<answer``. Reading the first
    token that differs covers both, and tokenising ``"yes"`` alone (a word-initial variant) is never assumed.
    ``Yes`` / ``YES`` / `` yes`` ... (and ``No`` / ``NO`` / `` no`` ..., ``VERDICT_VARIANTS``) count too where one
    token of their own spells them after the same prefill: the parser, hence the relevance reward, reads them as the
    same verdict (a variant split into pieces, "Y" "E" "S", is not read: "Y" starts other words too). A variant whose first token could start the other verdict too (a bare space) decides nothing and
    is dropped. Where a variant merges with the tag instead (the real Qwen2 vocabulary writes ``<answer>No`` as
    ``<answer`` + ``>No``, but ``yes``, ``no``, ``Yes``, ``YES`` and ``NO`` after ``>``), the token that spells its
    start on its own is read, provided the prefill ends exactly where the verdict starts (after ``>``, the model
    writes ``No`` in one token as ``No``), so one verdict is not read in more forms than the other.
    """
    tok = getattr(processor, "tokenizer", processor)
    prefix = answer_prefix() if prefix is None else prefix

    def ids(word: str) -> list[int]:
        return tok(prefix + word, add_special_tokens=False)["input_ids"]

    yes, no = ids(prompts.YES), ids(prompts.NO)
    n = 0
    while n < min(len(yes), len(no)) and yes[n] == no[n]:
        n += 1
    if n == len(yes) or n == len(no):
        raise ValueError(f"after {prefix!r} one of 'yes'/'no' adds no token of its own; forward-pass scoring cannot "
                         "tell them apart")
    prefill = tok.decode(yes[:n])
    if not prefix.startswith(prefill) or tok(prefill, add_special_tokens=False)["input_ids"] != yes[:n]:
        raise ValueError(f"the tokenizer does not split {prefix!r} + 'yes'/'no' at a text boundary (shared tokens "
                         f"decode to {prefill!r}); forward-pass scoring needs a prefill that ends where the verdict starts")
    firsts: dict[str, list[int]] = {prompts.YES: [yes[n]], prompts.NO: [no[n]]}
    for verdict, variants in VERDICT_VARIANTS.items():
        for word in variants:
            v = ids(word)
            first = v[n] if len(v) > n and v[:n] == yes[:n] else _spelled_alone(tok, yes[:n], prefix, word)
            # only a token that spells the whole variant: a small vocabulary splits "YES" into "Y" "E" "S", and "Y"
            # starts "Yellow" as well (the parser reads no verdict there)
            whole = first is not None and tok.decode(list(yes[:n]) + [first])[len(prefill):] == (prefix + word)[len(prefill):]
            if whole and first not in firsts[verdict]:
                firsts[verdict].append(first)
    all_yes, all_no = set(firsts[prompts.YES]), set(firsts[prompts.NO])  # a variant that starts like the other
    yes_ids = [yes[n]] + [t for t in firsts[prompts.YES][1:] if t not in all_no]  # verdict decides nothing: dropped
    no_ids = [no[n]] + [t for t in firsts[prompts.NO][1:] if t not in all_yes]
    return VerdictReadout(prefill, tuple(yes[:n]), tuple(yes_ids), tuple(no_ids))


def _spelled_alone(tok: Any, prefill_ids: Sequence[int], prefix: str, word: str) -> int | None:
    """The first token of ``word`` written alone, when it can follow the prefill: the prefill is the whole prefix
    and the token decodes, after it, to a non-empty start of ``word``. None otherwise."""
    alone = tok(word, add_special_tokens=False)["input_ids"]
    if not alone or tok.decode(list(prefill_ids)) != prefix:
        return None
    start = tok.decode(list(prefill_ids) + alone[:1])[len(prefix):]
    return alone[0] if start and word.startswith(start) else None


def yes_no_token_ids(processor: Any, tags: prompts.Tags = prompts.DEFAULT_TAGS) -> tuple[int, int]:
    """Ids of the tokens the scorer compares: the first token of ``yes`` and of ``no`` as the tokenizer writes them
    after ``<answer>`` (``verdict_readout``)."""
    r = verdict_readout(processor, answer_prefix(tags))
    return r.yes_id, r.no_id


def _check_prompt_end(input_ids: torch.Tensor, readout: VerdictReadout) -> None:
    """Left-padded prompts must all end with the prefill's tokens, or the last logits are not the verdict's."""
    n = len(readout.prefill_ids)
    want = torch.tensor(readout.prefill_ids, device=input_ids.device)
    bad = [i for i in range(input_ids.shape[0]) if not torch.equal(input_ids[i, -n:], want)]
    if bad:
        raise ValueError(f"{len(bad)} scoring prompt(s) do not end with the tokens of {readout.prefill!r} (the chat "
                         "template's assistant header tokenises into them): the verdict logits would be read at the "
                         "wrong place")


def _stage1_text(processor: Any, question: str, candidate: Mapping[str, Any], *, reasoning: bool) -> str:
    messages = prompts.stage1_messages(question, candidate, reasoning=reasoning)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ------------------------------------------------------------------------------------------- scoring
def _score_pairs(
    model: Any,
    processor: Any,
    pairs: Sequence[tuple[str, Mapping[str, Any]]],
    preset: Preset,
    *,
    batch_size: int,
    progress: bool = False,
    desc: str = "scoring",
    reasoning_prompt: bool = False,
    prefill: str | None = None,
) -> list[float]:
    """P(yes) for many (question, candidate) pairs, ``batch_size`` prompts per forward pass.

    ``reasoning_prompt``/``prefill`` (what follows the assistant header; it must end in ``<answer>``) exist for
    ``benchmarks/bench_scorer_prompt.py``, which measured the defaults against the alternatives.
    """
    readout = verdict_readout(processor, prefill)
    yes_ids, no_ids = list(readout.yes_ids), list(readout.no_ids)
    device = _model_device(model)
    scores: list[float] = []
    starts = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _left_padding(processor):
            for start in starts:
                chunk = pairs[start : start + batch_size]
                texts = [_stage1_text(processor, q, c, reasoning=reasoning_prompt) + readout.prefill for q, c in chunk]
                images = [prepare_images(prompts.stage1_images(c), preset) for _, c in chunk]
                enc = {k: v.to(device) for k, v in encode_prompts(processor, texts, images).items()}
                _check_prompt_end(enc["input_ids"], readout)
                logits = model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
                two_way = torch.stack([logits[:, yes_ids].logsumexp(-1), logits[:, no_ids].logsumexp(-1)], dim=-1)
                scores.extend(torch.softmax(two_way, dim=-1)[:, 0].tolist())
    finally:
        if was_training:
            model.train()
    return scores


def score_candidates(
    model: Any,
    processor: Any,
    question: str,
    candidates: Sequence[Mapping[str, Any]],
    preset: Preset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[float]:
    """P(yes) for each candidate of one question (pool order), from one forward pass per prompt."""
    return _score_pairs(model, processor, [(question, c) for c in candidates], preset, batch_size=batch_size)


# Stage 2 reads the train split in order until it has stage2.max_examples rows, stage2.permutations per question, and
# notebook 05 evaluates the first evaluation.questions of test: scoring the rest would cost hours on real WebQA
# (~30k train questions x 16 candidates) for nothing. Twice stage 2's need leaves room for the questions it drops.
TRAIN_SCORING_HEADROOM = 2


def questions_to_score(preset: Preset, split: str) -> int | None:
    """How many of ``split``'s first questions a run reads through its stage-1 scores (None: all of them)."""
    if split == "train":
        s = preset.stage2
        return TRAIN_SCORING_HEADROOM * math.ceil(s.max_examples / s.permutations)
    if split == "test":
        return preset.evaluation.questions
    return None


def score_split(
    model: Any,
    processor: Any,
    split_ds: Iterable[Mapping[str, Any]],
    preset: Preset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_questions: int | None = None,
    progress: bool = True,
) -> Scored:
    """Score every candidate of every question: ``{guid: [(candidate_id, P(yes)), ...]}`` in pool order.

    Pairs from different questions share batches, so small pools still fill the forward passes. The split is read as
    a stream: a question is read (its images decoded) only when the batch it fills is next, and a batch's pairs are
    dropped once scored, so memory holds one batch of pairs plus one question's pool, not the split (a decoded
    448 px question of real Mini-WebQA takes ~7 MiB: 2,000 of them were ~14 GB). The batches are the ones scoring
    all pairs at once would make (every ``batch_size`` pairs in split order), so the scores are too.
    """
    split_ds = one_split(split_ds, "score_split")
    sizes = _pool_sizes(split_ds, max_questions)
    rows = iter(split_ds) if max_questions is None else itertools.islice(split_ds, max_questions)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if sizes is None else math.ceil(sum(sizes) / batch_size), desc="scoring", unit="batch")
    pools: list[tuple[str, list[str]]] = []  # (guid, candidate ids): all that is kept of a question once read
    flat: list[float] = []
    pending: list[tuple[str, Mapping[str, Any]]] = []  # pairs read but not yet scored: fewer than one batch + a pool

    def score_next(n: int) -> None:
        batch = pending[:n]
        del pending[:n]
        flat.extend(_score_pairs(model, processor, batch, preset, batch_size=batch_size, progress=False))
        if bar is not None:
            bar.update(1)

    try:
        for row in rows:
            pools.append((row["guid"], [c["id"] for c in row["candidates"]]))
            pending.extend((row["question"], c) for c in row["candidates"])
            while len(pending) >= batch_size:
                score_next(batch_size)
        if pending:
            score_next(len(pending))
    finally:
        if bar is not None:
            bar.close()
    out: Scored = {}
    it = iter(flat)
    for guid, ids in pools:
        out[guid] = [(cid, float(next(it))) for cid in ids]
    return out


def _pool_sizes(split_ds: Any, n: int | None) -> list[int] | None:
    """Candidates per question of the split's first ``n`` questions (all for None), with no image decoded, for the
    progress bar's total. A saved split is read as arrow, a few hundred rows at a time (their image bytes stay
    compressed); rows in a list are counted as they are. None where only iterating could tell (a streaming
    ``IterableDataset``, a split with a transform, a generator): the bar then counts batches without a total."""
    if is_saved_split(split_ds):
        import pyarrow.compute as pc

        table = split_ds.with_format("arrow")
        stop = len(split_ds) if n is None else min(n, len(split_ds))
        sizes: list[int] = []
        for start in range(0, stop, _POOL_SIZE_CHUNK):
            pools = table[start:min(start + _POOL_SIZE_CHUNK, stop)]["candidates"]
            sizes += pc.list_value_length(pools).to_pylist()
        return sizes
    if isinstance(split_ds, (list, tuple)):
        return [len(r["candidates"]) for r in (split_ds if n is None else split_ds[:n])]
    return None


_POOL_SIZE_CHUNK = 512  # rows of a saved split read at once to count pools: bounded memory, few reads


@dataclass(frozen=True)
class Judgement:
    """One generate-and-parse verdict: the label (``None`` when malformed) and the raw completion."""

    label: str | None
    completion: str


def judge_by_generation(
    model: Any,
    processor: Any,
    question: str,
    candidates: Sequence[Mapping[str, Any]],
    preset: Preset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    reasoning: bool | None = None,
) -> list[Judgement]:
    """The judge as the policy is trained: greedy-generate a completion, parse the verdict.

    ``max_new_tokens`` defaults to the stage-1 completion length and ``reasoning`` to the preset's, i.e. what the
    trained judge really writes, so a timing comparison with ``score_candidates`` is fair.
    """
    from .parsing import parse_stage1

    reasoning = preset.stage1.reasoning if reasoning is None else reasoning
    max_new_tokens = max_new_tokens or preset.stage1.grpo.max_completion_length
    tok = getattr(processor, "tokenizer", processor)
    device = _model_device(model)
    out: list[Judgement] = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _left_padding(processor):
            for start in range(0, len(candidates), batch_size):
                chunk = candidates[start : start + batch_size]
                texts = [_stage1_text(processor, question, c, reasoning=reasoning) for c in chunk]
                images = [prepare_images(prompts.stage1_images(c), preset) for c in chunk]
                enc = {k: v.to(device) for k, v in encode_prompts(processor, texts, images).items()}
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **GREEDY_DECODING
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                for text in tok.batch_decode(new, skip_special_tokens=True):
                    out.append(Judgement(parse_stage1(text, reasoning=reasoning).label, text))
    finally:
        if was_training:
            model.train()
    return out


# ------------------------------------------------------------------------------------------- top-k
def top_k(scored: Scored | Sequence[tuple[str, float]], k: int) -> list[str] | dict[str, list[str]]:
    """The ids of the k best-scored candidates, best first (``metrics.top_k_ids``: ties keep pool order, a missing or
    NaN score ranks last, exactly as the pipeline filters).

    Accepts one question's ``[(id, score), ...]`` (returns a list) or a whole ``Scored`` dict (returns a dict).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(scored, Mapping):
        return {guid: top_k_ids(dict(pairs), k, [cid for cid, _ in pairs]) for guid, pairs in scored.items()}
    return top_k_ids(dict(scored), k, [cid for cid, _ in scored])


def candidate_token_costs(processor: Any, candidates: Sequence[Mapping[str, Any]], preset: Preset) -> list[int]:
    """Estimated stage-2 prompt tokens each candidate adds: its id line and text, plus its image tokens.

    Image tokens come from the processor itself (one fixed-size image through the image processor:
    grid_t*grid_h*grid_w / merge_size**2, plus the vision start/end markers), so the estimate follows the preset.
    """
    tok = getattr(processor, "tokenizer", processor)
    per_image = image_token_count(processor, preset)
    costs = []
    for sid, cand in zip(prompts.short_ids(len(candidates)), candidates):
        text = f"{sid}: " + prompts.describe_candidate(cand) + "\n"
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if cand.get("modality") == "image" and cand.get("image") is not None:
            n += per_image
        costs.append(n)
    return costs


def image_token_count(processor: Any, preset: Preset) -> int:
    """Tokens one image costs in a prompt at the preset's fixed size (placeholders + vision start/end)."""
    from PIL import Image

    blank = Image.new("RGB", (preset.model.image_size, preset.model.image_size))
    ip = processor.image_processor
    grid = ip(images=[prepare_images([blank], preset)[0]], return_tensors="pt")["image_grid_thw"][0]
    merge = getattr(ip, "merge_size", 1) or 1
    return int(grid.prod().item()) // (merge * merge) + IMAGE_WRAPPER_TOKENS


def filter_report(
    scored: Scored,
    split_ds: Iterable[Mapping[str, Any]],
    ks: Iterable[int] | None = None,
    *,
    processor: Any = None,
    preset: Preset | None = None,
) -> list[dict[str, float]]:
    """One row per k: how much gold the top-k filter keeps and how much stage-2 prompt it saves.

    Columns: ``k``, ``recall`` (mean share of a question's gold ids in its top-k), ``precision`` (mean share of the
    top-k that is gold), ``all_gold`` (share of questions whose gold ids all survive), ``kept`` (mean candidates
    kept) and, with a processor and preset, ``tokens_full`` / ``tokens_kept`` / ``tokens_saved`` (mean estimated
    stage-2 candidate tokens for the whole pool vs the top-k) and ``saved_fraction``. A question without gold ids or
    without candidates has no recall to measure and is left out of every column.
    """
    from .metrics import precision_at_k, recall_at_k

    # a question's gold ids and token costs are all the report needs of it: rows are read one at a time (a saved
    # split decodes every image of a row it yields) and not kept, and a saved split's unscored rows are not read
    gold_by_guid: dict[str, list[str]] = {}
    costs: dict[str, dict[str, int]] = {}
    for _, r in rows_by_guid(one_split(split_ds, "filter_report"), lambda guid: bool(scored.get(guid))):
        if r is None:
            continue
        if not list(r["gold_ids"]):
            continue
        gold_by_guid[r["guid"]] = list(r["gold_ids"])
        if processor is not None and preset is not None:
            costs[r["guid"]] = dict(zip((c["id"] for c in r["candidates"]),
                                        candidate_token_costs(processor, r["candidates"], preset)))
    if not gold_by_guid:
        raise ValueError("no question of split_ds has scores, candidates and gold ids; score it first (score_split)")
    pool_max = max(len(scored[g]) for g in gold_by_guid)
    ks = list(range(1, pool_max + 1)) if ks is None else list(ks)
    report = []
    for k in ks:
        rec, prec, allg, kept, full_t, kept_t = [], [], [], [], [], []
        for guid, gold in gold_by_guid.items():
            ranked = top_k(scored[guid], len(scored[guid]))
            kk = min(k, len(ranked))  # a pool smaller than k keeps everything: precision over what is kept
            rec.append(recall_at_k(ranked, gold, kk))
            prec.append(precision_at_k(ranked, gold, kk))
            allg.append(float(set(gold) <= set(ranked[:k])))
            kept.append(min(k, len(ranked)))
            if guid in costs:
                full_t.append(sum(costs[guid].values()))
                kept_t.append(sum(costs[guid][cid] for cid in ranked[:k]))
        n = len(gold_by_guid)
        entry: dict[str, float] = {
            "k": k, "recall": sum(rec) / n, "precision": sum(prec) / n, "all_gold": sum(allg) / n, "kept": sum(kept) / n,
        }
        if full_t:
            tf, tk = sum(full_t) / n, sum(kept_t) / n
            entry.update(tokens_full=tf, tokens_kept=tk, tokens_saved=tf - tk, saved_fraction=(tf - tk) / tf if tf else 0.0)
        report.append(entry)
    return report


def format_filter_report(report: Sequence[Mapping[str, float]]) -> str:
    """The filter report as a fixed-width table for a notebook or a log (just the header when it has no rows)."""
    cols = [c for c in ("k", "recall", "precision", "all_gold", "kept", "tokens_kept", "tokens_saved", "saved_fraction")
            if not report or c in report[0]]
    lines = ["  ".join(f"{c:>14}" for c in cols)]
    for row in report:
        lines.append("  ".join(f"{row[c]:>14.0f}" if c == "k" else f"{row[c]:>14.3f}" for c in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- on disk
def scores_path(work_dir: str | Path, split: str) -> Path:
    """``<work_dir>/stage1/scores_<split>.json`` (docs/CONTRACTS.md)."""
    return Path(work_dir) / "stage1" / f"scores_{split}.json"


def save_scores(scored: Scored, path: str | Path, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write scores as JSON (temporary name, then rename: a crash never leaves half a file).

    Layout: ``{"version", "meta", "questions": {guid: {"candidate_ids": [...], "scores": [...]}}}`` (pool order);
    a NaN score (fp16 overflow) is written as ``null`` and read back as NaN, so the file stays strict JSON.
    """
    payload = {
        "version": SCORES_FORMAT_VERSION,
        "meta": dict(meta or {}),
        "questions": {
            guid: {"candidate_ids": [cid for cid, _ in pairs], "scores": [float(s) for _, s in pairs]}
            for guid, pairs in scored.items()
        },
    }
    return write_json_atomic(path, payload, indent=1)


def load_scores_and_meta(path: str | Path) -> tuple[Scored, dict[str, Any]]:
    """Scores written by ``save_scores`` and the ``meta`` they were saved with (which judge computed them)."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    version = payload.get("version") if isinstance(payload, Mapping) else None
    if version != SCORES_FORMAT_VERSION:
        raise ValueError(f"{path}: scores format {version!r}, expected {SCORES_FORMAT_VERSION}; "
                         "score the split again (notebook 03, or `python -m mmrag_lite train-stage1`)")
    scored = {
        guid: [(str(cid), math.nan if s is None else float(s))
               for cid, s in zip(rec["candidate_ids"], rec["scores"], strict=True)]
        for guid, rec in payload["questions"].items()
    }
    return scored, dict(payload.get("meta") or {})


def load_scores(path: str | Path) -> Scored:
    """Read scores written by ``save_scores``."""
    return load_scores_and_meta(path)[0]


__all__ = [
    "DEFAULT_BATCH_SIZE", "Judgement", "Scored", "VerdictReadout", "answer_prefix", "candidate_token_costs",
    "filter_report", "format_filter_report", "image_token_count", "judge_by_generation", "load_scores",
    "load_scores_and_meta", "questions_to_score", "save_scores", "score_candidates", "score_split", "scores_path", "top_k",
    "verdict_readout", "yes_no_token_ids",
]
