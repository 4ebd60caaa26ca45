"""Turn a completion into a structured verdict, and say exactly what was malformed.

The output contract lives in ``prompts`` (our choice; the paper's prompts are not public):

    stage 1, reasoning      <think> … </think><answer>yes|no</answer>
    stage 1, no reasoning   <answer>yes|no</answer>
    stage 2, reasoning      <think> … </think><sources>D2, D5</sources><answer> … </answer>
    stage 2, no reasoning   <sources>D2, D5</sources><answer> … </answer>

The parser reads a completion as a sequence of *blocks* ``<tag> … </tag>`` and checks that the sequence is
exactly the required one. It is lenient on whitespace (between tags, around a verdict, around ids) and on the
case of a verdict or an id, strict on everything else: text outside the tags, a repeated or missing tag, a tag
left open (a truncated generation) or opened inside another block are all *problems*. ``ok`` means no problem,
and that is what the format reward pays for.

Fields are extracted best-effort but never guessed: a verdict or an answer that appears twice is ambiguous and
comes back as ``None`` (a model must not be able to hedge with ``<answer>yes</answer><answer>no</answer>``).

Every function here is pure, linear in the length of the text, and never raises, whatever it is given.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mmrag_lite.prompts import DEFAULT_TAGS, NO, YES, Tags

MAX_PROBLEMS = 20  # a 100k-character spam of one tag must not produce 100k problem objects


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a completion: a stable ``code`` for tests and counts, a ``message`` for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# The problem codes, in one place so that the notebook can list them.
PROBLEM_CODES: dict[str, str] = {
    "not_text": "the completion is not a string (or a chat message holding one)",
    "empty": "the completion is empty or only whitespace",
    "missing_tag": "a required block is absent",
    "repeated_tag": "a block appears more than once",
    "unclosed_tag": "a block is opened and never closed (often a generation cut at max_completion_length)",
    "nested_tag": "a tag is opened inside another block",
    "stray_close_tag": "a closing tag without its opening tag",
    "unexpected_tag": "a block that this format does not have (e.g. <think> when reasoning is off)",
    "text_outside_tags": "non-whitespace text before, between or after the blocks",
    "wrong_order": "the blocks are not in the required order",
    "invalid_verdict": "the stage-1 answer is not yes or no",
    "empty_answer": "the stage-2 answer is empty (no letter or digit)",
    "empty_sources": "the stage-2 sources block lists no id",
    "unknown_id": "an id that is not one of the candidates shown",
    "duplicate_id": "the same id listed twice",
}


@dataclass(frozen=True)
class Block:
    name: str
    content: str
    start: int  # offset of the opening tag
    closed: bool


class _ParseResult:
    """What both parse results share: ``ok`` when nothing was malformed, and the problem codes."""

    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(p.code for p in self.problems)


@dataclass(frozen=True)
class Stage1Parse(_ParseResult):
    """A stage-1 completion, read. ``label`` is ``"yes"``/``"no"`` or ``None`` when absent or ambiguous."""

    text: str | None
    think: str | None
    label: str | None
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class Stage2Parse(_ParseResult):
    """A stage-2 completion, read.

    ``source_ids`` keeps the model's order, drops repeats (first occurrence wins) and *keeps* ids outside the
    candidate list (they are wrong selections: the ranking reward gives them no credit but they still take a
    slot). ``None`` means the sources block is absent or ambiguous; ``()`` means it is present and empty.
    """

    text: str | None
    think: str | None
    source_ids: tuple[str, ...] | None
    answer: str | None
    problems: tuple[Problem, ...] = ()
    unknown_ids: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ completions
def completion_text(completion: Any) -> str | None:
    """The text of a completion, as TRL hands it to a reward function.

    TRL passes a plain string for standard datasets and a list of messages for conversational ones:
    ``[{"role": "assistant", "content": "..."}]``, where a VLM's ``content`` may itself be a list of parts
    ``[{"type": "text", "text": "..."}]``. Anything else gives ``None`` (reported as a ``not_text`` problem).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        if not messages:
            return None
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        texts = [_content_text(m.get("content")) for m in assistant]
        texts = [t for t in texts if t is not None]
        return "".join(texts) if texts else None
    return None


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return None


# ----------------------------------------------------------------------------------------------- blocks
@lru_cache(maxsize=32)
def _tag_regex(names: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"<(/?)({alternatives})>")


class _Problems:
    """Collects problems, once per (code, message), at most ``MAX_PROBLEMS``."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, code: str, message: str) -> None:
        key = (code, message)
        if key in self._seen or len(self.items) >= MAX_PROBLEMS:
            return
        self._seen.add(key)
        self.items.append(Problem(code, message))


def split_blocks(text: str, names: Sequence[str], problems: _Problems | None = None) -> list[Block]:
    """Cut ``text`` into ``<name>…</name>`` blocks for the given tag names, noting structural problems.

    A block's content is opaque: a known tag inside it is a ``nested_tag`` problem, kept as content.
    """
    sink = problems if problems is not None else _Problems()
    blocks: list[Block] = []
    current: tuple[str, int, int] | None = None  # (name, tag start, content start)
    last_end = 0
    for match in _tag_regex(tuple(names)).finditer(text):
        closing, name = match.group(1) == "/", match.group(2)
        if current is None:
            gap = text[last_end:match.start()]
            if gap.strip():
                sink.add("text_outside_tags", f"text outside the tags: {_snippet(gap)!r}")
            if closing:
                sink.add("stray_close_tag", f"</{name}> closes a block that was never opened")
                last_end = match.end()
                continue
            current = (name, match.start(), match.end())
            continue
        cur_name, cur_start, content_start = current
        if closing and name == cur_name:
            blocks.append(Block(cur_name, text[content_start:match.start()], cur_start, True))
            current = None
            last_end = match.end()
        else:
            tag = f"</{name}>" if closing else f"<{name}>"
            sink.add("nested_tag", f"{tag} appears inside <{cur_name}>")
    if current is not None:
        cur_name, cur_start, content_start = current
        sink.add("unclosed_tag", f"<{cur_name}> is never closed (truncated output?)")
        blocks.append(Block(cur_name, text[content_start:], cur_start, False))
    else:
        tail = text[last_end:]
        if tail.strip():
            sink.add("text_outside_tags", f"text outside the tags: {_snippet(tail)!r}")
    return blocks


def _snippet(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_structure(blocks: list[Block], required: Sequence[str], all_names: Iterable[str], sink: _Problems) -> None:
    """Every required block exactly once, nothing else, in the required order."""
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.name] = counts.get(b.name, 0) + 1
    for name in required:
        if counts.get(name, 0) == 0:
            sink.add("missing_tag", f"<{name}> block is missing")
        elif counts[name] > 1:
            sink.add("repeated_tag", f"<{name}> appears {counts[name]} times")
    for name in all_names:
        if name not in required and counts.get(name, 0):
            sink.add("unexpected_tag", f"<{name}> is not part of this format")
    order = [b.name for b in blocks if b.name in required]
    first_seen: list[str] = []
    for name in order:
        if name not in first_seen:
            first_seen.append(name)
    expected = [n for n in required if n in first_seen]
    if first_seen != expected:
        sink.add("wrong_order", f"blocks come as {' '.join(first_seen)}; expected {' '.join(required)}")


def _single(blocks: list[Block], name: str) -> Block | None:
    """The block called ``name`` when there is exactly one and it was closed; else ``None`` (absent or ambiguous)."""
    found = [b for b in blocks if b.name == name]
    return found[0] if len(found) == 1 and found[0].closed else None


def _required(tags: Tags, reasoning: bool, *rest: str) -> tuple[list[str], list[str]]:
    required = ([tags.think] if reasoning else []) + [getattr(tags, r) for r in rest]
    return required, [tags.think, tags.sources, tags.answer]


# ----------------------------------------------------------------------------------------------- stage 1
_VERDICT_STRIP = " \t\r\n.!\"'`*"


def normalize_verdict(raw: str) -> str | None:
    """``" Yes. "`` → ``"yes"``; anything that is not a bare yes/no → ``None``."""
    value = raw.strip(_VERDICT_STRIP).lower()
    return value if value in (YES, NO) else None


def parse_stage1(completion: Any, *, reasoning: bool = True, tags: Tags = DEFAULT_TAGS) -> Stage1Parse:
    """Read a stage-1 completion; ``label`` is set whenever a single, closed answer block holds yes or no."""
    text = completion_text(completion)
    if text is None:
        return Stage1Parse(None, None, None, (Problem("not_text", f"completion of type {type(completion).__name__} holds no text"),))
    if not text.strip():
        return Stage1Parse(text, None, None, (Problem("empty", "the completion is empty"),))
    sink = _Problems()
    required, names = _required(tags, reasoning, "answer")
    blocks = split_blocks(text, names, sink)
    _check_structure(blocks, required, names, sink)
    think_block = _single(blocks, tags.think)
    answer_block = _single(blocks, tags.answer)
    label = None
    if answer_block is not None:
        label = normalize_verdict(answer_block.content)
        if label is None:
            sink.add("invalid_verdict", f"verdict {_snippet(answer_block.content)!r} is not 'yes' or 'no'")
    return Stage1Parse(text, think_block.content.strip() if think_block else None, label, tuple(sink.items))


# ----------------------------------------------------------------------------------------------- stage 2
# the prompt asks for commas; a pretrained model also writes lists ("- D2", "1. D2", "D2 and D5", "D2/D5"), which
# name the same ids and are read as such: only an id that was not shown counts against a completion
_ID_SPLIT = re.compile(r"[,;\s/|&、]+|(?<=[\])}>])(?=[\[({<])")  # also between brackets: "[D1][D2]" is two ids
_ID_STRIP = "[](){}<>'\"`.:*#-•–—"
_LIST_MARKER = re.compile(r"\(?\d+[.)]|and", re.IGNORECASE)  # "1." / "2)" / "(3)" numbering, and "and"


def split_ids(raw: str) -> list[str]:
    """``"D2, D5"`` / ``"[D2][D5]"`` / ``"D2;D5"`` / ``"- D2\\n- D5"`` / ``"1. D2 2. D5"`` / ``"D2 and D5"`` /
    ``"D2/D5"`` → ``["D2", "D5"]`` (order kept, repeats kept). Full-width forms (``"D2，D5"``, ``"Ｄ２"``, as a
    Qwen model writes them after Chinese text) are read as their ASCII ones (NFKC)."""
    out = []
    for token in _ID_SPLIT.split(unicodedata.normalize("NFKC", raw)):
        if _LIST_MARKER.fullmatch(token):
            continue
        token = token.strip(_ID_STRIP)
        if token:
            out.append(token)
    return out


def parse_stage2(
    completion: Any,
    candidate_ids: Sequence[str] | None = None,
    *,
    reasoning: bool = True,
    tags: Tags = DEFAULT_TAGS,
) -> Stage2Parse:
    """Read a stage-2 completion; ids are matched to ``candidate_ids`` case-insensitively when given."""
    text = completion_text(completion)
    if text is None:
        return Stage2Parse(None, None, None, None, (Problem("not_text", f"completion of type {type(completion).__name__} holds no text"),))
    if not text.strip():
        return Stage2Parse(text, None, None, None, (Problem("empty", "the completion is empty"),))
    sink = _Problems()
    required, names = _required(tags, reasoning, "sources", "answer")
    blocks = split_blocks(text, names, sink)
    _check_structure(blocks, required, names, sink)
    think_block = _single(blocks, tags.think)
    sources_block = _single(blocks, tags.sources)
    answer_block = _single(blocks, tags.answer)

    source_ids: tuple[str, ...] | None = None
    unknown: list[str] = []
    if sources_block is not None:
        canon = None
        if candidate_ids is not None:
            canon = {str(c).strip().lower(): str(c) for c in candidate_ids if c is not None}
        seen: set[str] = set()
        ordered: list[str] = []
        for token in split_ids(sources_block.content):
            key = token.lower()
            ident = canon.get(key, token) if canon is not None else token
            if ident in seen:
                sink.add("duplicate_id", f"{ident} is listed more than once")
                continue
            seen.add(ident)
            ordered.append(ident)
            if canon is not None and key not in canon:  # once per distinct id: linear in the list's length
                unknown.append(ident)
        source_ids = tuple(ordered)
        if not ordered:
            sink.add("empty_sources", "the sources block lists no id")
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            sink.add("unknown_id", f"not among the candidates: {shown}")

    answer = None
    if answer_block is not None:
        answer = answer_block.content.strip()
        if not answer:
            sink.add("empty_answer", "the answer block is empty")
        elif not any(ch.isalnum() for ch in answer):  # "..." or "?" states nothing; it must not earn the format reward
            sink.add("empty_answer", "the answer has no letter or digit")
    return Stage2Parse(
        text, think_block.content.strip() if think_block else None, source_ids, answer, tuple(sink.items), tuple(unknown)
    )


__all__ = [
    "MAX_PROBLEMS", "PROBLEM_CODES", "Block", "Problem", "Stage1Parse", "Stage2Parse", "completion_text",
    "normalize_verdict", "parse_stage1", "parse_stage2", "split_blocks", "split_ids",
]
