"""Prompt templates and the output contract of both stages (our choice: the paper's prompts are not public).

Stage 1 (point-wise judge) sees one question and one candidate and writes

    <think> why this document does or does not help </think><answer>yes</answer>      (reasoning variant)
    <answer>no</answer>                                                               (no-reasoning variant)

Stage 2 (list-wise reasoner) sees the question and the top-k survivors, each behind a short id D1..Dk, and writes

    <think> which documents support the answer and how </think><sources>D2, D5</sources><answer>red</answer>

Tags are data (``Tags``) so a course exercise can rename them; ``parsing`` reads the same ``Tags``.
Messages follow the transformers/TRL conversational format; images travel separately, in the order of the
``{"type": "image"}`` parts.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Candidate = Mapping[str, Any]  # {"id", "modality", "title", "text", "image", "is_gold"}; see docs/CONTRACTS.md

YES, NO = "yes", "no"


@dataclass(frozen=True)
class Tags:
    think: str = "think"
    answer: str = "answer"
    sources: str = "sources"

    def open(self, name: str) -> str:
        return f"<{getattr(self, name)}>"

    def close(self, name: str) -> str:
        return f"</{getattr(self, name)}>"


DEFAULT_TAGS = Tags()

STAGE1_SYSTEM = (
    "You judge whether a document helps answer a question. "
    "{reasoning}Then give your verdict as <answer>yes</answer> or <answer>no</answer>."
)
STAGE1_REASONING_HINT = "First think briefly inside <think></think>. "

STAGE2_SYSTEM = (
    "You answer a question using the documents D1..D{k}. {reasoning}"
    "List the ids of the documents that support the answer, most useful first, inside <sources></sources>, "
    "separated by commas. Then give a short answer inside <answer></answer>."
)
STAGE2_REASONING_HINT = "First reason inside <think></think> about which documents matter and why. "


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def describe_candidate(candidate: Candidate) -> str:
    """The text shown for a candidate: the caption of an image, or the title and fact of a snippet."""
    title = (candidate.get("title") or "").strip()
    body = (candidate.get("text") or "").strip()
    if candidate.get("modality") == "image":
        return f"Image titled '{title}': {body}" if title else f"Image: {body}"
    return f"{title}: {body}" if title else body


def _has_image(candidate: Candidate) -> bool:
    return candidate.get("modality") == "image" and candidate.get("image") is not None


def stage1_messages(question: str, candidate: Candidate, *, reasoning: bool = True) -> list[Message]:
    """Point-wise prompt: one question, one candidate (its image part first, then its text)."""
    system = STAGE1_SYSTEM.format(reasoning=STAGE1_REASONING_HINT if reasoning else "")
    content: list[dict[str, str]] = []
    if _has_image(candidate):
        content.append({"type": "image"})
    content.append(_text(f"Document: {describe_candidate(candidate)}\nQuestion: {question}\nDoes the document help?"))
    return [{"role": "system", "content": [_text(system)]}, {"role": "user", "content": content}]


def stage1_images(candidate: Candidate) -> list[Any]:
    """The images of a stage-1 prompt, in the order of its image parts (``[]`` for a snippet)."""
    return [candidate["image"]] if _has_image(candidate) else []


def short_ids(k: int) -> list[str]:
    """Stage-2 ids D1..Dk: short, position-free labels the model can copy exactly."""
    return [f"D{i}" for i in range(1, k + 1)]


def stage2_messages(question: str, candidates: Sequence[Candidate], *, reasoning: bool = True) -> list[Message]:
    """List-wise prompt: every candidate behind its short id, images inline where they belong."""
    ids = short_ids(len(candidates))
    system = STAGE2_SYSTEM.format(k=len(candidates), reasoning=STAGE2_REASONING_HINT if reasoning else "")
    content: list[dict[str, str]] = []
    for sid, cand in zip(ids, candidates):
        content.append(_text(f"{sid}: "))
        if _has_image(cand):
            content.append({"type": "image"})
        content.append(_text(describe_candidate(cand) + "\n"))
    content.append(_text(f"Question: {question}"))
    return [{"role": "system", "content": [_text(system)]}, {"role": "user", "content": content}]


def stage2_images(candidates: Sequence[Candidate]) -> list[Any]:
    return [c["image"] for c in candidates if _has_image(c)]


def permutations(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct orders of ``range(n)`` (the identity excluded when possible), deterministic by seed.

    Showing the same pool in several orders keeps the model from learning "the gold one is first". The identity
    (the order the list came in: stage-1 rank) is excluded whenever ``n > 1`` and at least ``count`` other orders
    exist; otherwise (n = 2 with count >= 2, say) it is used after the others rather than repeating one, and only when
    fewer distinct orders exist than asked are orders repeated.
    """
    rng = random.Random(seed)
    identity = tuple(range(n))
    total = math.factorial(n) if n <= 12 else None  # None: more orders than anyone asks for
    skip_identity = n > 1 and (total is None or total - 1 >= count)
    orders: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    while len(orders) < count and attempts < 50 * max(count, 1):
        attempts += 1
        order = list(range(n))
        rng.shuffle(order)
        if tuple(order) in seen or (n > 1 and tuple(order) == identity):  # the identity comes last, if at all
            continue
        seen.add(tuple(order))
        orders.append(order)
    if len(orders) < count and total is not None and total <= 5040:  # unlucky draws or few orders: enumerate the rest
        rest = [list(o) for o in itertools.permutations(range(n)) if o not in seen and o != identity]
        rng.shuffle(rest)
        if not skip_identity:
            rest.append(list(identity))
        for order in rest[: count - len(orders)]:
            seen.add(tuple(order))
            orders.append(order)
    distinct = len(orders)
    while len(orders) < count:  # fewer distinct orders exist than asked (tiny n): repeat
        orders.append(list(orders[len(orders) % distinct]) if distinct else list(range(n)))
    return orders


def stage1_target(label: str, *, reasoning: bool = False, think: str = "", tags: Tags = DEFAULT_TAGS) -> str:
    """A well-formed stage-1 completion (used for worked examples, tests and the miniature's warm-up)."""
    body = f"{tags.open('answer')}{label}{tags.close('answer')}"
    return f"{tags.open('think')}{think}{tags.close('think')}{body}" if reasoning else body


def stage2_target(source_ids: Sequence[str], answer: str, *, reasoning: bool = False, think: str = "", tags: Tags = DEFAULT_TAGS) -> str:
    """A well-formed stage-2 completion."""
    body = (
        f"{tags.open('sources')}{', '.join(source_ids)}{tags.close('sources')}"
        f"{tags.open('answer')}{answer}{tags.close('answer')}"
    )
    return f"{tags.open('think')}{think}{tags.close('think')}{body}" if reasoning else body


__all__ = [
    "DEFAULT_TAGS", "NO", "YES", "Tags", "describe_candidate", "permutations", "short_ids", "stage1_images",
    "stage1_messages", "stage1_target", "stage2_images", "stage2_messages", "stage2_target",
]
