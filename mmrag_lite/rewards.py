"""Rule-based rewards for the two GRPO stages, with TRL's signature ``f(completions, **columns) -> list[float]``.

The paper names the reward *components* (format; stage-1 relevance; stage-2 ranking and answer) but not their
formulas or weights. Everything below is **our choice**, kept configurable in ``config`` and explained in
notebook 02. For a completion ``o`` read by ``parsing`` (``parse(o).ok`` = exactly the required tag structure),
a configurable ``penalty ≤ 0`` for output that cannot be read at all, and the dataset columns of its row:

**Format** (both stages, with or without ``<think>``): all or nothing.

    r_fmt(o) = 1                 if parse(o).ok
               penalty           otherwise

**Relevance** (stage 1), the verdict ``ŷ ∈ {yes, no}`` against the row's ``label`` ``y``, with class weights
``w_yes = ρ / max(ρ, 1)``, ``w_no = 1 / max(ρ, 1)`` for a positive weight ``ρ`` (1 = no re-weighting;
``balance_classes`` sets ``ρ = (1 − π) / π`` from the share of positives ``π``, the balanced-accuracy weighting):

    r_rel(o) = w_y               if ŷ = y
               0                 if ŷ ≠ y
               penalty           if no single yes/no verdict can be read

**Ranking** (stage 2), the listed ids ``S = (s_1, s_2, …)`` (order kept, repeats dropped) against the gold ids
``G``; an id that is not among the row's ``candidate_ids`` ``C`` can never be relevant but still takes its slot:

    f1:    r_rank(o) = 2 |S ∩ G ∩ C| / (|S| + |G ∩ C|)
           (WebQA's Retrieval-F1 when every gold id is shown, i.e. G ⊆ C; otherwise it only asks for the gold the
           model was shown, since it cannot name a document it never saw; 0 when G ∩ C = ∅)
    ndcg:  r_rank(o) = Σ_{i ≤ k} [s_i ∈ G ∩ C] / log2(i + 1)  /  Σ_{i ≤ min(k, |G ∩ C|)} 1 / log2(i + 1)
                  · min(1, k / |S|)
           with k = |G ∩ C| unless configured, k ≥ 1 (listing every candidate must not pay: ids past k earn nothing,
           and a list longer than k is diluted, so the gold first and every other candidate after it pays k/|S|, not 1;
           k < 1 would pay 0 for everything, so it raises ``ValueError``)
           penalty when no sources block can be read

**Answer** (stage 2), the text ``â`` inside ``<answer>`` against the row's reference:

    webqa:    r_ans(o) = Acc_WebQA(â, ref, qcate) · g_choose · g_hedge · g_len     ref = keywords if keywords else answer
    mmqa_f1:  r_ans(o) = F1_DROP(â, answer)
    mmqa_em:  r_ans(o) = EM_DROP(â, answer)
              penalty when no single answer block can be read

Four guards close holes that the official metric leaves open (the *metric* in ``metrics`` stays official; only the
reward is guarded), each a keyword option, on by default:

* ``choose_guard`` — ``choose``/``Others``/``text`` are scored by recall, so pasting the question into the answer
  names the right option of an either-or question and scores ~1 (0.94 on average over the real val ``choose``
  questions; WebQA files some either-or questions under ``text`` and ``Others``, so the guard reads all three). With
  the question known (a ``question`` column, else the ``Question:`` line of TRL's ``prompts``), ``g_choose = 1/2``
  when the answer names both options of the question and the reference does not, otherwise 1. The options are the
  nearest words either side of an ``or`` of the normalised question (or the ``and`` of a question that opens with
  "Between") that the other side lacks — "red" and "blue" in "the red car or the blue car", so a committed "the blue
  car" names one — and the two spans beside it (up to ``OPTION_SPAN_WORDS`` words, cut at , ; : ?), of which an
  answer names one when it holds at least half of the span's own words — so dropping the word next to the ``or``
  does not slip past. "The reference does not" means: the whole reference answer names only one option; or it names
  both in a sentence ("X is taller than Y", while Acc reads the keyword "X") and the answer leads with the other option
  ("Y is taller than X", unless Acc's reference names that one alone: recall reads the same words either way; the order
  is read from option words the question says once, with denied clauses cut) or sets them side by side as alternatives
  ("X or Y", "X and Y", "X, Y"). So a sentence that says what the reference says is never halved (none of the 3,626 real
  val recall references), and naming both options is worth what a coin flip between them is worth in expectation:
  committing to the option the evidence supports pays more (``benchmarks/bench_answer_guards.py``). An option that a
  text denies ("upwards, not sideways"; also "rather than", "instead of", "n't"; in "not as tall as it is wide" only
  "tall"; a contrast word ends the denial: "not sideways but upwards" affirms upwards; option words matched as
  lemmatised in context and alone) is neither named nor scored there: on
  questions with options, Acc reads what the answer affirms against what the reference affirms (never more than the
  official Acc), so a contrast pays when right and not when wrong (recall alone paid "sideways, not upwards" in full).
  A lead-in that restates both options ("Of upwards and sideways, it grows upwards.") is cut before any of this: the
  commitment after it is scored, so a right one pays in full and a wrong one nothing.
  Why 1/2 and not 0: a bag-of-words test cannot tell a hedge from a correct sentence that compares with the other
  option ("X is taller than Y" where the reference names only X) or leads with it ("Y is shorter than X" where the
  reference says "X is taller than Y"), which keeps half its credit.
* ``hedge_guard`` — ``color``/``shape``/``YesNo`` are scored by F1 over a closed vocabulary and ``number`` by F1 over
  numbers, where "yes or no" earns 0.667 on every YesNo question (more than always answering "yes", 0.46 on real
  val) and "3 or 4" 0.667 against a coin flip's 0.5. With ``c`` the distinct vocabulary words (or numbers) of the
  answer and ``h`` those the reference holds, ``g_hedge = |h| / |c|``: hedging over ``m`` options with one right
  then earns ``2/(m(m+1))`` (1/3 for two), never more in expectation than committing to one at random (``1/m``).
  "The reference" is the keyword and the whole reference answer (a sentence's incidental "gold medalist" is no
  guess) and, for ``number``, the question too (a year the question states is context; two numbers it offers as
  options, "3 or 4", are not, unless they are years): so a reference sentence is
  never lowered (none of the 1,340 real val ones of these categories).
  On ``choose``/``Others``/``text`` (recall) the same guard reads *lists*: an answer that splits into guesses with
  content words (neither stop words nor the question's), two or more joined as alternatives ("or", "/", "vs") or
  three or more enumerated ("," ";" "and", a line break, a bullet), at least two of them at most ``LIST_ITEM_WORDS``
  words long, is a list of guesses (a guess: the first piece, and each later one that does not open with a stop word
  or opens with "perhaps", "also" and the like: "X, not Y" and "X, which ..." are sentences, "Paris, France" one
  claim); ``g_hedge = |held| / |items|``, the items that hold a word of
  the keyword or of the whole reference over all of them. Listing ``m`` guesses with one right then earns ``1/m``, what committing to
  one of them at random earns in expectation (recall paid "Ether, India, Gold, Rome, Oslo" in full), and a list the
  reference itself makes ("red, white and blue") keeps its score. Unless the choose guard already halved the answer.
  Not read: guesses with nothing between them ("Ether India Gold"), which only the length guard bounds (at 2·|A| + 4
  words, so up to six one-word guesses against a one-word reference); two enumerated guesses ("Ether, India") and
  guesses padded past ``LIST_ITEM_WORDS`` words each, which the length guard thins; and a third option of a question
  that offers three ("A, B or C"), whose words the list guard leaves to the choose guard, which reads the pair
  beside the "or".
* ``length_guard`` — recall alone cannot see padding: pasting the question and every candidate's caption into the
  answer of a ``text`` question contains the reference's words and scores ~1, more than a correct sentence. The
  official QA multiplies Acc by fluency (BARTScore against the reference), which punishes that; the reward has no FL
  (BART cannot be loaded offline, and it would cost a forward pass per completion), so for ``choose``/``Others``/``text``
  ``g_len = min(1, (ρ · |A| + s) / |â|)``: words beyond ``ρ = 2`` times the full reference answer's (``A``, normalised,
  also when the keyword is what Acc reads) plus ``s = 4`` dilute the score. The slack keeps a sentence around a
  one-word answer whole ("It is Ether.", "Based on the images, ..."); an answer as long as the reference, or shorter,
  is untouched. Restating the question costs (a statement of the question plus the answer keeps 0.62 on average over
  the real val ``text`` questions); not counting the question's words would spare it but pay a pasted prompt ~0.7.

* ``keyword_guard`` — the public ``WebQA_train_val.json`` has no ``Keywords_A``, so a build from the real files
  scores every answer against the whole sentence ``A``, where recall pays whatever repeats it: restating the question
  earned 0.76 on the real val ``Others`` questions with their keywords blanked, the keyword itself 0.17. With no
  keyword the reward reads one derived from ``A`` (``derived_keyword``): on ``choose``/``Others``/``text``, the
  option ``A`` affirms where the question offers options, else ``A``'s words that are neither the question's nor
  stop words; on a ``YesNo`` sentence that says neither yes nor no, the verdict its negation gives. Then restating
  the question earns 0.04 and the keyword 0.82 (``benchmarks/bench_answer_guards.py``). The evaluation's QA-Acc
  stays official (against ``A``, WebQA's approximate val scoring). With options, a commitment to the option Acc's
  reference does not name earns nothing (recall paid "Mycena pura" half against "Mycena guldeniana", for the shared
  word), unless the whole reference makes it too; and with no keyword, options joined as alternatives ("X and Y")
  count as a hedge even where ``A`` names both.

**Total** (what GRPO sees, computed by TRL from ``GRPOConfig(reward_weights=...)``): ``r = Σ_c λ_c r_c``.

Every function is pure and never raises on a malformed completion; a missing *column* is a wiring error and
raises ``ValueError`` at once, naming it. Each function accepts and ignores TRL's extra keyword arguments
(``prompts``, ``completion_ids``, ``trainer_state``, unrelated columns).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mmrag_lite import metrics
from mmrag_lite.config import STAGE_COMPONENTS, Preset, get_preset
from mmrag_lite.parsing import Stage1Parse, Stage2Parse, parse_stage1, parse_stage2
from mmrag_lite.prompts import DEFAULT_TAGS, NO, QUESTION_PREFIX, YES, Tags

RewardFunc = Callable[..., list[float]]

RANKING_METRICS = ("f1", "ndcg")
ANSWER_METRICS = ("webqa", "mmqa_f1", "mmqa_em")


# ------------------------------------------------------------------------------------------------ helpers
def _column(name: str, columns: Mapping[str, Any], n: int) -> list[Any]:
    """A dataset column as TRL passes it (one value per completion); a missing or misaligned one is a wiring bug."""
    if name not in columns:
        raise ValueError(f"reward needs the dataset column {name!r}, but only {sorted(columns)} were passed")
    values = columns[name]
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"column {name!r} must be a list with one value per completion, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _optional_column(name: str, columns: Mapping[str, Any], n: int, default: Any) -> list[Any]:
    return _column(name, columns, n) if columns.get(name) is not None else [default] * n


def _check_penalty(penalty: float) -> float:
    """A finite number ≤ 0: an infinite or NaN penalty would make GRPO's group advantages NaN."""
    if not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty > 0:
        raise ValueError(f"penalty must be a finite number <= 0 (it is what unreadable output earns), got {penalty!r}")
    return float(penalty)


def _check_ndcg_k(k: Any) -> int | None:
    """``None`` (k = the number of gold ids shown) or a whole number ≥ 1: nDCG@0 (or below) has no slot to earn in, so
    the ranking reward would be 0 for every completion and GRPO would learn nothing from it, unseen."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"ndcg_k (the nDCG depth) must be None or a whole number >= 1, got {k!r}")
    return int(k)


def _ids(value: Any) -> list[str]:
    """Ids as the metrics spell them (``metrics.source_ids``): 30079629, 30079629.0 and "30079629" are one id."""
    return metrics.source_ids(value)


# ------------------------------------------------------------------------------------------------- format
def format_reward(
    completions: Sequence[Any], *, stage: int, reasoning: bool, penalty: float = 0.0, tags: Tags = DEFAULT_TAGS,
    min_think_words: int = 0, **columns: Any,
) -> list[float]:
    """1 for exactly the required structure of ``stage``, else ``penalty``. Stage 2 checks ids when ``candidate_ids`` is passed.

    With ``reasoning``, ``min_think_words`` also asks for that many words inside ``<think>``: an empty one is the
    cheapest well-formed completion and explains nothing. A floor against skipping the reasoning, not a judge of it."""
    penalty = _check_penalty(penalty)
    _check_min_think_words(min_think_words)
    if stage == 1:
        parses: list[Any] = [parse_stage1(c, reasoning=reasoning, tags=tags) for c in completions]
    elif stage == 2:
        cand = _ids_column_or_none("candidate_ids", columns, len(completions))
        parses = [parse_stage2(c, cand[i], reasoning=reasoning, tags=tags) for i, c in enumerate(completions)]
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return [1.0 if p.ok and not too_few_think_words(p, reasoning=reasoning, min_think_words=min_think_words) else penalty
            for p in parses]


def too_few_think_words(parsed: Stage1Parse | Stage2Parse, *, reasoning: bool, min_think_words: int) -> bool:
    """Whether a parse that asked for reasoning holds fewer than ``min_think_words`` words inside ``<think>`` (the
    format reward's floor; the playground says so when it is why the format pays nothing)."""
    return reasoning and len((parsed.think or "").split()) < min_think_words


def _check_min_think_words(min_think_words: Any) -> None:
    if isinstance(min_think_words, bool) or not isinstance(min_think_words, int) or min_think_words < 0:
        raise ValueError(f"min_think_words must be a whole number >= 0, got {min_think_words!r}")


def _ids_column_or_none(name: str, columns: Mapping[str, Any], n: int) -> list[list[str] | None]:
    if columns.get(name) is None:
        return [None] * n
    return [_ids(v) if v is not None else None for v in _column(name, columns, n)]


# ---------------------------------------------------------------------------------------------- relevance
def class_weights(positive_weight: float = 1.0) -> dict[str, float]:
    """``{yes: w_yes, no: w_no}`` scaled so the larger is 1 (rewards stay in [penalty, 1])."""
    if not positive_weight > 0 or math.isinf(positive_weight):
        raise ValueError(f"positive_weight must be a positive finite number, got {positive_weight!r}")
    top = max(positive_weight, 1.0)
    return {YES: positive_weight / top, NO: 1.0 / top}


def balanced_positive_weight(positive_fraction: float) -> float:
    """ρ = (1 − π) / π: each class then contributes equally in expectation (balanced accuracy)."""
    if not 0 < positive_fraction < 1:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction!r}")
    return (1 - positive_fraction) / positive_fraction


def relevance_reward(
    completions: Sequence[Any],
    label: Sequence[Any] | None = None,
    *,
    reasoning: bool = False,
    positive_weight: float = 1.0,
    penalty: float = 0.0,
    tags: Tags = DEFAULT_TAGS,
    **columns: Any,
) -> list[float]:
    """Stage 1: ``w_y`` for the right verdict, 0 for the wrong one, ``penalty`` when none can be read.

    The verdict is read even when the format around it is imperfect (the format reward judges that);
    a repeated or non yes/no verdict cannot be read. A row whose label is not yes/no earns 0.
    """
    penalty = _check_penalty(penalty)
    labels = _column("label", {"label": label} if label is not None else columns, len(completions))
    weights = class_weights(positive_weight)
    out = []
    for completion, gold in zip(completions, labels):
        verdict = parse_stage1(completion, reasoning=reasoning, tags=tags).label
        gold = gold.strip().lower() if isinstance(gold, str) else None
        if verdict is None:
            out.append(penalty)
        elif gold not in weights:
            out.append(0.0)
        else:
            out.append(weights[gold] if verdict == gold else 0.0)
    return out


# ------------------------------------------------------------------------------------------------ ranking
def ranking_score(selected: Sequence[str], gold: Sequence[str], candidates: Sequence[str] | None, *, metric: str = "f1", k: int | None = None) -> float:
    """The ranking reward of one parsed id list (see the module docstring); a repeated id counts once."""
    k = _check_ndcg_k(k)
    if metric not in RANKING_METRICS:  # before any early return: a row with no visible gold must not hide a typo
        raise ValueError(f"unknown ranking metric {metric!r}; choose one of {RANKING_METRICS}")
    selected = list(dict.fromkeys(_ids(selected)))
    gold_set = set(_ids(gold))
    if candidates is not None:
        gold_set &= set(_ids(candidates))
    if not gold_set:
        return 0.0
    if metric == "f1":
        hits = len(set(selected) & gold_set)
        return 2 * hits / (len(selected) + len(gold_set)) if hits else 0.0
    # ndcg
    depth = k if k is not None else len(gold_set)
    # ids past the depth earn nothing and dilute: the gold first, then every other candidate, is no ranking
    return metrics.ndcg_at_k(selected, gold_set, depth) * min(1.0, depth / max(len(selected), 1))


def ranking_reward(
    completions: Sequence[Any],
    candidate_ids: Sequence[Any] | None = None,
    gold_ids: Sequence[Any] | None = None,
    *,
    reasoning: bool = False,
    metric: str = "f1",
    k: int | None = None,
    penalty: float = 0.0,
    tags: Tags = DEFAULT_TAGS,
    **columns: Any,
) -> list[float]:
    """Stage 2: set-F1 or nDCG of the listed ids against ``gold_ids``; ``penalty`` when no sources block can be read.
    ``k`` (nDCG only) is the depth, ≥ 1; ``None`` is the number of gold ids shown."""
    penalty = _check_penalty(penalty)
    k = _check_ndcg_k(k)
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown ranking metric {metric!r}; choose one of {RANKING_METRICS}")
    n = len(completions)
    cols = dict(columns, candidate_ids=candidate_ids, gold_ids=gold_ids)
    cands = _column("candidate_ids", cols, n)
    golds = _column("gold_ids", cols, n)
    out = []
    for completion, cand, gold in zip(completions, cands, golds):
        cand_ids = _ids(cand) if cand is not None else None
        parsed = parse_stage2(completion, cand_ids, reasoning=reasoning, tags=tags)
        if parsed.source_ids is None:
            out.append(penalty)
            continue
        out.append(ranking_score(parsed.source_ids, _ids(gold), cand_ids, metric=metric, k=k))
    return out


# ------------------------------------------------------------------------------------------------- answer
HEDGE_GUARD_CATEGORIES = frozenset({"color", "shape", "YesNo", "number"})  # F1 over a closed vocabulary or numbers
RECALL_CATEGORIES = frozenset({"choose", "Others", "text"})  # scored by recall: where naming both options and padding paid
CHOOSE_BOTH_FACTOR = 0.5  # an answer naming both options of a question is worth a coin flip (module docstring)
OPTION_SPAN_WORDS = 4  # an option: at most this many words beside its "or", cut at , ; : ?
# Words that do not say which option a span is: they never count towards naming one.
_OPTION_FILLER = frozenset({"a", "an", "the", "of", "in", "on", "at", "to", "for", "with", "by", "from", "and", "is",
                            "are", "was", "were", "be", "it", "its", "this", "that", "than", "more", "less", "which",
                            "what", "who", "does", "do", "did", "has", "have", "between"})
_JOINERS = frozenset({"or", "and", "vs", "versus", "both"})  # what may stand between two options set side by side
# The list guard's separators ("Ether, India, Gold" / "Monet or Manet"). Alternatives ("or", "/", "vs") hedge openly:
# two items make a list. An enumeration ("," ";" "and", a line break, a
# bullet, " - ", " & ", a period after a word) takes three: "Paris, France", "tall and thin" and "Mercury, a planet
# near the Sun" are one claim with a qualifier. Not a comma inside a number ("1,500"), not "&" inside a name ("H&M").
_ALTERNATIVES = r"\bor\b|\bnor\b|/|\||\bvs\b\.?|\bversus\b"
_LIST_ALTERNATIVE = re.compile(_ALTERNATIVES, re.IGNORECASE)
_LIST_SPLIT = re.compile(_ALTERNATIVES + r"|(?<!\d),|,(?!\d)|;|\n|\band\b|\s[-\u2013\u2014+&*\u2022]\s|(?<=\w\w\w)\.\s+"
                         r"|^\s*[-*\u2022]\s+", re.IGNORECASE)
# Words that open one more guess ("Ether, or perhaps India"), not the rest of a sentence.
_GUESS_OPENERS = frozenset({"perhaps", "maybe", "possibly", "probably", "likely", "also", "either", "else",
                            "otherwise", "alternatively"})
# Numbers a (normalised) question offers as options: context no more, or "3 or 4" would pay as if it were no guess.
# Not "between 1990 and 2000" (a range) nor "in 2010 or 2011" (years): those stay context.
_NUMBER_OPTIONS = re.compile(r"\b(?!1\d\d\d\b|20\d\d\b)\d[\d.]* or (?!1\d\d\d\b|20\d\d\b)\d[\d.]*\b")
LIST_ITEM_WORDS = 4  # a list has at least two guesses this short (normalised words); longer pieces are clauses
LENGTH_GUARD_RATIO = 2.0  # answers up to twice the reference answer's length, plus the slack, keep their whole score
LENGTH_GUARD_SLACK = 4  # words a sentence adds around a short answer ("It is ...", "Based on the images, ...")


def question_from_prompt(prompt: Any) -> str | None:
    """The question of a stage-2 prompt (TRL passes the row's ``prompt`` to rewards as ``prompts``): the text after
    the last ``Question:`` of the last user message (or of a plain-string prompt); ``None`` when there is none."""
    text = prompt if isinstance(prompt, str) else None
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, Mapping) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    text = content
                elif isinstance(content, (list, tuple)):
                    text = "".join(p.get("text") or "" for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
                break
    if not text or QUESTION_PREFIX not in text:
        return None
    return text.rsplit(QUESTION_PREFIX, 1)[1].strip() or None


_WORD = re.compile(r"\w+")
_ARTICLES = frozenset({"a", "an", "the"})


def _plain(text: str) -> str:
    """Lower-cased words without punctuation or articles, not lemmatised (spaCy's lemma depends on the context:
    "sideways" is "sideway" in a question but "sideways" alone, so the choose guard checks both forms)."""
    return " ".join(w for w in _WORD.findall(text.lower()) if w not in _ARTICLES)


_OPTION_TOKEN = re.compile(r"\w+|[,;:?]")
_OPTION_BREAKS = frozenset(",;:?")
# A denial and the rest of its clause: "upwards, not sideways", "rather than sideways", "it isn't sideways". In "not as
# tall as it is wide" only "as tall" is denied: what follows the second "as" is what the sentence affirms (wider). A
# contrast word ends the clause: in "not sideways but upwards" and "I'm not sure, but ..." what follows is affirmed
# ("not yet red" still denies red: the clause holds a word before its contrast word). "Not only X but also Y" denies
# nothing: it names both.
_DENIAL = re.compile(r"(?:\b(?:not(?!\s+(?:only|just|merely)\b)|never|rather than|instead of)\b|n't\b)"
                     r"(\s+(?:as|so)\s+\w+(?=\s+as\b)"
                     r"|[^,.;:!?]+?(?=\s+(?:but|yet|though|although|instead|rather)\b|[,.;:!?]|$)|[^,.;:!?]*)",
                     re.IGNORECASE)
# A lead-in that restates the options before committing: "Of upwards and sideways, it grows upwards." Only when it
# names both options of a pair is it cut (``_without_restated_options``): the commitment after it is what is scored.
_LEAD_IN = re.compile(r"^\s*(?:of|between|among|from|out of|comparing|considering)\b([^,.;:!?]*)[,:]\s*(?=\S)",
                      re.IGNORECASE)


# A clause that denies what precedes its verb: "The Tokyo Tower; the Eiffel Tower is not.", "Upwards. Sideways is
# wrong.", "The Eiffel Tower isn't as tall." (up to four words before the verb, which must end its clause: in "X is
# made of wood, as opposed to Y which is not" only "opposed to Y which"). Not "X is not as tall as Y": that one goes
# on past its "as tall" and is read by _DENIAL.
_POST_DENIAL = re.compile(r"\b((?:[^\W_]+[\s'\u2019-]+){0,3}[^\W_]+)\s+(?:is|are|was|were|does|do|did)"
                          r"(?:\s+not\b|n['\u2019]t\b|\s+(?:wrong|incorrect|false)\b)(?:\s+(?:as|so)\s+\w+)?\s*(?=[,.;:!?]|$)",
                          re.IGNORECASE)


def _denied_text(text: str) -> str:
    """The clauses a text denies (what follows a "not", "rather than", ... up to the next punctuation)."""
    return " ".join(m.group(1) for pattern in (_DENIAL, _POST_DENIAL) for m in pattern.finditer(text))


def _without_denials(text: str) -> str:
    """``text`` with its denied clauses cut (both kinds): what it affirms, in order."""
    return _DENIAL.sub(" ", _POST_DENIAL.sub(" ", text))


def _without_restated_options(answer: str, spans: Sequence[tuple[str, str]]) -> str:
    """``answer`` without a lead-in that only restates both options of a pair ("Between the Eiffel Tower and the Tokyo
    Tower, the Eiffel Tower is taller" is scored as "the Eiffel Tower is taller"). Kept, the lead-in names both options,
    so the choose guard paid a right and a wrong commitment the same half."""
    lead_in = _LEAD_IN.match(answer)
    if lead_in is None:
        return answer
    said = set(_plain(lead_in.group(1)).split())
    for left, right in spans:
        left_words, right_words = _plain(left).split(), _plain(right).split()
        # an option is named by half of its own words, or by its own word nearest the "or" ("grow upwards or sideways")
        own_left = [w for w in left_words if w not in right_words and w not in _OPTION_FILLER]
        own_right = [w for w in right_words if w not in left_words and w not in _OPTION_FILLER]
        nearest = (own_left[-1] if own_left else None, own_right[0] if own_right else None)

        def names(words: set[str], own: list[str], word: str | None) -> bool:
            return _names_option(words, set(own)) or word in words

        rest = answer[lead_in.end():]
        if all(names(said, own, word) for own, word in zip((own_left, own_right), nearest)):
            # "Of X and Y, the former.": a rest that names no option leaves nothing to score, so the whole answer is
            rest_words = set(_plain(rest).split())
            return rest if any(names(rest_words, own, word) for own, word in zip((own_left, own_right), nearest)) else answer
    return answer


def _affirmed(text_norm: str, denied_norm: str, option_words: set[str]) -> str:
    """``text_norm`` less one occurrence of each option word per denial of it: "upwards, not sideways" names and
    answers upwards only (the scores count words, not their places)."""
    denied = Counter(w for w in denied_norm.split() if w in option_words)
    if not denied:
        return text_norm
    kept = []
    for word in text_norm.split():
        if denied[word] > 0:
            denied[word] -= 1
        else:
            kept.append(word)
    return " ".join(kept)


def _option_joints(words: Sequence[str]) -> list[int]:
    """Where an either-or question sets its options apart: each ``or``, and the ``and`` of "Between X and Y"."""
    joints = [j for j, w in enumerate(words) if w == "or"]
    if words[:1] == ["between"] and "and" in words:
        joints.append(words.index("and"))
    return joints


def _option_words(spans: Sequence[tuple[str, str]]) -> set[str]:
    """Every word that can say which option a text means (``_affirmed`` drops the denied ones)."""
    return {w for pair in spans for span in pair for w in span.split()} - _OPTION_FILLER


def option_spans(question: str) -> list[tuple[str, str]]:
    """The two options beside each ``or`` of an either-or question (and the ``and`` of "Between X and Y"): up to
    ``OPTION_SPAN_WORDS`` words on each side, cut at the , ; : ? with which WebQA's writers set the options off."""
    tokens = _OPTION_TOKEN.findall(question.lower())

    def words(side: Iterable[str]) -> list[str]:  # the nearest words up to a break, nearest first
        return list(itertools.takewhile(lambda t: t not in _OPTION_BREAKS, side))[:OPTION_SPAN_WORDS]

    spans = [(" ".join(words(reversed(tokens[:j]))[::-1]), " ".join(words(tokens[j + 1:])))
             for j in _option_joints(tokens)]
    return [(left, right) for left, right in spans if left and right]


def _names_option(said: set[str], own_words: set[str]) -> bool:
    """An answer names an option when it holds at least half of the option's own words."""
    return bool(own_words) and 2 * len(own_words & said) >= len(own_words)


def _joins_options(tokens: Sequence[str], left: set[str], right: set[str], shared: set[str]) -> bool:
    """Two options joined as alternatives: an "or" anywhere, or the two side by side with at most two words between
    them, each a joiner or a word both options share ("X, Y", "X and Y", "pump organ and Wurlitzer organ")."""
    if "or" in tokens:
        return True
    sides = [(i, t in left) for i, t in enumerate(tokens) if t in left or t in right]
    return any(
        left_a != left_b and j - i <= 3 and all(t in _JOINERS or t in shared for t in tokens[i + 1:j])
        for (i, left_a), (j, left_b) in itertools.pairwise(sides)
    )


def _word_pairs(words: Sequence[str]) -> list[tuple[set[str], set[str], set[str]]]:
    """The word pair of each joint of a normalised question: the nearest word on each side, not a filler, that the
    other side's ``OPTION_SPAN_WORDS`` words lack. Two options that share a head noun ("red car or blue car", "Busan ...
    Stadium or Sydney football stadium") pair "red" with "blue", not "car" with "blue", which a committed "the blue
    car" would name both of; a side with no such word gives no pair."""
    pairs = []
    for j in _option_joints(words):
        before, after = words[max(0, j - OPTION_SPAN_WORDS):j], words[j + 1:j + 1 + OPTION_SPAN_WORDS]
        left = next((w for w in reversed(before) if w not in after and w not in _OPTION_FILLER), None)
        right = next((w for w in after if w not in before and w not in _OPTION_FILLER), None)
        if left is not None and right is not None:
            pairs.append(({left}, {right}, set()))
    return pairs


def _first_at(tokens: Sequence[str], option: set[str]) -> int:
    """Where a text first names an option (one of its words); past the end when it never does."""
    return next((i for i, t in enumerate(tokens) if t in option), len(tokens))


def _leads_with_other(said: Sequence[str], whole: Sequence[str], left: set[str], right: set[str],
                      keyword_left: bool | None) -> bool:
    """An answer that names both options in the other order from a reference sentence that names both: it leads (names
    first) with the option the reference does not lead with, and not with the one Acc's reference names alone
    (``keyword_left``: ``None`` when it names both or neither). ``left``/``right`` are the option words that occur once
    in the question (a word two long options share, "Mayo Clinic ... or Mayo Clinic ...", says nothing about order);
    both texts must name both, with denied clauses cut out (``_DENIAL``: "X, not Y" leads with X)."""
    at = [(_first_at(text, left), _first_at(text, right), len(text)) for text in (said, whole)]
    if not left or not right or any(max(i, j) >= n for i, j, n in at):
        return False
    (said_l, said_r, _), (whole_l, whole_r, _) = at
    leads_left = said_l < said_r
    return leads_left != (whole_l < whole_r) and leads_left != keyword_left


def _hedges_between_options(answer_norm: str, question_norm: str, acc_reference_norm: str, whole_reference_norm: str,
                            spans: Sequence[tuple[str, str]] = (), order_norms: tuple[str, str] | None = None, *,
                            no_keyword: bool = False) -> bool:
    """The choose guard's test on texts normalised alike (``spans`` from ``option_spans``; ``acc_reference_norm`` what
    Acc reads, the keyword when there is one; ``whole_reference_norm`` the whole reference answer; ``order_norms`` the
    answer and the whole reference with their denied clauses cut, where they have any). An option pair is the nearest
    words either side of an ``or`` (or the ``and`` of "between X and Y") that the other side lacks (``_word_pairs``), or
    the own words of two option spans (those the other option lacks, fillers aside). The answer hedges when it names
    both options of a pair and either the whole reference names only one of them; or the whole reference names both and
    the answer leads with the other one (``_leads_with_other``: "Y has more than X" against "X has more than Y" holds
    the same words, and a bag of words cannot tell "Y has fewer than X" from a wrong answer, so it earns a coin flip);
    or the answer joins them as alternatives while Acc's reference names one (or, with no keyword, whatever it names:
    then Acc reads a sentence naming both, which pays "X and Y" twice what it pays "X") and the whole reference does not
    join them itself ("X is taller than Y" names both; "X or Y" and "X, Y" are hedges)."""
    words = question_norm.split()
    said_tokens, whole_tokens = answer_norm.split(), whole_reference_norm.split()
    said, acc_ref = set(said_tokens), set(acc_reference_norm.split())
    whole_ref = acc_ref | set(whole_tokens)
    said_order, whole_order = (text.split() for text in (order_norms or (answer_norm, whole_reference_norm)))
    once = {w for w, c in Counter(words).items() if c == 1}
    options = _word_pairs(words)
    for left, right in spans:
        left_words, right_words = set(left.split()), set(right.split())
        options.append((left_words - right_words - _OPTION_FILLER, right_words - left_words - _OPTION_FILLER,
                        left_words & right_words))

    def names_one(bag: set[str], left: set[str], right: set[str]) -> bool:
        return bool(left & bag) != bool(right & bag)

    for left, right, shared in options:
        if not (_names_option(said, left) and _names_option(said, right)):
            continue
        if names_one(whole_ref, left, right):
            return True
        keyword_left = bool(left & acc_ref) if names_one(acc_ref, left, right) else None
        if _leads_with_other(said_order, whole_order, left & once, right & once, keyword_left):
            return True
        # the whole reference names both (or neither): only alternatives set side by side, as the reference does not
        if ((names_one(acc_ref, left, right) or no_keyword) and _joins_options(said_tokens, left, right, shared)
                and not _joins_options(whole_tokens, left, right, shared)):
            return True
    return False


_NEGATIVE = re.compile(r"\b(?:no|not|never|none|nor)\b|n['\u2019]t\b", re.IGNORECASE)


def derived_keyword(reference_norm: str, question_norm: str, qcate: str, *, answer_text: str = "",
                    affirmed: str | None = None, pairs: Sequence[tuple[set[str], set[str]]] | None = None) -> str:
    """The keyword the reward reads when a row has none (``keyword_guard``), from the normalised whole answer.

    Recall against a whole sentence pays whatever repeats it, and a restated question repeats most of it (0.76 on
    the real val ``Others`` questions with their keywords blanked, against 0.17 for the keyword itself). So:

    * ``choose``/``Others``/``text`` with options (an ``or``): the option the answer affirms (``affirmed``: the answer
      with denied clauses cut) of the first pair it names ("The fence is taller than a bicycle" → "tall"); of two it
      names, the one it leads with ("The Tokyo Tower is taller than the Eiffel Tower" → "tokyo"). On the real val
      ``choose`` questions, whose keywords are known, it named the keyword's option in 387 of the 400 where both name
      one (``benchmarks/bench_answer_guards.py``, its sixth table). ``pairs``:
      each option pair's words in every form the lemmatiser gives them (in the question's context and alone: "taller"
      there, "tall" in an answer), ``_word_pairs`` of the question when not given;
    * otherwise the answer's words that are neither the question's nor stop words ("Both ... have grass and trees
      growing near them" → "grass tree"), the whole answer when none are left;
    * ``YesNo`` whose answer says neither yes nor no ("The cathedral has trees outside of it."): "no" when
      ``answer_text`` holds a negation, else "yes" (every answer scored 0 there);
    * anything else: the whole answer (a closed vocabulary already ignores the question's other words).
    """
    if qcate == "YesNo":
        if metrics.webqa_bags(reference_norm, reference_norm, qcate)[1]:
            return reference_norm
        return "no" if _NEGATIVE.search(answer_text) else "yes"
    if qcate not in RECALL_CATEGORIES:
        return reference_norm
    asked = question_norm.split()
    affirmed_tokens = (reference_norm if affirmed is None else affirmed).split()
    affirmed_words = set(affirmed_tokens)
    for left, right in pairs if pairs is not None else [(a, b) for a, b, _ in _word_pairs(asked)]:
        if left & affirmed_words and right & affirmed_words:  # "X is taller than Y": the one it leads with
            named = left if _first_at(affirmed_tokens, left) < _first_at(affirmed_tokens, right) else right
        elif left & affirmed_words or right & affirmed_words:
            named = left if left & affirmed_words else right
        else:
            continue
        return " ".join(sorted(named & affirmed_words))
    if _option_joints(asked):
        return reference_norm  # names no option of any pair: nothing to choose between
    stop, asked_words = _list_stop_words(), set(asked)
    novel = [w for w in reference_norm.split() if w not in asked_words and w not in stop]
    return " ".join(novel) or reference_norm


def _as_written(texts: Sequence[str], plain_spans: Sequence[tuple[str, str]]) -> list[str]:
    """``texts`` as written (``_plain``, not lemmatised) less the option words they deny: the choose guards' second
    reading, for where the lemmatiser's context reads an option otherwise."""
    options = _option_words(plain_spans)
    return [_affirmed(_plain(t), _plain(_denied_text(t)), options) for t in texts]


def _commits_to_other(answer: str, reference: str, whole_reference: str,
                      pairs: Sequence[tuple[set[str], set[str]]]) -> bool:
    """The answer names one option of a pair, Acc's reference only the other, and the whole reference not the
    answer's (all as affirmed, denials cut): a wrong commitment, which recall still paid for the words two options
    share ("Mycena pura" against "Mycena guldeniana" earned 0.5). An answer that names the other option to compare
    ("Y is shorter than X") names both; one the whole reference makes (a keyword that contradicts its own sentence)
    is spared."""
    said, ref, whole = (set(t.split()) for t in (answer, reference, whole_reference))
    for left, right in pairs:
        mine = left if left & said else right
        if (bool(left & said) != bool(right & said) and bool(left & ref) != bool(right & ref)
                and not mine & ref and not mine & whole):
            return True
    return False


# An opening clause that cites where the answer comes from ("Based on D1 and D3, ...", "From the snippets and titles,
# ..."): explaining which documents were used is what stage 2 asks for, so its "and" and commas are no list of guesses.
_SOURCE_OPENER = re.compile(
    r"^\s*(?:based on|according to|from|in|looking at|judging (?:by|from)|given|as (?:shown|seen|stated) in)\b[^,;:]*?"
    r"\b(?:D\d+(?:\s*(?:,\s*(?:and\s+)?|and\s+|&\s*)D\d+)*|images?|pictures?|photos?|captions?|snippets?"
    r"|documents?|sources?|texts?|titles?|evidence|candidates?|context|passages?)\b[^,;:]*[,:]\s*", re.IGNORECASE)


def _list_items(answer: str) -> tuple[list[str], bool]:
    """The pieces of an answer split at list separators (raw text: normalising drops the commas), and whether an
    alternative ("or", "/", "vs") separates any; ``([], False)`` for one piece. A first piece that a comma or semicolon
    ends is marked with a trailing "," (an opener, "Based on the images,", or the first guess)."""
    first = _LIST_SPLIT.search(answer)
    pieces = [p.strip() for p in _LIST_SPLIT.split(answer)]
    if first is not None and first.group() in ",;" and pieces[0]:
        pieces[0] += ","
    pieces = [p for p in pieces if p]
    return (pieces, bool(_LIST_ALTERNATIVE.search(answer))) if len(pieces) >= 2 else ([], False)


@functools.cache
def _list_stop_words() -> frozenset[str]:
    """spaCy's English stop words, less "yes" and "no": a list of those two is a hedge, not filler."""
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS) - {"yes", "no"}


def _list_share_held(items_norm: Sequence[str], items_raw: Sequence[str], reference_norm: str, reference_raw: str,
                     question_norm: str, alternatives: bool) -> float:
    """The list guard's factor: 1 unless the answer lists guesses (two or more joined as alternatives, three or more
    enumerated), two of them short; then the share of the guesses that hold a word of the reference (keyword and
    whole answer), compared normalised or as written: an item lemmatised alone can differ from the same word in the
    reference ("Leaves" alone -> "leave", in "leaves and petals" -> "leaf"). A guess is the first piece, or a later
    one that does not open with a stop word (articles dropped) or opens with a guess opener ("perhaps", "also"):
    "not sideways", "towards the light", "which is tall" and "it grows upwards" continue a sentence, and a piece of
    stop words and question words only ("it is" of "Yes, it is") says nothing. The first piece is an opener, no
    guess, when a comma ends it, it holds a stop word and no word of the reference ("Based on the images, ...")."""
    stop = _list_stop_words()
    ignored = stop | _GUESS_OPENERS | set(question_norm.split())
    reference, reference_plain = set(reference_norm.split()), set(_plain(reference_raw).split())

    def holds(norm: set[str], raw: set[str]) -> bool:
        return bool(norm & reference or raw & reference_plain)

    items = []
    for i, (norm, raw) in enumerate(zip(items_norm, items_raw)):
        words = norm.split()
        content, plain = set(words) - ignored, set(_plain(raw).split()) - ignored
        opener = (words or [""])[0]
        if i > 0 and opener in stop and opener not in _GUESS_OPENERS:
            continue  # the sentence goes on
        if i == 0 and raw.endswith(",") and set(words) & stop and not holds(content, plain):
            continue  # an opener
        if content:
            items.append((content, plain, len(words) <= LIST_ITEM_WORDS))
    if len(items) < (2 if alternatives else 3) or sum(short for _, _, short in items) < 2:
        return 1.0  # one claim (with a qualifier), or a sentence whose commas set off long clauses
    return sum(holds(norm, raw) for norm, raw, _ in items) / len(items)


def _gold_spans(gold: Any) -> list[Any]:
    """An MMQA reference as ``metrics.mmqa_em_f1`` reads it: a string or a number (``1985.0``) is one span, a list of
    spans stays one, a list of such lists is several references, and MMQA's raw answer dicts (``{"answer": ...,
    "type": ...}``) give their answer (they were read as their repr, and a list of lists as the text "['Paris']")."""
    if isinstance(gold, numbers.Real) and not isinstance(gold, bool) and math.isnan(gold):
        return []  # a gap in a number column (pandas reads a missing answer as NaN): no reference, not the text "nan"
    if isinstance(gold, (str, numbers.Number)):
        return [str(gold)]
    if isinstance(gold, Mapping):
        return _gold_spans(gold.get("answer"))
    if isinstance(gold, (list, tuple)) and gold and all(isinstance(g, (list, tuple)) for g in gold):
        return [_gold_spans(g) for g in gold]
    if isinstance(gold, (list, tuple)):
        return [span for g in gold for span in _gold_spans(g)]
    return _ids(gold)


def answer_reward(
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    *,
    reasoning: bool = False,
    metric: str = "webqa",
    penalty: float = 0.0,
    choose_guard: bool = True,
    hedge_guard: bool = True,
    length_guard: bool = True,
    keyword_guard: bool = True,
    tags: Tags = DEFAULT_TAGS,
    **columns: Any,
) -> list[float]:
    """Stage 2: the answer's accuracy against the row's reference; ``penalty`` when no single answer block can be read.

    ``webqa`` uses the optional columns ``keywords`` (preferred when non-empty) and ``qcate`` (default ``text``), and
    the question (column ``question``, else TRL's ``prompts``; without either, ``choose_guard`` is off for that row
    and a number the question states counts as a guess). ``choose_guard``, ``hedge_guard`` and ``length_guard`` close
    the reward hacks the official metric leaves open (module docstring), and ``keyword_guard`` reads a keyword derived
    from the answer where a row has none (the public train file): all four on by default, because a reward that pays
    copying the question, hedging or padding teaches exactly that.
    """
    penalty = _check_penalty(penalty)
    if metric not in ANSWER_METRICS:
        raise ValueError(f"unknown answer metric {metric!r}; choose one of {ANSWER_METRICS}")
    n = len(completions)
    answers = _column("answer", dict(columns, answer=answer), n)
    parsed = [parse_stage2(c, None, reasoning=reasoning, tags=tags).answer for c in completions]
    readable = [i for i, a in enumerate(parsed) if a is not None]
    out = [penalty] * n
    if not readable:
        return out
    if metric == "webqa":
        scores = _webqa_answer_scores(
            [parsed[i] for i in readable], [answers[i] for i in readable], columns, readable, n,
            choose_guard=choose_guard, hedge_guard=hedge_guard, length_guard=length_guard, keyword_guard=keyword_guard)
    else:
        position = 0 if metric == "mmqa_em" else 1
        scores = []
        for i in readable:
            gold = _gold_spans(answers[i])
            scores.append(metrics.mmqa_em_f1(parsed[i], gold)[position] if gold else 0.0)
    for i, s in zip(readable, scores):
        out[i] = float(s)
    return out


def _webqa_answer_scores(said: list[str], answers: list[Any], columns: Mapping[str, Any], rows: list[int], n: int, *,
                         choose_guard: bool, hedge_guard: bool, length_guard: bool, keyword_guard: bool) -> list[float]:
    """Official QA-Acc of each readable answer (one spaCy batch for answers, references and questions), then the guards."""
    keywords = _optional_column("keywords", columns, n, "")
    qcates = _optional_column("qcate", columns, n, "text")
    refs = [metrics.qa_reference(a, keywords[i]) for a, i in zip(answers, rows)]
    qc = [metrics.canonical_qcate(qcates[i]) or "text" for i in rows]  # a category WebQA lacks: the text rule
    # no keyword (the public WebQA train file has none): the reward reads a keyword derived from the whole answer
    derive = [keyword_guard and not (isinstance(keywords[i], str) and keywords[i].strip()) for i in rows]
    # the question: the options of a recall question, and the numbers a number question states (context, not a guess)
    wants_question = [((choose_guard or hedge_guard or d) and c in RECALL_CATEGORIES) or (hedge_guard and c == "number")
                      for c, d in zip(qc, derive)]
    questions: list[str | None] = [None] * len(rows)
    if any(wants_question):
        if columns.get("question") is not None:
            asked = _column("question", columns, n)
            questions = [asked[i] if isinstance(asked[i], str) else None for i in rows]
        elif columns.get("prompts") is not None:  # a misaligned prompts column would switch the guards off unseen
            prompts = _column("prompts", columns, n)
            questions = [question_from_prompt(prompts[i]) for i in rows]
        questions = [q if wanted else None for q, wanted in zip(questions, wants_question)]
    # the whole reference answer: the length a fluent answer has, and (with the keyword) all that the reference says
    guarded = [((choose_guard or length_guard) and c in RECALL_CATEGORIES) or (hedge_guard and c in HEDGE_GUARD_CATEGORIES)
               for c in qc]
    whole = [metrics.qa_reference(a, "") if g else "" for a, g in zip(answers, guarded)]
    spans = [option_spans(q) if q and (choose_guard or d) and c in RECALL_CATEGORIES else []
             for q, c, d in zip(questions, qc, derive)]
    written = said
    said = [_without_restated_options(t, sp) if sp else t for t, sp in zip(said, spans)]  # what follows a restatement
    # the answer as written, where a lead-in was cut: the cut text is lemmatised alone, which can read it otherwise
    cut = [j for j in range(len(rows)) if said[j] != written[j]]
    written_norm = dict(zip(cut, metrics.normalize_webqa_many([written[j] for j in cut]))) if cut else {}
    # what the answer and the references deny, where the question has options: a denied option is not named
    denials = [[_denied_text(t) for t in (said[j], refs[j], whole[j])] if spans[j] else ["", "", ""] for j in range(len(rows))]
    # the answer and the whole reference with denied clauses cut, where they have any: the order they name options in
    uncut = [[_without_denials(t) if spans[j] and _denied_text(t).strip() else None for t in (said[j], whole[j])]
             for j in range(len(rows))]
    normed = metrics.normalize_webqa_many(
        said + refs + [q or "" for q in questions] + whole + [d for row in denials for d in row]
        + [text for pairs in spans for pair in pairs for text in pair]
        + [t for row in uncut for t in row if t is not None])
    # the items of an answer that lists guesses (recall categories): normalised in one more batch
    listed = [_list_items(_SOURCE_OPENER.sub("", t, count=1)) if hedge_guard and c in RECALL_CATEGORIES else ([], False)
              for t, c in zip(said, qc)]
    items = [pieces for pieces, _ in listed]
    flat_items = iter(metrics.normalize_webqa_many([t for row in items for t in row]))
    normed_items = [[next(flat_items) for _ in row] for row in items]
    k = len(rows)
    normed_denials = [normed[4 * k + 3 * j: 4 * k + 3 * j + 3] for j in range(k)]
    normed_rest = iter(normed[7 * k:])
    normed_spans = [[(next(normed_rest), next(normed_rest)) for _ in pairs] for pairs in spans]
    normed_uncut = [[next(normed_rest) if t is not None else None for t in row] for row in uncut]
    # each option word lemmatised on its own too: the lemmatiser reads context, so "red tower taller" keeps "taller"
    # while the denial "not taller" alone reads "tall"; without both forms "Shorter, not taller" still named taller
    span_words = [sorted(_option_words(pairs)) for pairs in normed_spans]
    flat_words = iter(metrics.normalize_webqa_many([w for row in span_words for w in row]))
    option_word_sets = [_option_words(pairs) | {w for _ in row for w in next(flat_words).split()}
                        for pairs, row in zip(normed_spans, span_words)]
    # the option pairs (a derived keyword chooses between them; a commitment to the other one earns nothing), each
    # word also lemmatised alone (a question's "taller" is an answer's "tall")
    word_pairs = [[(a, b) for a, b, _ in _word_pairs(normed[2 * k + j].split())] if spans[j] else [] for j in range(k)]
    pair_words = sorted({w for row in word_pairs for a, b in row for w in a | b})
    alone = dict(zip(pair_words, metrics.normalize_webqa_many(pair_words)))

    def forms(side: set[str]) -> set[str]:
        return side | {w for v in side for w in alone[v].split()}

    pair_forms = [[(forms(a), forms(b)) for a, b in row] for row in word_pairs]
    out = []
    for j in range(k):
        cand, ref, question, whole_ref = normed[j], normed[k + j], normed[2 * k + j], normed[3 * k + j]
        if derive[j]:
            ref = derived_keyword(normed[k + j], question, qc[j], answer_text=refs[j], pairs=pair_forms[j],
                                  affirmed=_affirmed(normed[k + j], normed_denials[j][1], option_word_sets[j]))
        score = metrics.webqa_scores_from_normalized(cand, ref, qc[j])["acc"]
        if j in written_norm:  # never more than the official score of what the model wrote
            score = min(score, metrics.webqa_scores_from_normalized(written_norm[j], ref, qc[j])["acc"])
        halved = False
        said_order, whole_order = (t if t is not None else full for t, full in zip(normed_uncut[j], (cand, whole_ref)))
        if spans[j]:  # from here on, what each text affirms; never more than the official score
            option_words = option_word_sets[j]
            cand, ref, whole_ref = (_affirmed(text, denied, option_words)
                                    for text, denied in zip((cand, ref, whole_ref), normed_denials[j]))
            score = min(score, metrics.webqa_scores_from_normalized(cand, ref, qc[j])["acc"])
        if score and choose_guard and qc[j] in RECALL_CATEGORIES and questions[j]:
            plain_spans = [(_plain(left), _plain(right)) for left, right in spans[j]]
            plain_said, plain_ref, plain_whole = _as_written((said[j], refs[j], whole[j]), plain_spans)
            plain_order = (_plain(_without_denials(said[j])), _plain(_without_denials(whole[j])))
            if (_hedges_between_options(cand, question, ref, whole_ref, normed_spans[j], (said_order, whole_order),
                                        no_keyword=derive[j])
                    or _hedges_between_options(plain_said, _plain(questions[j]), plain_ref, plain_whole, plain_spans,
                                               plain_order, no_keyword=derive[j])):
                score *= CHOOSE_BOTH_FACTOR
                halved = True
        if score and choose_guard and not halved and _commits_to_other(cand, ref, whole_ref, pair_forms[j]):
            # read again as written (not lemmatised): the lemmatiser's context can hide an option ("chanterelless")
            plain_said, plain_ref, plain_whole = _as_written((said[j], refs[j], whole[j]),
                                                             [(_plain(left), _plain(right)) for left, right in spans[j]])
            plain_ref = ref if derive[j] else plain_ref
            plain_pairs = [(a, b) for a, b, _ in _word_pairs(_plain(questions[j] or "").split())]
            if _commits_to_other(plain_said, plain_ref, plain_whole, plain_pairs):
                score = 0.0  # "Mycena pura" for "Mycena guldeniana": recall paid the shared word
        if score and hedge_guard and normed_items[j] and not halved:
            score *= _list_share_held(normed_items[j], items[j], f"{ref} {whole_ref}", f"{refs[j]} {whole[j]}", question,
                                      listed[j][1])
        if score and hedge_guard and qc[j] in HEDGE_GUARD_CATEGORIES:
            named = set(metrics.webqa_bags(cand, ref, qc[j])[0])  # not empty: the score is not 0
            stated = _NUMBER_OPTIONS.sub(" ", question) if qc[j] == "number" else ""  # "3 or 4" are the choices
            context = f"{ref} {whole_ref} {stated}"
            held = set(metrics.webqa_bags(context, context, qc[j])[0])
            score *= len(named & held) / len(named)
        if score and length_guard and qc[j] in RECALL_CATEGORIES and whole[j]:
            allowance = LENGTH_GUARD_RATIO * max(1, len(whole_ref.split())) + LENGTH_GUARD_SLACK
            score *= min(1.0, allowance / max(1, len(cand.split())))
        out.append(score)
    return out


# ------------------------------------------------------------------------------------------------ builder
def _named(name: str, func: Callable[..., list[float]], **bound: Any) -> RewardFunc:
    """A reward function with its options bound and ``__name__`` = the component (TRL logs ``rewards/<name>/mean``)."""

    def reward(completions: Sequence[Any], **columns: Any) -> list[float]:
        columns = {k: v for k, v in columns.items() if k not in bound}  # a column never overrides an option
        return func(completions, **bound, **columns)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"{name} reward ({func.__name__} with {bound})"
    return reward


def build_reward_funcs(
    stage: int,
    weights: Mapping[str, float],
    *,
    reasoning: bool,
    ranking_metric: str = "f1",
    balance_classes: bool = False,
    positive_fraction: float | None = None,
    positive_weight: float | None = None,
    penalty: float = 0.0,
    ndcg_k: int | None = None,
    answer_metric: str = "webqa",
    choose_guard: bool = True,
    hedge_guard: bool = True,
    length_guard: bool = True,
    keyword_guard: bool = True,
    min_think_words: int = 0,
    task_needs_format: bool = False,
    tags: Tags = DEFAULT_TAGS,
) -> tuple[list[RewardFunc], list[float]]:
    """The reward functions of one stage and their weights, in the same order, for ``GRPOTrainer``/``GRPOConfig``.

    ``weights`` maps component → λ (``preset.stageN.weights``); components come back in the canonical order
    (format, relevance) / (format, ranking, answer). ``balance_classes`` re-weights stage-1 verdicts with
    ``ρ = positive_weight`` if given, else ``(1 − π)/π`` from ``positive_fraction`` (default 0.5, i.e. no change).
    ``choose_guard`` / ``hedge_guard`` / ``length_guard`` are the answer reward's guards against copying the question,
    hedging and padding; ``keyword_guard`` derives a keyword where a row has none, as in the public train file. ``ndcg_k`` is the nDCG depth (a whole number ≥ 1; ``None``: the number of gold ids shown).
    ``min_think_words``: the format reward's floor on the words inside ``<think>`` (``format_reward``).
    ``task_needs_format``: relevance / ranking / answer pay only where the format reward (these options) pays, and
    ``penalty`` elsewhere; off, each component is scored on its own (R1-style; our default).
    """
    if stage not in STAGE_COMPONENTS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    known = STAGE_COMPONENTS[stage]
    unknown = [c for c in weights if c not in known]
    if unknown:
        raise ValueError(f"unknown reward component(s) {unknown} for stage {stage}; known: {list(known)}")
    if not weights:
        raise ValueError(f"weights must name at least one of {list(known)}")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:  # inf/NaN would make the total NaN
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w!r}")
    penalty = _check_penalty(penalty)
    ndcg_k = _check_ndcg_k(ndcg_k)
    _check_min_think_words(min_think_words)
    if ranking_metric not in RANKING_METRICS:
        raise ValueError(f"unknown ranking_metric {ranking_metric!r}; choose one of {RANKING_METRICS}")
    if answer_metric not in ANSWER_METRICS:
        raise ValueError(f"unknown answer_metric {answer_metric!r}; choose one of {ANSWER_METRICS}")
    rho = 1.0
    if balance_classes:
        rho = positive_weight if positive_weight is not None else balanced_positive_weight(positive_fraction if positive_fraction is not None else 0.5)
    class_weights(rho)  # validates

    common = {"reasoning": reasoning, "penalty": penalty, "tags": tags}
    factories: dict[str, Callable[[], RewardFunc]] = {
        "format": lambda: _named("format", format_reward, stage=stage, min_think_words=min_think_words, **common),
        "relevance": lambda: _named("relevance", relevance_reward, positive_weight=rho, **common),
        "ranking": lambda: _named("ranking", ranking_reward, metric=ranking_metric, k=ndcg_k, **common),
        "answer": lambda: _named("answer", answer_reward, metric=answer_metric, choose_guard=choose_guard,
                                 hedge_guard=hedge_guard, length_guard=length_guard, keyword_guard=keyword_guard,
                                 **common),
    }
    names = [c for c in known if c in weights]
    funcs = [factories[c]() for c in names]
    if task_needs_format:  # the format check runs whether or not format is weighted
        well_formed = factories["format"]()
        funcs = [f if f.__name__ == "format" else _needs_format(f, well_formed, penalty) for f in funcs]
    return funcs, [float(weights[c]) for c in names]


def _needs_format(task: RewardFunc, well_formed: RewardFunc, penalty: float) -> RewardFunc:
    """``task``, paid only where ``well_formed`` (the format reward) pays: ``penalty`` for a malformed completion."""

    def reward(completions: Sequence[Any], **columns: Any) -> list[float]:
        scores, formats = task(completions, **columns), well_formed(completions, **columns)
        return [score if ok > 0 else penalty for score, ok in zip(scores, formats)]

    reward.__name__ = reward.__qualname__ = task.__name__
    reward.__doc__ = f"{task.__doc__}, paid only on well-formed completions"
    return reward


def _stage_settings(preset: Preset | str, stage: int) -> tuple[Preset, Any]:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if stage not in STAGE_COMPONENTS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return preset, preset.stage1 if stage == 1 else preset.stage2


def preset_reward_options(preset: Preset | str, stage: int) -> dict[str, Any]:
    """The ``build_reward_funcs`` / ``score_completion`` options a ``config.Preset`` (or preset name) sets for one
    stage (weights aside), so training, the worked examples and the playground score a completion the same way."""
    preset, settings = _stage_settings(preset, stage)
    options: dict[str, Any] = {"reasoning": settings.reasoning, "min_think_words": settings.min_think_words,
                               "task_needs_format": settings.task_needs_format}
    if stage == 1:
        options.update(balance_classes=settings.balance_classes, positive_fraction=settings.positive_fraction)
    else:
        options.update(ranking_metric=settings.ranking_metric, choose_guard=settings.answer_guards,
                       hedge_guard=settings.answer_guards, length_guard=settings.answer_guards,
                       keyword_guard=settings.answer_guards)
    return options


def reward_funcs_for_preset(preset: Preset | str, stage: int) -> tuple[list[RewardFunc], list[float]]:
    """``build_reward_funcs`` with every option read from a ``config.Preset`` (or preset name)."""
    preset, settings = _stage_settings(preset, stage)
    return build_reward_funcs(stage, settings.weights, **preset_reward_options(preset, stage))


def score_completion(
    completion: Any, row: Mapping[str, Any], *, stage: int, weights: Mapping[str, float], **options: Any
) -> dict[str, float]:
    """Every component of one completion for one dataset row, and their weighted total (for tables and the playground)."""
    funcs, lambdas = build_reward_funcs(stage, weights, **options)
    columns = {k: [v] for k, v in row.items()}
    scores = {f.__name__: f([completion], **columns)[0] for f in funcs}
    scores["total"] = sum(l * scores[f.__name__] for f, l in zip(funcs, lambdas))
    return scores


def explain(completion: Any, *, stage: int, reasoning: bool, candidate_ids: Sequence[str] | None = None, tags: Tags = DEFAULT_TAGS) -> Stage1Parse | Stage2Parse:
    """The parse behind the scores (what the playground prints under the table)."""
    if stage not in STAGE_COMPONENTS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if stage == 1:
        return parse_stage1(completion, reasoning=reasoning, tags=tags)
    return parse_stage2(completion, candidate_ids, reasoning=reasoning, tags=tags)


__all__ = [
    "ANSWER_METRICS",
    "HEDGE_GUARD_CATEGORIES",
    "LENGTH_GUARD_RATIO",
    "LENGTH_GUARD_SLACK",
    "RANKING_METRICS",
    "RECALL_CATEGORIES",
    "STAGE_COMPONENTS",
    "answer_reward",
    "balanced_positive_weight",
    "build_reward_funcs",
    "class_weights",
    "explain",
    "format_reward",
    "option_spans",
    "preset_reward_options",
    "question_from_prompt",
    "ranking_reward",
    "ranking_score",
    "relevance_reward",
    "reward_funcs_for_preset",
    "score_completion",
    "too_few_think_words",
]
