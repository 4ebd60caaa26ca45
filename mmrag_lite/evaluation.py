"""Experiment orchestration for notebook 05: systems × metrics, ablations, robustness, the paper's reference.

What is measured (definitions live in ``metrics``; this module only orchestrates):

* **Retr-F1** — set F1 of the cited sources against the gold sources, averaged over questions.
* **QA-Acc** — WebQA's category-aware keyword accuracy (F1 for color/shape/number/YesNo, recall otherwise).
* **QA-FL** — BARTScore fluency; it needs BART-large-CNN, so offline it is reported as *unavailable*, and so is
  **QA** = mean(FL_i · Acc_i), which depends on it. We never substitute a made-up number.
* **MMQA EM / F1** — DROP-style answer metrics on the MultimodalQA dev questions whose pool has images and text.
  Image candidates carry pixels where the release's ``final_dataset_images/`` folder sits beside the questions.
  Offline there are no MMQA pixels and no passage texts, so the pools hold the image candidates only, as their
  titles: retrieval compares the question with image titles, a weaker setting than the paper's; the table says so.

Systems (``pipeline.standard_systems``): zero-shot (all candidates, or the base judge's top-k), stage 1
only, stage 1 + stage 2, and the oracle filter (every gold candidate guaranteed in the stage-1 top-k).
Ablations: k and reasoning on/off at inference time (cheap, same weights), and stage 2 *retrained* per variant
(no ranking reward, no answer reward, reasoning flipped: ``retrained_stage2_ablation``; about a minute on cpu-tiny,
opt-in on a GPU, where ``add_retrained_ablations`` runs them alone and merges their table into the saved report).
Robustness injects adversarial distractors (``inject_distractors``) and reports the drop, how often the trap was
taken, and how often its wrong answer was echoed beside how often the clean answers say it anyway, per wording of
the trap.

Everything lands in ``<work_dir>/eval/``: ``results.md`` (the main table first), ``results.json`` (strict JSON:
NaN is ``null``; a figure not computed is the string saying why, ``UNAVAILABLE`` or ``NOT_RUN``), one submission
and one full-predictions file per system of the report (those of other systems, from an earlier run, are removed).
``evaluate`` and notebook 05 assemble the report through the same ``build_report``, so both write the same files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shlex
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mmrag_lite import data
from mmrag_lite.atomic import write_json_atomic, write_text_atomic
from mmrag_lite.config import ConfigError, Preset
from mmrag_lite.pipeline import (
    FILTER_JUDGE,
    ModelBank,
    PipelineResult,
    SystemSpec,
    run_pipeline,
    save_results,
    standard_systems,
    submission_from_results,
    write_submission,
)

Row = Mapping[str, Any]
UNAVAILABLE = "unavailable offline"
NOT_RUN = "—"
RETRAINED_ABLATION_TITLE = "stage 2 retrained per variant (reward weights, reasoning)"
K_ABLATION_TITLE = "k (stage-1 top-k, inference only)"
REASONING_ABLATION_TITLE = "reasoning in stage 2 (inference only)"
# MMQA columns x100, as published. "well-formed" (WebQA completions the format reward would pay) says how far a
# row's Retr-F1 reflects retrieval rather than format: a completion citing an id that is not shown cites nothing.
MAIN_COLUMNS = ("system", "Retr-F1", "QA-Acc", "QA-FL", "QA", "MMQA EM", "MMQA F1", "well-formed", "gold recall of kept", "n")

# The paper's reported numbers (arXiv 2512.17194) and the official baseline's: theirs, on their models and data, never ours.
PAPER_REFERENCE: tuple[dict[str, Any], ...] = (
    {"source": "MMRAG-RFT paper (arXiv 2512.17194), WebQA (split not verified)", "metric": "QA-FL", "value": 0.708},
    {"source": "MMRAG-RFT paper (arXiv 2512.17194), WebQA (split not verified)", "metric": "QA-Acc", "value": 0.763},
    {"source": "MMRAG-RFT paper (arXiv 2512.17194), WebQA (split not verified)", "metric": "QA", "value": 0.583},
    {"source": "MMRAG-RFT paper (arXiv 2512.17194), MultimodalQA", "metric": "EM gain over previous best", "value": "+4.7"},
    {"source": "MMRAG-RFT paper (arXiv 2512.17194), MultimodalQA", "metric": "F1 gain over previous best", "value": "+12.7"},
    {"source": "WebQA official baseline VLP+x101fpn, val image questions", "metric": "Retr-F1 / QA-FL / QA-Acc / QA", "value": "0.680 / 0.465 / 0.451 / 0.242"},
    {"source": "WebQA official baseline VLP+x101fpn, val text questions", "metric": "Retr-F1 / QA-FL", "value": "0.701 / 0.261"},
)


# ------------------------------------------------------------------------------------------ tables
def fmt(value: Any, digits: int = 3) -> str:
    """A cell: floats to ``digits`` places, None → em dash, strings as they are."""
    if value is None:
        return NOT_RUN
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return NOT_RUN if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(text: str) -> str:
    """One markdown cell: a ``|`` would open a column and a line break end the row (model answers hold both)."""
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", " ⏎ ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub markdown for a list of dict rows (pure)."""
    if not rows:
        return "(no rows)\n"
    # a nested table (robustness's "by form") is no cell: it is shown as a table of its own (robustness_markdown)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k, v in r.items()
                                                            if not isinstance(v, (list, dict))))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(fmt(r.get(c))) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def paper_reference_table() -> tuple[list[dict[str, Any]], str]:
    """The paper's (and the official baseline's) reported numbers, as rows and markdown, labelled as theirs."""
    rows = [dict(r) for r in PAPER_REFERENCE]
    md = ("**Reported by others, not measured here** (their models, their data):\n\n"
          + markdown_table(rows, ("source", "metric", "value")))
    return rows, md


# ------------------------------------------------------------------------------------------ metric adapters
def webqa_references(rows: Iterable[Row]) -> dict[str, dict[str, Any]]:
    """References in the shape ``metrics.evaluate_webqa_submission`` reads, from Mini-WebQA rows."""
    return {
        str(r["guid"]): {"gold_ids": [str(s) for s in r["gold_ids"]], "answer": str(r["answer"]),
                         "keywords": str(r.get("keywords") or ""), "qcate": str(r.get("qcate") or "text")}
        for r in rows
    }


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def score_webqa(results: Sequence[PipelineResult], rows: Sequence[Row], *, fluency_scorer: Any = None) -> dict[str, Any]:
    """Retr-F1, QA-Acc, QA-FL, QA (+ per category) of one system's predictions through ``metrics``.

    Questions in ``rows`` without a prediction score 0 (as in the official script).
    """
    from mmrag_lite import metrics

    report = metrics.evaluate_webqa_submission(submission_from_results(results), webqa_references(rows),
                                               fluency_scorer=fluency_scorer)
    return flatten_webqa_report(report)


def flatten_webqa_report(report: Any) -> dict[str, Any]:
    """The ``All`` row as table columns, plus the per-category rows; FL/QA are ``UNAVAILABLE`` without BART."""

    def cols(r: Mapping[str, Any]) -> dict[str, Any]:
        fl, qa = _num(r.get("fl")), _num(r.get("qa"))
        return {"Retr-F1": _num(r.get("retrieval_f1")), "QA-Acc": _num(r.get("acc")),
                "QA-FL": UNAVAILABLE if fl is None else fl, "QA": UNAVAILABLE if qa is None else qa}

    overall = report.overall
    out: dict[str, Any] = {"n": int(overall.get("n", 0)), **cols(overall)}
    out["per_category"] = [{"qcate": r["group"], "n": r["n"], **cols(r)} for r in report.rows]
    return out


def mmqa_references(rows: Iterable[Row]) -> dict[str, dict[str, Any]]:
    """``{qid: {"answers": [...], "type": ...}}`` for ``metrics.evaluate_mmqa_submission``."""
    return {str(r["guid"]): {"answers": _gold_answers(r), "type": str(r.get("qtype") or r.get("qcate") or "unknown")} for r in rows}


def score_mmqa(results: Sequence[PipelineResult], rows: Sequence[Row]) -> dict[str, Any]:
    """MMQA EM / F1, ×100 as MultimodalQA and the paper print them."""
    from mmrag_lite import metrics

    report = metrics.evaluate_mmqa_submission({r.guid: r.answer for r in results}, mmqa_references(rows))
    overall = report.overall
    em, f1 = _num(overall.get("em")), _num(overall.get("f1"))
    return {"MMQA EM": None if em is None else 100 * em, "MMQA F1": None if f1 is None else 100 * f1, "n_mmqa": int(overall.get("n", 0))}


def _gold_answers(row: Row) -> list[str]:
    answers = row.get("answers")
    if answers:
        return [str(a.get("answer") if isinstance(a, Mapping) else a) for a in answers]
    return [str(row["answer"])] if row.get("answer") else []  # none: left out, as the official script does


# ------------------------------------------------------------------------------------------ robustness
AttackKind = Literal["conflicting", "lexical"]
COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "pink", "gray")
SHAPES = ("round", "square", "rectangular", "triangular", "oval", "circular", "flat", "pointed")
_NUM = re.compile(r"\d+(?:\.\d+)?")


NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
FALLBACK_WRONG = "another question's answer (fallback)"
# Capitalised words that start a sentence or answer without naming anything.
_NOT_NAMES = {"the", "a", "an", "yes", "no", "it", "its", "this", "that", "these", "those", "there", "they", "he", "she",
              "in", "on", "at", "of", "and", "or", "but", "i", "we", "you", "both", "neither", "either"}
# Words that lead into an option of a "X or Y?" question without being part of it.
_LEAD_WORDS = {"the", "a", "an", "is", "are", "was", "were", "does", "do", "did", "which", "whether", "between",
               "either", "who", "what", "has", "have", "more", "less", "fewer"}
_ARTICLES = {"the", "a", "an"}


@dataclass(frozen=True)
class WrongAnswer:
    """A conflicting document's answer and how it was made (``how`` is ``FALLBACK_WRONG`` when no rule applied)."""

    text: str
    how: str


def _has_phrase(text: str, phrase: str) -> bool:
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _replace_phrase(text: str, old: str, new: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", lambda _: new, text, flags=re.IGNORECASE)


def _strip_lead(words: Sequence[str]) -> list[str]:
    words = list(words)
    while words and words[0].lower() in _LEAD_WORDS:
        words.pop(0)
    return words


def choice_options(question: str) -> tuple[str, str] | None:
    """The two options of a ``choose`` question (``"Which is taller, the A or the B?"`` → ``("A", "B")``), or None.

    The left option is what follows the last comma/colon before the last " or ", the right one what precedes the
    next comma, both without leading articles and question words. A heuristic: ``other_option_answer`` aligns
    these with the gold answer before trusting them.
    """
    q = question.strip().rstrip("?").strip()
    cuts = list(re.finditer(r"\s+or\s+", q, flags=re.IGNORECASE))
    if not cuts:
        return None
    left = re.split(r"[,:;]", q[: cuts[-1].start()])[-1].split()
    right = re.split(r"[,:;]", q[cuts[-1].end():])[0].split()
    lw, rw = _strip_lead(left), _strip_lead(right)
    # A named option ("the Tower of London") sheds the lowercase words around it ("more windows on", "taller").
    if any(w[:1].isupper() for w in lw):
        while lw and not lw[0][:1].isupper():
            lw.pop(0)
    if any(w[:1].isupper() for w in rw):
        while rw and not rw[-1][:1].isupper():
            rw.pop()
    # A plain option beside a name ("the Royal Theater of Ravi orange or black"): as many plain words as the
    # other option has, from the side that touches " or ".
    if lw and rw and not any(w[:1].isupper() for w in rw) and not lw[-1][:1].isupper():
        lw = _plain_run(lw[::-1], len(rw))[::-1]
    elif lw and rw and not any(w[:1].isupper() for w in lw) and not rw[0][:1].isupper():
        rw = _plain_run(rw, len(lw))
    return (" ".join(lw), " ".join(rw)) if lw and rw else None


def _plain_run(words: Sequence[str], limit: int) -> list[str]:
    """The first ``limit`` words of ``words``, stopping at a capitalised one (a name)."""
    out = []
    for w in words[:limit]:
        if w[:1].isupper():
            break
        out.append(w)
    return out


def other_option_answer(question: str, answer: str, keywords: str = "") -> str | None:
    """The gold answer turned to the *other* option of a ``choose`` question (pure), or None when it cannot be.

    When the answer names both options ("A is taller than B") they are swapped ("B is taller than A"); when it
    names one, that one is replaced by the other; a bare keyword answer becomes the other option.
    """
    q = question.strip().rstrip("?").strip()
    cuts = list(re.finditer(r"\s+or\s+", q, flags=re.IGNORECASE))
    opts = choice_options(question)
    if not cuts or opts is None:
        return None
    left_words = q[: cuts[-1].start()].split()
    right_words = q[cuts[-1].end():].split()

    def longest(words: list[str], suffix: bool) -> str | None:  # the longest stretch next to " or " the answer names
        for n in range(len(words), 0, -1):
            part = " ".join(_strip_lead(words[-n:] if suffix else words[:n])).strip(",;:")
            if part and part.lower() not in _LEAD_WORDS and _has_phrase(answer, part):
                return part
        return None

    def counterpart(part: str, other_words: list[str], after: bool) -> str | None:
        """The other side's stretch for a word the answer names beside " or " ("taller" of "Is X taller or shorter
        than Y?"): the words across it up to where the answer's own next ("than") or, for the right side, previous
        word reappears; None when it does not (the parsed option is used then)."""
        found = re.search(rf"(?<!\w){re.escape(part)}(?!\w)", answer, flags=re.IGNORECASE)
        if found is None:
            return None
        beside = re.findall(r"[\w'-]+", answer[found.end():] if after else answer[: found.start()])
        if not beside:
            return None
        word = (beside[0] if after else beside[-1]).lower()
        lower = [w.lower() for w in other_words]
        before = re.findall(r"[\w'-]+", answer[: found.start()])
        for n in range(1, min(len(other_words), len(part.split()) + 3)):
            if (lower[n] if after else lower[-n - 1]) == word:
                stretch = other_words[:n] if after else other_words[-n:]
                if before and before[-1].lower() in _ARTICLES:  # "the" + "the hind legs": one article
                    stretch = [w for i, w in enumerate(stretch) if i or w.lower() not in _ARTICLES]
                return " ".join(stretch) or None
        return None

    left, right = longest(left_words, True), longest(right_words, False)
    if left and right and left.lower() != right.lower():
        marker = "\x00"
        out = _replace_phrase(_replace_phrase(answer, left, marker), right, left).replace(marker, right)
    elif left:
        out = _replace_phrase(answer, left, counterpart(left, right_words, True) or opts[1])
    elif right:
        out = _replace_phrase(answer, right, counterpart(right, left_words, False) or opts[0])
    elif keywords and _has_phrase(opts[0], keywords):
        out = opts[1]
    elif keywords and _has_phrase(opts[1], keywords):
        out = opts[0]
    else:
        return None
    return out if out.strip().lower() != answer.strip().lower() else None


def _name_spans(text: str) -> list[tuple[str, str]]:
    """Runs of capitalised words (``Hiro Ravison``, ``Malmo``), leading non-names (``The``) dropped, each with the
    word before it (``by``, ``in``): a name after the same word most likely plays the same role."""
    spans = []
    for m in re.finditer(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*", text):
        words = m.group(0).split()
        while words and words[0].lower() in _NOT_NAMES:
            words.pop(0)
        if words:
            before = re.findall(r"[A-Za-z]+", text[: m.start()])
            spans.append((" ".join(words), before[-1].lower() if before else ""))
    return spans


def perturb_answer(answer: str, question: str, other_answers: Sequence[str], rng: random.Random) -> WrongAnswer | None:
    """The gold answer with one fact changed, tried in order (None when none applies):

    a number (a year moves by a few years, another number by a few units), a number word (``five`` → ``two``), the
    names the question does not already contain (each replaced by a name from the other questions' answers,
    preferably one after the same word: "by X" by another founder, "in Y" by another place), a colour.
    What the question itself names (the subject) is never changed, so the sentence stays about the same thing.
    """
    for m in re.finditer(r"\d+", answer):
        if _has_phrase(question, m.group(0)):
            continue
        value = int(m.group(0))
        step = rng.choice([1, 2, 3, 5, 10]) if 1000 <= value <= 2100 else rng.choice([1, 2, 3, 7])
        new = value - step if 1000 <= value <= 2100 and rng.random() < 0.5 else value + step
        return WrongAnswer(answer[: m.start()] + str(new) + answer[m.end():], "changed number")
    for m in re.finditer(r"[A-Za-z]+", answer):
        word = m.group(0)
        if word.lower() in NUMBER_WORDS and not _has_phrase(question, word):
            new = rng.choice([w for w in NUMBER_WORDS[:10] if w != word.lower()])
            new = new.capitalize() if word[0].isupper() else new
            return WrongAnswer(answer[: m.start()] + new + answer[m.end():], "changed number")
    names = [(n, b) for n, b in dict.fromkeys(_name_spans(answer)) if not _has_phrase(question, n)]
    if names:
        pool = [(n, b) for a in other_answers for n, b in _name_spans(a or "")
                if not _has_phrase(answer, n) and not _has_phrase(question, n)]
        pool = list(dict.fromkeys(pool))
        if pool:
            out, used = answer, set()
            for name, before in names:
                free = [p for p in pool if p[0] not in used] or pool
                best = ([p for p in free if p[1] == before and len(p[0].split()) == len(name.split())]
                        or [p for p in free if p[1] == before] or [p for p in free if len(p[0].split()) == len(name.split())]
                        or free)
                new = rng.choice(sorted({p[0] for p in best}))
                used.add(new)
                out = _replace_phrase(out, name, new)
            if out != answer:
                return WrongAnswer(out, "changed name")
    for m in re.finditer(r"[A-Za-z]+", answer):
        if m.group(0).lower() in COLORS and not _has_phrase(question, m.group(0)):
            new = rng.choice([c for c in COLORS if c != m.group(0).lower()])
            return WrongAnswer(answer[: m.start()] + new + answer[m.end():], "changed colour")
    return None


def conflicting_answer(row: Row, other_answers: Sequence[str], rng: random.Random) -> WrongAnswer:
    """A plausible but wrong answer of the right type for ``row``, and how it was made.

    YesNo → flipped; color / shape / number → another one; choose → the other option named in the question
    (``other_option_answer``); text / Others (and a choose question whose options cannot be read) → the gold answer
    with a year, number, name or colour changed (``perturb_answer``). Each must score lower than the gold answer
    under the official accuracy (a swap that keeps every word is no wrong answer to it). Only when none of these
    applies: another question's answer, marked ``FALLBACK_WRONG`` so the report can count it.
    """
    from mmrag_lite import metrics

    answer = str(row.get("answer") or "")
    low = answer.lower()
    qcate = str(row.get("qcate") or "")
    question = str(row.get("question") or "")
    words = set(re.findall(r"[a-z]+", low))
    reference = metrics.qa_reference(answer, row.get("keywords"))

    def scores_below_gold(wrong: WrongAnswer | None) -> bool:
        """The official accuracy must tell the wrong answer from the gold one: swapping both options of "red and
        white" or of "A is taller than B" keeps every word, and echoing it would score like the gold answer."""
        if wrong is None:
            return False
        got, gold = metrics.webqa_accuracy_batch([wrong.text, answer], [reference] * 2,
                                                 [metrics.canonical_qcate(qcate) or "text"] * 2)
        return got < gold or gold == 0.0  # a gold answer its own reference scores 0 leaves the metric nothing to tell

    if qcate == "YesNo":
        return WrongAnswer("No" if low.startswith("yes") else "Yes", "flipped yes/no")
    if qcate in ("color", "shape", "number"):  # each draw checked by the official accuracy: "square" is "squares"
        if qcate == "number":
            nums = [float(x) for x in _NUM.findall(metrics.normalize_webqa_many([answer])[0])]  # "four" -> 4
            base = int(nums[0]) if nums else rng.randint(2, 9)
            options, how = [str(base + step) for step in (1, 2, 3, 7)], "other number"
        else:
            vocab, how = (COLORS, "other colour") if qcate == "color" else (SHAPES, "other shape")
            options = [w for w in vocab if w not in words]
        scores = metrics.webqa_accuracy_batch(options, [reference] * len(options), [qcate] * len(options))
        wrong = [o for o, acc in zip(options, scores) if acc == 0.0]
        if wrong:
            return WrongAnswer(rng.choice(wrong), how)
    if qcate == "choose":
        other = other_option_answer(question, answer, str(row.get("keywords") or ""))
        if other and scores_below_gold(WrongAnswer(other, "other option")):
            return WrongAnswer(other, "other option")
    changed = perturb_answer(answer, question, other_answers, rng) if answer else None
    if scores_below_gold(changed):
        return changed
    pool = [a for a in other_answers if a and a.strip().lower() != low]
    return WrongAnswer(rng.choice(pool) if pool else "none of the above", FALLBACK_WRONG)


STATEMENT_HOWS = frozenset({"changed number", "changed name", "changed colour"})  # perturb_answer: whole sentences
# The two forms a conflicting document takes (``trap_form``); robustness_check reports its traps per form.
FORM_STATEMENT = "statement"
FORM_RESTATED = "restates the question"


def trap_form(wrong: WrongAnswer | str) -> str:
    """How ``conflicting_text`` words this wrong answer (pure): ``FORM_STATEMENT``, a sentence that stands alone (the
    gold answer with one fact changed, or with the other option in it), or ``FORM_RESTATED``, "<question>? The answer
    is <wrong>." (a short answer, a bare option, another question's answer), which shares the question's words."""
    how = wrong.how if isinstance(wrong, WrongAnswer) else ""
    text = (wrong.text if isinstance(wrong, WrongAnswer) else wrong).strip()
    sentence = text.rstrip(".!? ")
    # the other option written into the gold *sentence* ("The B is taller.") is a statement too; a bare option is not
    statement = bool(text) and (how in STATEMENT_HOWS
                                or (how == "other option" and text.endswith(".") and len(sentence.split()) >= 3))
    return FORM_STATEMENT if statement else FORM_RESTATED


def conflicting_text(question: str, wrong: WrongAnswer | str) -> str:
    """What a conflicting document says (pure). A wrong *sentence* (the gold answer with one fact changed, or with
    the other option in it) stands alone, as a fact would; a short wrong answer ("No", "green") needs its question to
    mean anything, so it is stated as the answer to it, which also shares the question's words (``trap_form`` says
    which; ``robustness_check`` reports kept / cited / echoed per form)."""
    text = (wrong.text if isinstance(wrong, WrongAnswer) else wrong).strip()
    if not text:
        return f"{question.strip().rstrip('?')}? Not in this document."
    sentence = text.rstrip(".!? ")
    if trap_form(wrong) == FORM_STATEMENT:
        return f"{sentence}."
    return f"{question.strip().rstrip('?')}? The answer is {sentence}."


def inject_distractors(row: Row, kind: AttackKind, *, wrong_answer: WrongAnswer | str = "", seed: int = 0,
                       n: int = 1) -> dict[str, Any]:
    """A copy of ``row`` with ``n`` adversarial, non-gold candidates inserted at random positions (pure).

    * ``conflicting``: looks like a gold document (its title; for an image question, the gold image itself) but
      its text *states a wrong answer* — does the model trust a confident caption over the evidence?
    * ``lexical``: copies the question's own words and says nothing useful — does the judge just match words?

    Injected ids start with ``adv-`` so the report can tell when a trap was kept, cited or echoed.
    """
    rng = random.Random(f"{seed}-{row['guid']}-{kind}")
    cands = [dict(c) for c in row["candidates"]]
    gold = [c for c in cands if c.get("is_gold")] or cands[:1]
    distractors = [c for c in cands if not c.get("is_gold")] or cands
    question = str(row["question"]).strip().rstrip("?")
    for i in range(n):
        template = gold[i % len(gold)]
        if kind == "conflicting":
            text = conflicting_text(question, wrong_answer)
            new = {"id": f"adv-conflicting-{row['guid']}-{i}", "modality": template.get("modality", "text"),
                   "title": template.get("title", ""), "text": text, "image": template.get("image"), "is_gold": False}
        elif kind == "lexical":
            other = distractors[i % len(distractors)]
            new = {"id": f"adv-lexical-{row['guid']}-{i}", "modality": other.get("modality", "text"),
                   "title": question, "text": f"{question} {question.lower()}", "image": other.get("image"), "is_gold": False}
        else:
            raise ValueError(f"unknown attack kind {kind!r}; choose 'conflicting' or 'lexical'")
        cands.insert(rng.randint(0, len(cands)), new)
    out = dict(row)
    out["candidates"] = cands
    out["gold_ids"] = list(row["gold_ids"])
    out["adversarial_answer"] = wrong_answer.text if isinstance(wrong_answer, WrongAnswer) else wrong_answer
    return out


def attack_rows(rows: Sequence[Row], kind: AttackKind, *, seed: int = 0) -> list[dict[str, Any]]:
    """Inject one ``kind`` distractor into every row; the wrong answer is chosen per question type
    (``conflicting_answer``; how it was made is kept as ``adversarial_answer_how``, how it is worded as
    ``adversarial_form``: ``trap_form``)."""
    rng = random.Random(seed)
    answers = [str(r.get("answer") or "") for r in rows]
    out = []
    for r in rows:
        wrong = conflicting_answer(r, answers, rng) if kind == "conflicting" else WrongAnswer("", "")
        attacked = inject_distractors(r, kind, wrong_answer=wrong, seed=seed)
        attacked["adversarial_answer_how"] = wrong.how
        attacked["adversarial_form"] = trap_form(wrong) if kind == "conflicting" else ""
        out.append(attacked)
    return out


def fallback_share(attacked: Sequence[Row]) -> float:
    """Share of attacked rows whose conflicting answer is another question's (no rule of the right type applied)."""
    return sum(r.get("adversarial_answer_how") == FALLBACK_WRONG for r in attacked) / max(len(attacked), 1)


_TYPED_WORDS = frozenset({"yes", "no", *COLORS, *SHAPES, *NUMBER_WORDS})  # what a short wrong answer replaces


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())) - _ARTICLES


def echoes_wrong_answer(said: str, wrong: str, answer: str, keywords: Any = "") -> bool:
    """Whether an answer repeats the conflicting document's wrong fact (pure): it holds every word the wrong answer
    adds to the gold one ("1812" for "1809", "sideways" for "upwards", "No") and none of the gold reference's words
    the wrong answer lacks. So "founded in 1812" echoes "... was founded in 1812." without its period and wording,
    and "Yes, there is no cloud" does not echo "No". A wrong answer that adds no word is matched whole.

    Words are compared after WebQA's normalisation (``metrics.normalize_webqa_many``: number words to digits,
    lemmas), the one QA-Acc reads: "There are eleven circles." echoes the trap "11", as QA-Acc scores it 11."""
    from mmrag_lite import metrics

    reference = metrics.qa_reference(answer, keywords)
    said_n, wrong_n, answer_n, reference_n = metrics.normalize_webqa_many([said, wrong, answer, reference])
    said_w, wrong_w, answer_w = _words(said_n), _words(wrong_n), _words(answer_n)
    new = wrong_w - answer_w
    if not new:
        return any(bool(w.strip()) and re.search(rf"(?<!\w){re.escape(w.strip().lower())}(?!\w)", t.lower()) is not None
                   for w, t in ((wrong, said), (wrong_n, said_n)))  # \b fails after "."
    gone = _words(reference_n) - wrong_w
    if not wrong_w & answer_w:  # a short answer ("No", "blue", "5") against a sentence without keyword:
        gone = {w for w in gone if w in _TYPED_WORDS or w[:1].isdigit()}  # only its yes/no, colour, shape or number
    return new <= said_w and not gone & said_w


def trap_rates(results: Sequence[PipelineResult], attacked: Sequence[Row]) -> dict[str, float]:
    """How often the injected document was kept by stage 1, cited in ``<sources>``, and its wrong answer echoed.

    Shares are over the attacked questions with a prediction (as in ``slot_table``); a result for a question that
    was not attacked counts nowhere. Given clean predictions (made without the trap), "wrong answer echoed" is how
    often the answer says the trap's wrong fact *anyway* (a model that answers "Yes" to everything echoes every
    "Yes" trap): ``robustness_check`` reports that baseline beside the attacked share."""
    by = {str(r["guid"]): r for r in attacked}
    kept = cited = echoed = 0
    n = n_echo = 0
    for res in results:
        row = by.get(res.guid)
        if row is None:
            continue
        n += 1
        kept += any(i.startswith("adv-") for i in res.kept_ids)
        cited += any(str(i).startswith("adv-") for i in res.sources)
        wrong = str(row.get("adversarial_answer") or "").strip()
        if wrong:
            n_echo += 1
            echoed += echoes_wrong_answer(res.answer, wrong, str(row.get("answer") or ""), row.get("keywords"))
    n = max(n, 1)
    return {"trap kept (top-k)": kept / n, "trap cited": cited / n,
            "wrong answer echoed": (echoed / n_echo) if n_echo else float("nan")}


ECHO_CLEAN = "echoed on clean run"  # the clean answers scored against the same wrong answers: the echo's baseline
ECHO_DELTA = "Δ echoed"  # attacked − clean: the echoes the trap caused


def _echo_columns(results: Sequence[PipelineResult], clean: Sequence[PipelineResult],
                  attacked: Sequence[Row]) -> dict[str, float]:
    """``trap_rates`` of the attacked run, plus the clean run's echo of the same wrong answers and the difference."""
    rates = trap_rates(results, attacked)
    base = trap_rates(clean, attacked)["wrong answer echoed"]
    echoed = rates["wrong answer echoed"]
    return {**rates, ECHO_CLEAN: base, ECHO_DELTA: echoed - base}


def trap_forms_table(results: Sequence[PipelineResult], clean: Sequence[PipelineResult],
                     attacked: Sequence[Row]) -> list[dict[str, Any]]:
    """The conflicting traps per wording (``trap_form``: a statement standing alone, or the question restated with
    the wrong answer, which shares the question's words): how many, kept, cited, echoed (attacked, clean, Δ)."""
    found = {str(r.get("adversarial_form") or "") for r in attacked} - {""}
    out = []
    for form in [f for f in (FORM_STATEMENT, FORM_RESTATED) if f in found] + sorted(found - {FORM_STATEMENT, FORM_RESTATED}):
        rows = [r for r in attacked if r.get("adversarial_form") == form]
        guids = {str(r["guid"]) for r in rows}
        out.append({"trap form": form, "n": len(rows),
                    **_echo_columns([r for r in results if r.guid in guids], [r for r in clean if r.guid in guids], rows)})
    return out


def robustness_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The robustness table, then the conflicting traps per wording (each row's ``"by form"``) as a table of its own."""
    parts = [markdown_table(rows)]
    for row in rows:
        if row.get("by form"):
            parts.append(f"\n{row['distractor']} traps by wording (a statement standing alone, or the question restated "
                         f"with the wrong answer, which shares its words):\n\n" + markdown_table(row["by form"]))
    return "".join(parts)


# ------------------------------------------------------------------------------------------ report
@dataclass
class EvalReport:
    """Everything notebook 05 shows; ``to_dict`` is what ``eval/results.json`` holds."""

    preset: str
    data_source: str | None = None  # data.mini_webqa_source: "synthetic world" or "WebQA files"
    table: list[dict[str, Any]] = field(default_factory=list)
    per_category: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ablations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    robustness: list[dict[str, Any]] = field(default_factory=list)
    slots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per system: gold vs cited D-slot
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, list[PipelineResult]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> EvalReport:
        """A report read back from ``results.json`` (``to_dict``), without its predictions (they are files of their own)."""
        return cls(preset=str(saved.get("preset") or ""), data_source=saved.get("data_source"),
                   table=[dict(r) for r in saved.get("table") or []],
                   per_category={k: list(v) for k, v in (saved.get("per_category") or {}).items()},
                   ablations={k: list(v) for k, v in (saved.get("ablations") or {}).items()},
                   robustness=[dict(r) for r in saved.get("robustness") or []],
                   slots={k: list(v) for k, v in (saved.get("slots") or {}).items()},
                   notes=list(saved.get("notes") or []), timings=dict(saved.get("timings_s") or {}))

    def to_dict(self) -> dict[str, Any]:
        ref_rows, _ = paper_reference_table()
        return {"preset": self.preset, "data_source": self.data_source, "table": self.table,
                "per_category": self.per_category, "ablations": self.ablations,
                "robustness": self.robustness, "slots": self.slots, "notes": self.notes, "timings_s": self.timings,
                "paper_reference (reported by the paper, not measured here)": ref_rows}

    def markdown(self) -> str:
        on = f", Mini-WebQA from the {self.data_source}" if self.data_source else ""
        parts = [f"## Results ({self.preset}{on})\n", markdown_table(self.table, MAIN_COLUMNS)]
        if self.notes:
            parts.append("\nNotes:\n" + "".join(f"- {n}\n" for n in self.notes))
        for name, rows in self.ablations.items():
            parts.append(f"\n### Ablation: {name}\n\n" + markdown_table(rows))
        if self.robustness:
            parts.append("\n### Robustness: adversarial distractors\n\n" + robustness_markdown(self.robustness))
        for name, rows in self.per_category.items():
            if rows:
                parts.append(f"\n### Per question category: {name}\n\n" + markdown_table(rows))
        for name, rows in self.slots.items():
            if rows:
                parts.append(f"\n### Where the gold sat vs which slot was cited: {name}\n\n" + markdown_table(rows))
        parts.append("\n### The paper's reported numbers (reference only)\n\n" + paper_reference_table()[1])
        return "".join(parts)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_systems(rows: Sequence[Row], preset: Preset, bank: ModelBank, systems: Sequence[SystemSpec], *, split: str | None = None,
                progress: bool = True, batch_size: int | None = None) -> dict[str, list[PipelineResult]]:
    """Each system's predictions on the same questions (models are loaded once per weight set by ``bank``).

    The stage-1 scores the first system ranked by the stage-1 judge computed are handed to the later ones
    ("stage 1 + stage 2", the oracle filter): the same judge on the same pools, scored once.
    """
    out: dict[str, list[PipelineResult]] = {}
    stage1: dict[str, dict[str, float]] | None = None
    for s in systems:
        shared = stage1 if FILTER_JUDGE.get(s.filter) == "stage1" else None
        out[s.name] = run_pipeline(rows, preset, system=s, bank=bank, split=split, progress=progress,
                                   batch_size=batch_size, scores=shared)
        if shared is None and FILTER_JUDGE.get(s.filter) == "stage1":
            stage1 = scores_of(out[s.name]) or None
    return out


def systems_table(preds: Mapping[str, Sequence[PipelineResult]], rows: Sequence[Row], *, mmqa_preds: Mapping[str, Sequence[PipelineResult]] | None = None,
                  mmqa_rows: Sequence[Row] = (), fluency_scorer: Any = None) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """One row per system (WebQA columns + MMQA columns) and the per-category breakdowns (pure given predictions).

    "gold recall of kept" is what reached stage 2: the filter's top-k, or every candidate that fitted the prompt budget
    (``fit_prompt`` drops the last ones of an over-long pool, gold or not), so a row's Retr-F1 is read against it."""
    table, cats = [], {}
    for name, res in preds.items():
        w = score_webqa(res, rows, fluency_scorer=fluency_scorer)
        cats[name] = w.pop("per_category")
        row = {"system": name, **w, "well-formed": well_formed_rate(res), "gold recall of kept": gold_recall_of_kept(res, rows)}
        if mmqa_preds and name in mmqa_preds and mmqa_rows:
            m = score_mmqa(mmqa_preds[name], mmqa_rows)
            row["MMQA EM"], row["MMQA F1"], row["n_mmqa"] = m["MMQA EM"], m["MMQA F1"], m["n_mmqa"]
        else:
            row["MMQA EM"] = row["MMQA F1"] = NOT_RUN
        table.append(row)
    return table, cats


def accuracy_reference_note(rows: Sequence[Row]) -> str:
    """What QA-Acc compared against, counted: the public ``WebQA_train_val.json`` has no ``Keywords_A``, so a build
    from real files scores every answer against the full sentence ``A`` (WebQA's "approximate" val variant), which
    pays a correct short answer less in the recall-scored categories (Others, choose, text; YesNo reads only yes/no by F1)."""
    with_keywords = sum(bool(str(r.get("keywords") or "").strip()) for r in rows)
    if with_keywords == len(rows):
        return f"QA-Acc reference: the keyword answer (Keywords_A) for all {len(rows)} WebQA questions"
    return (f"QA-Acc reference: the keyword answer (Keywords_A) for {with_keywords} of {len(rows)} WebQA questions, the "
            "full answer sentence A for the rest (WebQA's approximate val scoring: a correct short answer scores lower "
            "against a sentence in the recall-scored categories, so these QA-Acc values are not the official test's)")


def filter_verdict(table: Sequence[Mapping[str, Any]], systems: Sequence[SystemSpec]) -> str:
    """Did stage-1 training make the filter keep more gold on held-out questions than the base judge did? One line.

    Stage 1's reward is sampled on training prompts; only this held-out comparison (the "gold recall of kept" of the
    two filters that rank by P(yes)) says whether the judge improved, and with n questions one question moves the mean
    by up to 1/n. Empty when the systems lack either filter.
    """
    first = {}
    for s in systems:
        first.setdefault(s.filter, s.name)
    by_name = {r["system"]: r for r in table}
    if first.get("base") not in by_name or first.get("stage1") not in by_name:
        return ""
    base, trained = by_name[first["base"]], by_name[first["stage1"]]
    before, after, n = float(base["gold recall of kept"]), float(trained["gold recall of kept"]), int(trained["n"])
    delta = after - before
    moved = "kept more gold than" if delta > 0 else "kept less gold than" if delta < 0 else "kept as much gold as"
    return (f"held-out filter: the stage-1 judge {moved} the base judge ({before:.3f} -> {after:.3f}, {delta:+.3f}; about "
            f"{abs(delta) * n:.1f} of {n} questions' worth, and one question moves it by up to {1 / max(n, 1):.3f})")


def scores_of(results: Sequence[PipelineResult]) -> dict[str, dict[str, float]]:
    """The stage-1 scores a filtering run computed, reusable by later runs on the same pools (no re-scoring)."""
    return {r.guid: dict(r.scores) for r in results if r.scores}


def k_ablation(rows: Sequence[Row], preset: Preset, bank: ModelBank, ks: Sequence[int], *, split: str | None = None,
               answerer: str = "stage2", scores: Mapping[str, Mapping[str, float]] | None = None,
               reuse: Mapping[int, Sequence[PipelineResult]] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Stage-1 top-k with different k (inference only): gold recall of the kept set vs what stage 2 makes of it.

    ``scores`` (from an earlier run) skips the judge; ``reuse[k]`` skips a k already run (e.g. the main table's).
    "well-formed" (``well_formed_rate``) tells a row of zeros from a format failure: a model that learnt to cite a
    slot past k (say ``D4`` when k < 4) cites an id that was never shown, so no completion parses and nothing scores.
    """
    out = []
    for k in ks:
        if reuse and k in reuse:
            res = list(reuse[k])
        else:
            spec = SystemSpec(f"k={k}", "stage1", answerer, k=k)  # type: ignore[arg-type]
            res = run_pipeline(rows, preset, system=spec, bank=bank, split=split, scores=scores, progress=progress)
        w = score_webqa(res, rows)
        shown = sum(len(r.kept_ids) for r in res) / max(len(res), 1)
        out.append({"k": k, "shown (mean)": shown, "gold recall of kept": gold_recall_of_kept(res, rows), "Retr-F1": w["Retr-F1"],
                    "QA-Acc": w["QA-Acc"], "well-formed": well_formed_rate(res)})
    return out


def gold_recall_of_kept(results: Sequence[PipelineResult], rows: Sequence[Row]) -> float:
    """Mean share of each question's gold sources among the candidates its stage-2 prompt showed (``kept_ids``),
    over the questions of ``rows`` (a question with no result counts 0, as ``score_webqa`` scores it)."""
    from mmrag_lite import metrics

    kept = {r.guid: list(r.kept_ids) for r in results}
    recalls = [metrics.recall_at_k(kept.get(str(row["guid"]), []), [str(g) for g in row["gold_ids"]]) for row in rows]
    return sum(recalls) / max(len(recalls), 1)


def well_formed_rate(results: Sequence[PipelineResult]) -> float:
    """Share of completions the format reward would pay: no parser problem at all (unknown and repeated ids
    included). Prompt-fitting notes that ``run_pipeline`` also records under ``problems`` do not count. The structure
    only: an empty ``<think>`` that a preset's ``min_think_words`` keeps from the format reward still counts."""
    from mmrag_lite.parsing import PROBLEM_CODES

    ok = sum(not any(p.split(":")[0] in PROBLEM_CODES for p in r.problems) for r in results)
    return ok / max(len(results), 1)


def slot_table(results: Sequence[PipelineResult], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per prompt slot ``D1..Dn``: how often it held a gold document, and how often the completion cited it.

    A model that reads cites the slots where the gold is; one that learnt a positional shortcut cites the same slot
    whatever it holds. Slots past the shown list count citations of ids that were never shown (format errors).
    Shares are over questions with a prediction.
    """
    gold = {str(r["guid"]): {str(g) for g in r["gold_ids"]} for r in rows}
    preds = [res for res in results if res.guid in gold]
    n_slots = max([len(res.kept_ids) for res in preds] + [int(s[1:]) for res in preds for s in res.short_sources
                                                          if re.fullmatch(r"D[1-9]\d{0,2}", s)], default=0)
    table = []
    for i in range(1, n_slots + 1):
        slot = f"D{i}"
        held = sum(i <= len(res.kept_ids) and res.kept_ids[i - 1] in gold[res.guid] for res in preds)
        cited = sum(slot in res.short_sources for res in preds)
        table.append({"slot": slot, "gold here": held / max(len(preds), 1), "cited": cited / max(len(preds), 1)})
    return table


SHORTCUT_SHARE = 0.8  # a slot cited in at least this share of questions, whatever it holds, is a positional habit


GOLD_MOVE = 0.2  # the gold's slot shares must move this much (summed over slots) between two lists to test the citations
STUCK_RATIO = 0.25  # citations that move less than this share of the gold's move did not follow it


def positional_shortcut_note(slots: Mapping[str, Sequence[Mapping[str, Any]]], share: float = SHORTCUT_SHARE,
                             same_weights: Sequence[tuple[str, str]] = ()) -> str:
    """One paragraph when a model cites by position (pure; "" otherwise), by two checks.

    One system cites one slot in at least ``share`` of questions; or, for each pair in ``same_weights`` (two systems
    answering the same questions with the same weights from different lists, such as the full system and the oracle
    filter), the gold moves between slots and the citations stay put. Both moves are compared as *distributions over
    the slots* (each column divided by its total, ``_slot_moves``): a reader that cites the gold's slot in only a fifth
    of the questions moves its raw shares a fifth as far as the gold, yet cites where the gold went. Citations are
    stuck when their distribution moves less than ``STUCK_RATIO`` of the gold's, which must itself move at least
    ``GOLD_MOVE``. Such a model's Retr-F1 is mostly the share of questions whose gold happens to sit in the slots it
    cites, so comparing two systems' Retr-F1 then compares where each one's filter puts the gold, not what it read.
    """
    habits = {}
    for name, table in slots.items():
        top = max(table, key=lambda r: r["cited"], default=None)
        if top is not None and top["cited"] >= share:
            habits[name] = (top["slot"], top["cited"], top["gold here"])
    stuck = [(a, b, *moves) for a, b in same_weights if a in slots and b in slots
             for moves in [_slot_moves(slots[a], slots[b])]
             if moves[2] >= GOLD_MOVE and moves[3] < STUCK_RATIO * moves[2]]
    if not habits and not stuck:
        return ""
    text = ""
    if habits:
        parts = [f"{name!r} cites {slot} in {cited:.0%} of questions (gold sits there in {gold:.0%})"
                 for name, (slot, cited, gold) in habits.items()]
        text = "Positional habit: " + "; ".join(parts) + ". "
        if len(habits) > 1 and len({slot for slot, _, _ in habits.values()}) == 1:
            text += ("These systems cite the same slot whatever it holds, so the Retr-F1 gap between them measures how "
                     "often each one's filter puts a gold document in that slot, not what the model read.")
        else:
            text += "Its Retr-F1 tracks how often the gold sits in that slot, not what the model read."
    if stuck:
        parts = [f"from {a!r} to {b!r} the gold's slot shares moved by {gold:.2f} in all and the citations' by {cited:.2f} "
                 f"(as shares of all the gold and of all the citations: {gold_d:.2f} and {cited_d:.2f})"
                 for a, b, gold, cited, gold_d, cited_d in stuck]
        text += (" " if text else "") + ("Citations that stay put while the gold moves (the same weights answering "
                                          "both lists): " + "; ".join(parts) + ". A model that reads would cite where the "
                                          "gold went; this one cites by position, so the Retr-F1 gap between these "
                                          "systems measures where each list puts the gold, not what the model read.")
    return text


def _slot_moves(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> tuple[float, float, float, float]:
    """How far the gold and the citations moved between two slot tables, summed over slots: as raw shares of
    questions, then as distributions over the slots (each column divided by its total, so that a system citing in
    fewer questions is compared by *where* it cites, not by how often). A column with no total (nothing cited)
    has no distribution: its move is NaN, which no threshold passes."""
    ta, tb = ({r["slot"]: r for r in t} for t in (a, b))
    keys = ta.keys() | tb.keys()

    def move(col: str, normalised: bool) -> float:
        sa, sb = (sum(float(t.get(s, {}).get(col, 0.0)) for s in keys) for t in (ta, tb))
        if normalised and not (sa > 0 and sb > 0):
            return float("nan")
        da, db = (sa, sb) if normalised else (1.0, 1.0)
        return sum(abs(ta.get(s, {}).get(col, 0.0) / da - tb.get(s, {}).get(col, 0.0) / db) for s in keys)

    return move("gold here", False), move("cited", False), move("gold here", True), move("cited", True)


def reasoning_ablation(rows: Sequence[Row], preset: Preset, bank: ModelBank, *, split: str | None = None,
                       scores: Mapping[str, Mapping[str, float]] | None = None,
                       reuse: Mapping[bool, Sequence[PipelineResult]] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Stage 2 with and without the ``<think>`` block (inference-time: prompt and parser change, weights do not).

    ``retrained_stage2_ablation`` retrains stage 2 the other way; this one asks what the weights you have do when
    the format changes under them — a model trained one way may well break.
    """
    out = []
    for reasoning in (False, True):
        if reuse and reasoning in reuse:
            res = list(reuse[reasoning])
        else:
            spec = SystemSpec(f"reasoning={'on' if reasoning else 'off'}", "stage1", "stage2", reasoning=reasoning)
            res = run_pipeline(rows, preset, system=spec, bank=bank, split=split, scores=scores, progress=progress)
        w = score_webqa(res, rows)
        think = sum(bool(r.reasoning) for r in res) / max(len(res), 1)
        out.append({"stage-2 prompt asks for reasoning": "yes" if reasoning else "no",
                    "trained with reasoning": "yes" if preset.stage2.reasoning else "no",
                    "well-formed": well_formed_rate(res), "has <think>": think, "Retr-F1": w["Retr-F1"], "QA-Acc": w["QA-Acc"]})
    return out


def robustness_check(rows: Sequence[Row], preset: Preset, bank: ModelBank, *, system: SystemSpec | None = None,
                     kinds: Sequence[AttackKind] = ("conflicting", "lexical"), clean: Sequence[PipelineResult] | None = None,
                     seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Clean vs attacked metrics for one system; the drop is attacked − clean (negative = hurt).

    "wrong answer echoed" has a baseline: the clean answers scored against the same wrong answers
    (``ECHO_CLEAN``), since an answer can say the wrong fact without ever seeing the trap ("Yes" to everything);
    ``ECHO_DELTA`` (attacked − clean) is what the trap caused. The conflicting row also says how often its wrong
    answer had to fall back to another question's (``wrong answer: fallback``): those traps are not "a wrong answer
    of the right type"; and, under ``"by form"`` (``trap_forms_table``, shown by ``robustness_markdown``), kept /
    cited / echoed per wording of the trap: a statement, or the question restated with the wrong answer.
    """
    system = system or _full_system(standard_systems(preset))
    clean = list(clean) if clean is not None else run_pipeline(rows, preset, system=system, bank=bank, progress=progress)
    base = score_webqa(clean, rows)
    out = [{"distractor": "none (clean)", "Retr-F1": base["Retr-F1"], "QA-Acc": base["QA-Acc"], "Δ Retr-F1": 0.0, "Δ QA-Acc": 0.0}]
    for kind in kinds:
        attacked = attack_rows(rows, kind, seed=seed)
        res = run_pipeline(attacked, preset, system=system, bank=bank, progress=progress)  # new pools: scores recomputed
        w = score_webqa(res, attacked)
        row = {"distractor": kind, "Retr-F1": w["Retr-F1"], "QA-Acc": w["QA-Acc"],
               "Δ Retr-F1": _delta(w["Retr-F1"], base["Retr-F1"]), "Δ QA-Acc": _delta(w["QA-Acc"], base["QA-Acc"]),
               **_echo_columns(res, clean, attacked)}
        if kind == "conflicting":  # how often no right-typed wrong answer existed (another question's was used)
            row["wrong answer: fallback"] = fallback_share(attacked)
            row["by form"] = trap_forms_table(res, clean, attacked)
        out.append(row)
    return out


def _delta(a: Any, b: Any) -> Any:
    return a - b if isinstance(a, float) and isinstance(b, float) else NOT_RUN


def stage2_ablation_variants(preset: Preset) -> dict[str, dict[str, Any]]:
    """The retrained stage-2 variants (our grid; the paper reports none): each changes one thing in the preset.

    Dropping the ranking reward asks whether stage 2 still learns to cite the right documents when only the answer
    pays; dropping the answer reward asks the converse; flipping ``reasoning`` asks what writing ``<think>`` buys.
    """
    variants: dict[str, dict[str, Any]] = {}
    weights = preset.stage2.weights
    for component in ("ranking", "answer"):
        others_pay = any(w > 0 for name, w in weights.items() if name != component)  # else nothing left to learn
        if weights.get(component, 0.0) > 0 and others_pay:
            variants[f"no {component} reward"] = {f"stage2.weights.{component}": 0.0}
    flipped = not preset.stage2.reasoning
    variants[f"reasoning {'on' if flipped else 'off'}"] = {"stage2.reasoning": flipped}
    return variants


def retrain_ablations_command(preset: Preset | str, work_dir: str | Path) -> str:
    """The command that runs the retrained ablations on a GPU preset, where they are off by default (hours each).

    It runs those alone (``evaluate --retrained-ablations-only``: ``add_retrained_ablations``), merging their table
    into the run's ``eval/results.*`` and keeping every other section. It names the run folder in full
    (``MMRAG_HOME`` on Drive or a notebook's ``work_dir`` is not ``runs/<preset>`` of wherever the command is typed),
    and a ``Preset`` as the named preset closest to it plus one ``--set`` per change: the run's overrides
    (``stage1.k=6``, a new name) would otherwise be lost, or the name refused."""
    from mmrag_lite.config import PRESETS, preset_overrides

    if isinstance(preset, str):
        base, changes = preset, {}
    else:
        base = min(PRESETS, key=lambda name: (len(preset_overrides(PRESETS[name], preset)), name != preset.name))
        changes = preset_overrides(PRESETS[base], preset)
    changes["evaluation.retrain_ablations"] = True
    # JSON is YAML that --set parses back, with text quoted so that it stays text
    sets = " ".join("--set " + shlex.quote(f"{key}={json.dumps(value)}") for key, value in changes.items())
    return (f"python -m mmrag_lite evaluate --preset {base} --work-dir {shlex.quote(str(work_dir))} {sets} "
            "--retrained-ablations-only")


def _changes(overrides: Mapping[str, Any]) -> str:
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)

    return ", ".join(f"{k.removeprefix('stage2.')}={text(v)}" for k, v in overrides.items()) or "none"


def _variant_row(name: str, overrides: Mapping[str, Any], results: Sequence[PipelineResult], rows: Sequence[Row],
                 history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    from mmrag_lite.training import reward_trend

    first, last = reward_trend(history)
    s = score_webqa(results, rows)
    return {"stage 2 variant": name, "changes": _changes(overrides),
            "train reward first → last": f"{first:.3f} → {last:.3f}" if first is not None else NOT_RUN,
            "well-formed": well_formed_rate(results), "Retr-F1": s["Retr-F1"], "QA-Acc": s["QA-Acc"]}


def retrained_stage2_ablation(preset: Preset, work_dir: str | Path, rows: Sequence[Row], train_split: Any, *,
                              variants: Mapping[str, Mapping[str, Any]] | None = None,
                              baseline: Sequence[PipelineResult] | None = None,
                              scores: Mapping[str, Mapping[str, float]] | None = None,
                              progress: bool = True, live_plot: bool = False,
                              resident: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Retrain stage 2 once per variant and evaluate each through the main run's stage-1 filter.

    Every variant gets what the main run (notebook 04) got — the same pools (``training.stage2_dataset_for_run``),
    seed, steps and starting weights — and differs only in its overrides; it trains in
    ``<work_dir>/ablations/<variant>/`` (with a ``variant.json`` saying what changed) and is retrained on every call.
    The first row is the main run itself when ``baseline`` (its predictions on ``rows``) is given. The training
    reward is each variant's *own* weighted sum, so compare the held-out columns across rows, not that one.
    With ``preset.evaluation.retrain_ablations`` off (the GPU presets: hours per variant) the variants are listed
    as not run, with the command that runs them. ``live_plot`` draws each variant's reward curves as it trains.
    ``resident``: models the caller holds on the accelerator (notebook 05's ``ModelBank``, its BART scorer), each
    ``unload``-ed before the first variant trains and reloaded when next used: beside a trainer they cost the memory
    a GPU preset's stage 2 needs (a100's 35 GiB peak plus the bank's 3 and BART's 1.6 is over a 40 GB card).
    """
    from mmrag_lite import modeling, training
    from mmrag_lite.modeling import release_memory

    run = Path(work_dir)
    variants = stage2_ablation_variants(preset) if variants is None else variants
    out: list[dict[str, Any]] = []
    if baseline is not None:
        out.append(_variant_row("as the preset (main run)", {}, baseline, rows, training.load_log_history(run, 2)))
    if not preset.evaluation.retrain_ablations:
        cmd = retrain_ablations_command(preset, run)
        return out + [{"stage 2 variant": name, "changes": _changes(ov), "status": "not run: hours per variant on a GPU",
                       "command": cmd} for name, ov in variants.items()]
    if train_split is None:
        raise ValueError("retrained_stage2_ablation needs the Mini-WebQA train split to retrain stage 2 on "
                         "(data.ensure_mini_webqa(preset, work_dir)['train']); got None")
    # Every variant's preset is built (and validated) first: a bad override fails now, not after hours of training.
    presets = {name: preset.with_overrides(**overrides) for name, overrides in variants.items()}
    for model in resident:
        model.unload()
    release_memory()
    init = training.stage2_init_adapter(preset, run)
    processor = modeling.load_processor(preset)
    for name, overrides in variants.items():
        p = presets[name]
        sub = run / "ablations" / slug(name)
        write_json_atomic(sub / "variant.json", {"variant": name, "overrides": dict(overrides), "init_adapter": str(init) if init else None})
        dataset, _ = training.stage2_dataset_for_run(p, run, train_split, processor=processor, verbose=False)
        history = training.train_stage2(p, dataset, sub, init_adapter=init, verbose=False, live_plot=live_plot,
                                        plot_title=f"stage 2 retrained: {name}").log_history
        release_memory()  # the trained model goes before the bank loads the saved adapter: one model at a time
        bank = ModelBank(p, sub, adapters={"stage1": run / "stage1" / "adapter"}, verbose=False)
        res = run_pipeline(rows, p, system=SystemSpec(name, "stage1", "stage2"), bank=bank, scores=scores, progress=progress)
        out.append(_variant_row(name, overrides, res, rows, history))
        bank.unload()
    return out


def add_retrained_ablations(preset: Preset, work_dir: str | Path, *, split: str = "test", progress: bool = True,
                            live_plot: bool = False) -> EvalReport:
    """The retrained stage-2 ablations alone, merged into the report already in ``<work_dir>/eval/`` (what
    ``retrain_ablations_command`` runs, and a notebook can call after notebook 05 saved its report).

    The full system's saved predictions (``eval/predictions_<stage 1 + stage 2>.json``) are the baseline row and
    give the stage-1 scores, so no system, MMQA, robustness check or inference-time ablation runs again. The
    retrained table replaces the one in ``results.json`` / ``results.md`` (the "not run" rows, or an earlier
    retraining), every other section is kept, and the submissions and predictions are left as they are.
    It retrains whether or not ``preset.evaluation.retrain_ablations`` is on (off, the GPU presets only list them).
    """
    from mmrag_lite.pipeline import load_results

    run = Path(work_dir)
    out = run / "eval"
    full = _full_system(standard_systems(preset))
    predictions = out / PER_SYSTEM_FILES[1].format(slug(full.name))
    if not (out / "results.json").is_file() or not predictions.is_file():
        missing = predictions if (out / "results.json").is_file() else out / "results.json"
        raise FileNotFoundError(f"{missing} not found: the retrained ablations are added to a saved evaluation. Run "
                                f"notebook 05 or `python -m mmrag_lite evaluate` on {run} first")
    baseline = load_results(predictions)
    rows = load_eval_split(preset, run, split, len(baseline))
    if sorted(str(r["guid"]) for r in rows) != sorted(r.guid for r in baseline):
        raise ConfigError(f"{predictions} holds other questions than the first {len(baseline)} of Mini-WebQA's {split} "
                          "split: pass the split the evaluation used (--split), or evaluate again")
    report = EvalReport.from_dict(json.loads((out / "results.json").read_text(encoding="utf-8")))
    clock = Stopwatch()
    with clock("retrained ablations"):
        report.ablations[RETRAINED_ABLATION_TITLE] = retrained_stage2_ablation(
            preset.with_overrides(**{"evaluation.retrain_ablations": True}), run, rows,
            data.ensure_mini_webqa(preset, run)["train"], baseline=baseline, scores=scores_of(baseline),
            progress=progress, live_plot=live_plot)
    report.timings["retrained ablations"] = clock.timings["retrained ablations"]
    note = (f"'{RETRAINED_ABLATION_TITLE}' was added afterwards (add_retrained_ablations), its first row from "
            f"{predictions.name}: the other sections are the evaluation's that wrote this report")
    if note not in report.notes:
        report.notes.append(note)
    write_json_atomic(out / "results.json", report.to_dict())
    write_text_atomic(out / "results.md", report.markdown())
    return report


def auto_fluency_scorer(preset: Preset) -> Any:
    """BARTScore where it is cheap to get: cpu-tiny only uses a cached copy (offline, a download would retry for
    a minute and its 1.6 GB are not worth it for a plumbing check); GPU presets may download it. None when absent."""
    from mmrag_lite import metrics

    if preset.model.is_miniature:
        return metrics.load_bart_scorer(local_files_only=True)
    return metrics.load_bart_scorer()


def load_eval_split(preset: Preset, work_dir: str | Path, split: str = "test", n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` (default ``preset.evaluation.questions``) questions of a Mini-WebQA split, as plain dicts."""
    if split not in data.SPLITS:
        raise ValueError(f"unknown split {split!r}: Mini-WebQA has {', '.join(data.SPLITS)}")
    n = n if n is not None else preset.evaluation.questions
    if n < 1:
        raise ValueError(f"the number of questions to evaluate must be >= 1, got {n}")
    ds = data.ensure_mini_webqa(preset, work_dir)[split]
    if len(ds) == 0:
        raise ValueError(f"the Mini-WebQA {split} split in {work_dir} is empty: nothing to evaluate")
    return [dict(ds[i]) for i in range(min(len(ds), n))]


def default_mmqa_questions(preset: Preset, n_webqa: int) -> int:
    """As many MMQA questions as WebQA ones, at most ``preset.evaluation.mmqa_questions`` when that is set."""
    cap = preset.evaluation.mmqa_questions
    return min(n_webqa, cap) if cap else n_webqa


def load_mmqa_rows(preset: Preset, n: int | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], str]:
    """MMQA dev image+text questions as Mini-WebQA-shaped rows, or ``([], reason)``.

    Images carry their pixels when ``mmqa-dev/final_dataset_images/`` (the release's image zip, unpacked) is there,
    and are their titles otherwise (offline); the note says which.
    """
    from mmrag_lite.config import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "mmqa-dev").is_dir():
        return [], ("MMQA dev not found (no mmqa-dev/ folder with MMQA_dev.jsonl.gz and MMQA_images.jsonl.gz in "
                    "../shared/data, or in MMRAG_SHARED_DATA where set): MMQA columns not run")
    n = n if n is not None else preset.evaluation.questions
    folder = root / "mmqa-dev"
    mm = data.load_mmqa(folder, "dev")
    rows = data.mmqa_to_rows(mm.questions, mm.images, mm.texts, qtypes=("ImageQ",), max_candidates=preset.data.max_candidates,
                             seed=preset.seed)[:n]
    images_dir = folder / data.MMQA_IMAGE_FOLDER
    has_pixels = all_pixels = False
    if images_dir.is_dir():
        rows, found = data.attach_mmqa_images(rows, mm.images, images_dir, max_side=data.MiniWebQAFilters().max_image_side,
                                              progress=progress)
        has_pixels, all_pixels = found.attached > 0, not (found.missing or found.unreadable)
        images = found.describe()
    else:
        images = (f"image candidates shown as their titles (no MMQA pixels here: unzip final_dataset_images.zip in "
                  f"{folder}, which makes {images_dir.name}/, for them)")
    pools = "image+text pools" if mm.texts else "pools of image candidates only (no passage texts here: MMQA_texts.jsonl.gz)"
    note = f"MMQA: the first {len(rows)} dev ImageQ questions, {preset.data.max_candidates} candidates at most; {pools}; {images}"
    if not mm.texts and not has_pixels:
        note += "; so retrieval compares the question with image titles only"
    if not (mm.texts and all_pixels):
        note += ": a weaker setting than the paper's"
    return [dict(r) for r in rows], note


class Stopwatch:
    """Wall-clock seconds per named step, for the report's ``timings_s``: ``with clock("systems"): ...``.

    ``done()`` adds ``total`` (since the stopwatch was made). Notebook 05 and ``evaluate`` both time with it, so
    their ``results.json`` carry the same keys.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def done(self) -> dict[str, float]:
        return {**self.timings, "total": time.perf_counter() - self.start}


def build_report(preset: Preset, rows: Sequence[Row], predictions: Mapping[str, Sequence[PipelineResult]], *,
                 fluency_scorer: Any = None, table: Sequence[Mapping[str, Any]] | None = None,
                 per_category: Mapping[str, list[dict[str, Any]]] | None = None,
                 mmqa_rows: Sequence[Row] = (), mmqa_preds: Mapping[str, Sequence[PipelineResult]] | None = None,
                 mmqa_note: str | None = None, ablations: Mapping[str, list[dict[str, Any]]] | None = None,
                 robustness: Sequence[Mapping[str, Any]] = (), notes: Sequence[str] = (),
                 timings: Mapping[str, float] | None = None, data_source: str | None = None,
                 same_weights: Sequence[tuple[str, str]] = ()) -> EvalReport:
    """The one place an ``EvalReport`` is assembled, from results already computed (pure apart from scoring).

    ``evaluate`` (the CLI) and notebook 05 both call it, so ``eval/`` holds the same sections either way: the main
    table (``systems_table`` unless ``table`` + ``per_category`` from it are given), its ``n`` column saying how many
    WebQA / MMQA questions each row covers, the slot tables, ablations, robustness, the notes (QA-FL unavailable,
    ``mmqa_note`` and the MMQA ×100 scale when MMQA was attempted, ``notes`` such as ``ModelBank.notes``, the
    cpu-tiny caveat, the synthetic-data caveat), ``timings`` (e.g. ``Stopwatch.done()``) and ``data_source``
    (``data.mini_webqa_source``: what the Mini-WebQA was built from, shown in the title).
    """
    if (table is None) != (per_category is None):
        raise ValueError("build_report: pass both table and per_category (from systems_table) or neither")
    mmqa_preds = dict(mmqa_preds or {})
    if table is None:
        table, per_category = systems_table(predictions, rows, mmqa_preds=mmqa_preds, mmqa_rows=mmqa_rows,
                                            fluency_scorer=fluency_scorer)
    report = EvalReport(preset=preset.name, data_source=data_source,
                        predictions={k: list(v) for k, v in predictions.items()},
                        per_category=dict(per_category or {}), ablations=dict(ablations or {}),
                        robustness=[dict(r) for r in robustness], timings=dict(timings or {}))
    report.table = [dict(r) for r in table]
    for row in report.table:
        n_mmqa = row.pop("n_mmqa", None)  # the MMQA questions scored (one without a gold answer is not)
        if isinstance(row.get("n"), int):
            row["n"] = f"{row['n']} WebQA" + (f" + {n_mmqa} MMQA" if n_mmqa is not None else "")
    report.slots = {name: slot_table(res, rows) for name, res in report.predictions.items()}
    habit = positional_shortcut_note(report.slots, same_weights=same_weights)
    if habit:
        report.notes.append(habit)
    if rows:
        report.notes.append(accuracy_reference_note(rows))
    if fluency_scorer is None:
        report.notes.append("QA-FL needs BART-large-CNN (BARTScore), which cannot be loaded offline: QA-FL and QA "
                            "(= mean FL·Acc) are reported as unavailable, never estimated")
    else:
        report.notes.append(fluency_note(fluency_scorer))
    if mmqa_note is not None:
        report.notes.append(mmqa_note)
        report.notes.append("MMQA EM / F1 are x100, as MultimodalQA and the paper print them; the WebQA columns are 0-1")
    report.notes.extend(n for n in notes if n not in report.notes)
    if preset.model.is_miniature:
        report.notes.append("cpu-tiny: a randomly initialised ~1.2M-parameter miniature: these numbers check the "
                            "plumbing, they say nothing about the method")
    if data_source == "synthetic world":
        report.notes.append("Mini-WebQA was built from the synthetic world (coloured shapes; notebook 01 without "
                            "webqa_dir), not from WebQA: whatever the model, these numbers say nothing about WebQA")
    if preset.data.test_split == "webqa_val":
        report.notes.append("test split: WebQA's own val questions that passed the Mini-WebQA filters "
                            "(data.test_split='webqa_val'): a filtered subset of WebQA's val split, not all of it")
    elif data_source == "WebQA files":
        report.notes.append("test split: Mini-WebQA's own, cut from WebQA's train and val questions pooled "
                            "(data.test_split='pooled'): neither WebQA's val nor its test split, so not comparable "
                            "with numbers reported on those")
    return report


def fluency_scorer_name(scorer: Any) -> str:
    """The checkpoint a BARTScore scorer loaded (``metrics.BARTScorer``'s model's ``name_or_path``), else its type."""
    model = getattr(scorer, "model", None)
    name = getattr(scorer, "checkpoint", None) or getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(scorer).__name__


def fluency_note(scorer: Any) -> str:
    """What the QA-FL column was computed with, and what it can be compared with."""
    return (f"QA-FL is BARTScore with {fluency_scorer_name(scorer)}, not the ParaBank-fine-tuned BART weights "
            "(bart.pth) the WebQA leaderboard's FL used: QA-FL and QA (= mean FL·Acc) are trend-comparable, not "
            "value-comparable, with the paper's and the leaderboard's FL and QA")


def evaluate(preset: Preset, work_dir: str | Path, *, split: str = "test", n_questions: int | None = None,
             systems: Sequence[SystemSpec] | None = None, mmqa: bool = True, ablations: bool = True, robustness: bool = True,
             ks: Sequence[int] | None = None, fluency_scorer: Any = "auto", bank: ModelBank | None = None,
             progress: bool = True, write: bool = True) -> EvalReport:
    """The whole of notebook 05 in one call (the CLI's ``evaluate``): table, ablations, robustness; writes ``eval/``."""

    work_dir = Path(work_dir)
    clock = Stopwatch()
    with clock("load"):
        rows = load_eval_split(preset, work_dir, split, n_questions)
        bank = bank or ModelBank(preset, work_dir)
        systems = list(systems or standard_systems(preset))
        bank.require_adapters(k for s in systems for k in adapters_needed(s))  # a hub model's refusal comes first
        systems = [label_missing_adapters(s, bank) for s in systems]
        if fluency_scorer == "auto":
            fluency_scorer = auto_fluency_scorer(preset)
    with clock("systems"):
        predictions = run_systems(rows, preset, bank, systems, split=split, progress=progress)
    mmqa_preds: dict[str, list[PipelineResult]] = {}
    mmqa_rows: list[dict[str, Any]] = []
    mmqa_note = None
    if mmqa:
        with clock("mmqa"):
            mmqa_rows, mmqa_note = load_mmqa_rows(preset, default_mmqa_questions(preset, len(rows)), progress=progress)
            if mmqa_rows:
                mmqa_preds = run_systems(mmqa_rows, preset, bank, systems, progress=progress)
    ablation_rows: dict[str, list[dict[str, Any]]] = {}
    full = _full_system(systems)
    if ablations:
        with clock("ablations"):
            main = predictions.get(full.name) if full.filter == "stage1" and full.answerer == "stage2" else None
            cached = scores_of(main) if main else None
            max_c = max(len(r["candidates"]) for r in rows)
            ks = list(ks or sorted({1, 2, preset.stage1.k, max_c}))
            k_main = full.resolved_k(preset)
            ablation_rows[K_ABLATION_TITLE] = k_ablation(
                rows, preset, bank, ks, split=split, scores=cached,
                reuse={k_main: main} if main and full.reasoning is None else None, progress=progress)
            ablation_rows[REASONING_ABLATION_TITLE] = reasoning_ablation(
                rows, preset, bank, split=split, scores=cached,
                reuse={preset.stage2.reasoning: main} if main and full.k is None and full.reasoning is None else None,
                progress=progress)
            ablation_rows[RETRAINED_ABLATION_TITLE] = retrained_stage2_ablation(
                preset, work_dir, rows, data.ensure_mini_webqa(preset, work_dir)["train"], baseline=main, scores=cached,
                progress=progress, resident=[m for m in (bank, fluency_scorer) if hasattr(m, "unload")])
    robust: list[dict[str, Any]] = []
    if robustness:
        with clock("robustness"):
            robust = robustness_check(rows, preset, bank, system=full, clean=predictions.get(full.name), seed=preset.seed,
                                      progress=progress)
    report = build_report(preset, rows, predictions, fluency_scorer=fluency_scorer, mmqa_rows=mmqa_rows,
                          mmqa_preds=mmqa_preds, mmqa_note=mmqa_note, ablations=ablation_rows, robustness=robust,
                          notes=bank.notes, timings=clock.done(), data_source=data.mini_webqa_source(work_dir),
                          same_weights=same_weight_pairs(systems))
    if write:
        write_report(report, work_dir)
    return report


def adapters_needed(system: SystemSpec) -> list[str]:
    """The trained adapters ``system`` reads: its filter's judge and its answerer, ``stage1``/``stage2`` only."""
    return list(dict.fromkeys(k for k in (FILTER_JUDGE.get(system.filter), system.answerer)
                              if k in ("stage1", "stage2")))


def label_missing_adapters(system: SystemSpec, bank: ModelBank) -> SystemSpec:
    """``system`` renamed when an adapter it needs was never trained, so its row does not pass for a trained system:
    "stage 1 + stage 2 (no stage2 adapter: base model)". Only where the bank falls back to the base model (the
    miniature, or ``allow_missing_adapters=True``); a hub model's bank refuses instead (``evaluate`` checks first)."""
    missing = [k for k in adapters_needed(system) if bank.adapter_path(k) is None]
    if not missing:
        return system
    return replace(system, name=f"{system.name} (no {' or '.join(missing)} adapter: base model)")


def same_weight_pairs(systems: Sequence[SystemSpec]) -> list[tuple[str, str]]:
    """Pairs of systems whose lists differ but whose answering weights and prompt do not (the full system and the
    oracle filter, say): where the gold moves between their lists, a model that reads moves its citations too."""
    return [(a.name, b.name) for i, a in enumerate(systems) for b in systems[i + 1:]
            if (a.answerer, a.reasoning) == (b.answerer, b.reasoning) and (a.filter, a.k) != (b.filter, b.k)]


def _full_system(systems: Sequence[SystemSpec]) -> SystemSpec:
    """The full method among ``systems``: stage-1 filter + stage-2 answerer (else the last system)."""
    return next((s for s in systems if s.filter == "stage1" and s.answerer == "stage2"), systems[-1])


PER_SYSTEM_FILES = ("submission_{}.json", "predictions_{}.json")  # one of each per system of the report, in eval/


def write_report(report: EvalReport, work_dir: str | Path) -> Path:
    """``eval/results.md`` + ``results.json`` + per-system submission and predictions (atomic writes).

    A per-system file of a system this report does not hold (an earlier run's, say "stage 1 + stage 2 (no stage2
    adapter: base model)" before training) is removed, so every submission in ``eval/`` is one of this report's."""
    out = Path(work_dir) / "eval"
    for name, res in report.predictions.items():
        write_submission(res, out / PER_SYSTEM_FILES[0].format(slug(name)))
        save_results(res, out / PER_SYSTEM_FILES[1].format(slug(name)))
    current = {pattern.format(slug(name)) for name in report.predictions for pattern in PER_SYSTEM_FILES}
    for pattern in PER_SYSTEM_FILES:
        for stale in out.glob(pattern.format("*")):
            if stale.name not in current and stale.is_file():
                stale.unlink()
    write_json_atomic(out / "results.json", report.to_dict())
    write_text_atomic(out / "results.md", report.markdown())
    return out


__all__ = [
    "ECHO_CLEAN",
    "ECHO_DELTA",
    "FALLBACK_WRONG",
    "FORM_RESTATED",
    "FORM_STATEMENT",
    "K_ABLATION_TITLE",
    "MAIN_COLUMNS",
    "PAPER_REFERENCE",
    "PER_SYSTEM_FILES",
    "REASONING_ABLATION_TITLE",
    "RETRAINED_ABLATION_TITLE",
    "SHORTCUT_SHARE",
    "STATEMENT_HOWS",
    "UNAVAILABLE",
    "EvalReport",
    "Stopwatch",
    "WrongAnswer",
    "accuracy_reference_note",
    "add_retrained_ablations",
    "attack_rows",
    "auto_fluency_scorer",
    "build_report",
    "choice_options",
    "conflicting_answer",
    "conflicting_text",
    "default_mmqa_questions",
    "evaluate",
    "fallback_share",
    "filter_verdict",
    "fluency_note",
    "fluency_scorer_name",
    "gold_recall_of_kept",
    "inject_distractors",
    "k_ablation",
    "label_missing_adapters",
    "load_eval_split",
    "load_mmqa_rows",
    "markdown_table",
    "other_option_answer",
    "paper_reference_table",
    "perturb_answer",
    "positional_shortcut_note",
    "reasoning_ablation",
    "retrain_ablations_command",
    "retrained_stage2_ablation",
    "robustness_check",
    "robustness_markdown",
    "run_systems",
    "same_weight_pairs",
    "score_mmqa",
    "score_webqa",
    "scores_of",
    "slot_table",
    "stage2_ablation_variants",
    "systems_table",
    "trap_form",
    "trap_forms_table",
    "trap_rates",
    "webqa_references",
    "well_formed_rate",
    "write_report",
]
