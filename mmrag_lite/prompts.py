"""Prompt templates and the output contract of both stages (our choice: the paper's prompts are not public).

Stage 1 (point-wise judge) sees one question and one candidate and writes

    <think> why this document does or does not help </think><answer>yes</answer>      (reasoning variant)
    <answer>no</answer>                                                               (no-reasoning variant)

Stage 2 (list-wise reasoner) sees the question and the top-k survivors, each behind a short id D1..Dk, and writes

    <think> which documents support the answer and how </think><sources>D2, D5</sources><answer>red</answer>

Tags are data (``Tags``) so a course exercise can rename them: the prompt builders, ``parsing`` and ``rewards`` all
take the same ``Tags``, so a renamed tag is what the prompt asks for and what the reward checks.
Messages follow the transformers/TRL conversational format; images travel separately, in the order of the
``{"type": "image"}`` parts.
"""

from __future__ import annotations

import itertools
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

    def fields(self) -> dict[str, str]:
        """``think_open``, ``think_close``, ... for filling the prompt templates below."""
        return {f"{name}_{end}": getattr(self, end)(name) for name in ("think", "answer", "sources")
                for end in ("open", "close")}


DEFAULT_TAGS = Tags()

# templates: {reasoning} takes the hint (or ""), the tag fields come from ``Tags.fields``
STAGE1_SYSTEM = (
    "You judge whether a document helps answer a question. "
    "{reasoning}Then give your verdict as {answer_open}yes{answer_close} or {answer_open}no{answer_close}."
)
STAGE1_REASONING_HINT = "First think briefly inside {think_open}{think_close}. "

STAGE2_SYSTEM = (
    "You answer a question using the documents D1..D{k}. {reasoning}"
    "List the ids of the documents that support the answer, most useful first, inside {sources_open}{sources_close}, "
    "separated by commas. Then give a short answer inside {answer_open}{answer_close}."
)
STAGE2_REASONING_HINT = "First reason inside {think_open}{think_close} about which documents matter and why. "
QUESTION_PREFIX = "Question:"  # introduces the question in both prompts; rewards finds the question after it


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


def _system(template: str, hint: str, reasoning: bool, tags: Tags, **extra: Any) -> str:
    fields = tags.fields()
    return template.format(reasoning=hint.format(**fields) if reasoning else "", **fields, **extra)


def stage1_system(*, reasoning: bool = True, tags: Tags = DEFAULT_TAGS) -> str:
    """The stage-1 system prompt: what to judge and the format to write."""
    return _system(STAGE1_SYSTEM, STAGE1_REASONING_HINT, reasoning, tags)


def stage2_system(k: int, *, reasoning: bool = True, tags: Tags = DEFAULT_TAGS) -> str:
    """The stage-2 system prompt for ``k`` documents D1..Dk."""
    return _system(STAGE2_SYSTEM, STAGE2_REASONING_HINT, reasoning, tags, k=k)


def stage1_messages(question: str, candidate: Candidate, *, reasoning: bool = True,
                    tags: Tags = DEFAULT_TAGS) -> list[Message]:
    """Point-wise prompt: one question, one candidate (its image part first, then its text)."""
    system = stage1_system(reasoning=reasoning, tags=tags)
    content: list[dict[str, str]] = []
    if _has_image(candidate):
        content.append({"type": "image"})
    content.append(_text(f"Document: {describe_candidate(candidate)}\n{QUESTION_PREFIX} {question}\n"
                         "Does the document help?"))
    return [{"role": "system", "content": [_text(system)]}, {"role": "user", "content": content}]


def stage1_images(candidate: Candidate) -> list[Any]:
    """The images of a stage-1 prompt, in the order of its image parts (``[]`` for a snippet)."""
    return [candidate["image"]] if _has_image(candidate) else []


def short_ids(k: int) -> list[str]:
    """Stage-2 ids D1..Dk: short, position-free labels the model can copy exactly."""
    return [f"D{i}" for i in range(1, k + 1)]


def stage2_messages(question: str, candidates: Sequence[Candidate], *, reasoning: bool = True,
                    tags: Tags = DEFAULT_TAGS) -> list[Message]:
    """List-wise prompt: every candidate behind its short id, images inline where they belong."""
    ids = short_ids(len(candidates))
    system = stage2_system(len(candidates), reasoning=reasoning, tags=tags)
    content: list[dict[str, str]] = []
    for sid, cand in zip(ids, candidates):
        content.append(_text(f"{sid}: "))
        if _has_image(cand):
            content.append({"type": "image"})
        content.append(_text(describe_candidate(cand) + "\n"))
    content.append(_text(f"{QUESTION_PREFIX} {question}"))
    return [{"role": "system", "content": [_text(system)]}, {"role": "user", "content": content}]


def stage2_images(candidates: Sequence[Candidate]) -> list[Any]:
    return [c["image"] for c in candidates if _has_image(c)]


def permutations(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct orders of ``range(n)``, each drawn uniformly; repeated only when fewer than ``count`` exist.

    Showing the same pool in several orders keeps the model from learning a slot. Every order is equally likely,
    the given one included: the list comes in stage-1 rank (usually gold first), and leaving its own order out would
    put the top candidate in slot D1 *less* often than chance (for two candidates and one order: never).
    """
    rng = random.Random(seed)
    if n <= 7:  # at most 5,040 orders: sample without replacement
        every = [list(o) for o in itertools.permutations(range(n))]
        orders = rng.sample(every, min(count, len(every)))
    else:  # more orders than anyone asks for: distinct shuffles
        orders, seen = [], set()
        while len(orders) < count:
            order = list(range(n))
            rng.shuffle(order)
            if tuple(order) not in seen:
                seen.add(tuple(order))
                orders.append(order)
    distinct = len(orders)
    while len(orders) < count:  # fewer distinct orders exist than asked (tiny n): repeat
        orders.append(list(orders[len(orders) % distinct]))
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
    "DEFAULT_TAGS", "NO", "QUESTION_PREFIX", "YES", "Tags", "describe_candidate", "permutations", "short_ids", "stage1_images",
    "stage1_messages", "stage1_system", "stage1_target", "stage2_images", "stage2_messages", "stage2_system",
    "stage2_target",
]
