"""Mini-WebQA: a smaller, cleaner WebQA built by named, documented filters (our choice; the paper's are unknown).

The paper trains on "Mini-WebQA", WebQA with low-quality samples removed, without publishing the filters. Ours are
listed in ``FILTER_REASONS``; each one is a named step with a one-line reason, switchable in ``MiniWebQAFilters``,
and its effect is counted in a ``FunnelReport`` (saved as ``funnel.json`` next to the dataset):

    read -> no gold source -> answer misses keyword/fact -> overlong gold candidate
         -> broken gold image -> duplicate question -> reworded duplicate -> category balance
         -> split (no reworded question or shared gold source across splits; each category in proportion)
         -> trim candidate pools

With ``DataSettings.test_split="webqa_val"`` the test split is WebQA's own val questions: they are held out right
after the record-level checks (step ``linked_to_train`` drops those linked to a train question) and category
balance then runs on the train questions only, so the test split is WebQA's val set less only bad and linked
questions, in a seeded order (any first N of it is a fair sample). A file that breaks off part-way is kept up to the
break and named in ``FunnelReport.warnings``. An image store whose look-ups mostly find no such id (an index for
another tsv) is refused, not read as a text-only Mini-WebQA.

The output is a ``datasets.DatasetDict`` (train / validation / test) in the schema of docs/CONTRACTS.md, written
atomically (temporary folder next to the target, then rename). The same code runs on the real WebQA files and on
the synthetic world (``make_world``). A source that leaves a split empty is refused (``MiniWebQABuildError``) before
anything is written; ``funnel.json`` records a fingerprint of the source files, so a changed source is rebuilt.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..atomic import atomic_dir, folder_lock
from .images import (
    ID_MODULUS,
    MIN_DECODED_SHARE,
    TRUNCATION_GATE,
    ImageNotFoundError,
    ImageStore,
    ImageStoreError,
    ImageStoreFormatError,
    decode_image,
    decoded_rows,
)
from .webqa import (
    IMAGE_QCATES,
    ImageFact,
    RecordError,
    TextFact,
    WebQAFormatError,
    WebQARecord,
    find_webqa_json,
    iter_webqa,
)

SPLITS = ("train", "validation", "test")
SOURCE_FILES = ("imgs.tsv", "imgs.lineidx")  # read beside the question file; their fingerprint is part of the cache key


class MiniWebQABuildError(ValueError):
    """The source cannot give a usable Mini-WebQA (nothing survives the filters, a split would be empty, the test file
    was given); nothing was written. ``report`` holds the funnel so far (``None`` when the file was refused unread)."""

    def __init__(self, message: str, report: FunnelReport | None = None):
        super().__init__(message)
        self.report = report


def one_split(rows: Any, where: str) -> Any:
    """``rows`` unchanged, unless it is a whole ``DatasetDict`` or a single row: then a clear error instead of a
    ``TypeError`` later (iterating a DatasetDict yields split names, and ``"train"["candidates"]`` is not a helpful
    message)."""
    if isinstance(rows, Mapping):
        if "candidates" in rows:
            raise TypeError(f"{where} takes one split (a list of rows); this is one row ({rows.get('guid')!r}): pass "
                            "[row]")
        raise TypeError(f"{where} takes one split, e.g. ds['train'], not the mapping of splits {sorted(map(str, rows))}")
    return rows


def is_saved_split(split_ds: Any) -> bool:
    """A map-style ``datasets.Dataset`` read as stored: its columns can be read without decoding images and its rows
    by index. Not a streaming ``IterableDataset`` (no length, no index), nor one with a transform set
    (``with_transform``), whose rows may differ from what the arrow columns say."""
    from datasets import Dataset

    return isinstance(split_ds, Dataset) and split_ds.format.get("type") != "custom"


def pool_field(split_ds: Any, name: str, n: int | None = None) -> list[tuple[str, list[Any]]]:
    """``(guid, [candidate[name], ...])`` for the first ``n`` questions of a split (all for None), no image decoded:
    iterating a saved split decodes every candidate's image, tens of GB on real WebQA's train split."""
    if not is_saved_split(split_ds):  # plain rows (or rows only iteration gives)
        rows = list(split_ds) if n is None else list(itertools.islice(split_ds, n))
        return [(str(r["guid"]), [c[name] for c in r["candidates"]]) for r in rows]
    import pyarrow.compute as pc

    table = split_ds.with_format("arrow")[: len(split_ds) if n is None else min(n, len(split_ds))]  # images stay bytes
    pools = table["candidates"].combine_chunks()
    values = pc.struct_field(pools.flatten(), name).to_pylist()
    out, start = [], 0
    for guid, size in zip(table["guid"].to_pylist(), pc.list_value_length(pools).to_pylist()):
        out.append((str(guid), values[start:start + size]))
        start += size
    return out


FILTER_REASONS: dict[str, str] = {
    "unreadable": "records that break the WebQA schema cannot be turned into prompts",
    "no_gold_source": "without a gold source there is nothing to rank and no retrieval reward",
    "answer_misses_keyword": "an answer that does not state its keyword / fact teaches the model to answer without evidence",
    "overlong_gold": "a gold candidate longer than the prompt budget cannot be shown whole (overlong distractors are just dropped)",
    "broken_gold_image": "an empty, undecodable or cut-off gold image (less than min_gold_decoded_share of its rows "
                         "decoded) makes the question unanswerable from the pool",
    "duplicate_question": "the same question twice over-weights it and leaks between splits",
    "reworded_duplicate": "a rewording of an earlier question (same content words) about the same gold sources is "
                          "the same sample twice",
    "qcate_filter": "keep only the question categories asked for",
    "category_balance": "cap the largest categories so no single Qcate dominates the reward signal",
    "linked_to_train": "a val question that rewords a train question or shares its gold source would be answered "
                       "from memory (test_split='webqa_val' only)",
}


@dataclass(frozen=True)
class MiniWebQAFilters:
    """Which filters run and with what thresholds; every default has its reason in ``FILTER_REASONS``."""

    require_gold: bool = True
    require_answer_keyword: bool = True
    min_keyword_recall: float = 0.5  # share of keyword content words the answer must contain
    drop_duplicates: bool = True  # exact duplicates, and rewordings of a question about the same gold sources
    max_candidate_words: int | None = 150  # ~200 tokens: a 16-candidate stage-2 prompt stays under ~4k tokens
    check_images: bool = True  # decode every gold image (and each kept distractor) through the image store
    min_image_side: int = 8  # smaller than this is a placeholder, not a picture
    min_gold_decoded_share: float = 0.9  # a cut gold image must show nearly all of its rows: the lost ones hold evidence
    qcates: tuple[str, ...] | None = None  # None keeps every category
    max_per_qcate: int | None = None  # absolute cap per category (None: no absolute cap)
    max_qcate_fraction: float | None = 0.4  # no category above this share of Mini-WebQA (real WebQA is ~50% text)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test
    max_image_side: int = 448  # larger images are downscaled before storing (real WebQA images are ~800 px)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------- text helpers
_STOPWORDS = frozenset(
    ["a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "by", "with", "and", "or", "is", "are", "was", "were", "be", "been", "being", "do", "does", "did", "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "there", "this", "that", "these", "those", "it", "its", "as", "into", "than", "then", "so", "such", "can", "could", "would", "should", "will", "shall", "may", "might", "must", "have", "has", "had", "not", "no", "yes", "any", "all", "both", "each", "either", "neither"]
) - {"no", "yes"}
_QUESTION_WORDS = frozenset(["what", "which", "who", "whom", "whose", "when", "where", "why", "how"])
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])}
_COLOR_WORDS = frozenset(
    ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "grey", "brown", "pink", "gold", "golden", "silver", "beige", "tan", "violet", "maroon", "navy", "teal", "turquoise", "cream", "ivory", "bronze", "copper"])
_SHAPE_WORDS = frozenset(
    ["circle", "circular", "round", "square", "rectangle", "rectangular", "triangle", "triangular", "star", "diamond", "oval", "heart", "hexagon", "octagon", "pentagon", "sphere", "cube", "cylinder", "cone", "pyramid", "arch", "dome", "spiral", "cross"])
_PUNCT = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)")


# Plurals that add "es" to a singular ending in these ("churches", "dishes", "boxes", "crosses"); "-zes" is left to
# the plain "s" cut, as most such singulars end in "e" ("sizes", "prizes").
_ES_PLURAL_STEMS = ("ch", "sh", "x", "ss")



def rows_by_guid(split_ds: Iterable[Mapping[str, Any]],
                 wanted: Callable[[str], bool] | None) -> Iterator[tuple[int, Mapping[str, Any] | None]]:
    """``(index, row)`` of each question in order, ``None`` for a row ``wanted`` rejects by its guid: a saved split's
    rejected rows are never read, so their images are not decoded (most of real WebQA's train split has no scores)."""
    if wanted is None or not is_saved_split(split_ds):
        for qi, row in enumerate(split_ds):
            yield qi, row if wanted is None or wanted(row["guid"]) else None
        return
    for qi, guid in enumerate(split_ds.select_columns(["guid"])["guid"]):
        yield qi, split_ds[qi] if wanted(guid) else None


def tokens(text: str) -> list[str]:
    """Lower-case word tokens; punctuation dropped (decimal points kept), number words as digits, plural 's' cut
    ("es" after ch, sh, x, ss: "churches" is "church", so an answer in the plural still states its singular fact; a
    singular ending in "e" there loses it, so "niche" and "niches" meet too)."""
    out = []
    for tok in _PUNCT.sub(" ", text.lower()).split():
        tok = _NUMBER_WORDS.get(tok, tok)
        # stopwords keep their "s" ("does" must stay a stopword, not become a content word "doe")
        if len(tok) > 4 and tok.endswith("es") and tok[:-2].endswith(_ES_PLURAL_STEMS):
            tok = tok[:-2]
        elif len(tok) > 3 and tok.endswith("e") and tok[:-1].endswith(_ES_PLURAL_STEMS):
            tok = tok[:-1]  # "niche" meets "niches" (-> "nich"), as "church" meets "churches"
        elif len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss") and not tok.isdigit() and tok not in _STOPWORDS:
            tok = tok[:-1]
        out.append(tok)
    return out


def content_tokens(text: str) -> list[str]:
    return [t for t in tokens(text) if t not in _STOPWORDS]


def question_key(text: str) -> str:
    """Exact-duplicate key: case, punctuation and spacing ignored."""
    return " ".join(tokens(text))


def near_dup_key(text: str) -> str:
    """Near-duplicate key: the sorted set of content words, so rewordings of one question share a key.

    Stray letters go ("what's" leaves an "s") and a final "e" is cut after the plural "s" was, so "buses" and "bus"
    (and "horses" and "horse") meet; numbers stay, since "2 dogs" and "3 dogs" are different questions.
    """
    words = (t for t in content_tokens(text) if len(t) > 1 or t.isdigit())
    return " ".join(sorted({_key_stem(t) for t in words} - _QUESTION_WORDS))


def _key_stem(token: str) -> str:
    return token[:-1] if len(token) > 3 and token.endswith("e") else token


def _fact_text(fact: ImageFact | TextFact) -> str:
    return fact.caption if isinstance(fact, ImageFact) else fact.fact


# Word forms the answer check treats as one word: real WebQA answers say "rectangular" for the keyword "Rectangle",
# "twice" for "Two", "There are no benches" for "None".
_WORD_FORMS = {
    "twice": "2", "once": "1", "none": "0", "single": "1", "double": "2",
    "rectangular": "rectangle", "circular": "circle", "triangular": "triangle", "spherical": "sphere",
    "cylindrical": "cylinder", "conical": "cone", "cubic": "cube", "octagonal": "octagon", "hexagonal": "hexagon",
    "pentagonal": "pentagon", "rounded": "round",
}


_PRONOUNS = frozenset(["i", "you", "he", "she", "we", "they", "him", "her", "us", "them", "his", "hers", "our", "their"])
_NEGATION = re.compile(r"\bnot\b|n['\u2019]t\b", re.IGNORECASE)


def _says_no(question: str, answer: str) -> bool:
    """A negative verdict without the word "no": "It is not.", "The portraits were not always there.".

    The negation must be about the question: the answer is a bare verdict (no content word once the negation is
    gone) or names something the question asks about. "That is not mentioned anywhere." is not a verdict.
    """
    if not _NEGATION.search(answer):
        return False
    rest = _words_besides_negation(answer)
    return not rest or bool(rest & set(content_tokens(question)))


def _words_besides_negation(answer: str) -> set[str]:
    """Content words of ``answer`` without its negation and pronouns ("They aren't." has none)."""
    return {t for t in content_tokens(_NEGATION.sub(" ", answer))
            if (len(t) > 2 or t.isdigit()) and t not in _PRONOUNS}  # len: the "ca" of "can't"


def _answer_words(text: str, qcate: str) -> set[str]:
    """``tokens`` in canonical form; for counting questions a bare "no" (as in "no benches") means 0."""
    words = {_WORD_FORMS.get(t, t) for t in tokens(text)}
    if qcate == "number" and "no" in words:
        words.add("0")
    return words


def _restates_question(question: str, answer: str, adds_a_word: bool) -> bool:
    """A full-sentence answer that repeats at least half of the question's content words.

    WebQA answers are mostly sentences: "The Durham Cathedral in England has trees outside of it." answers
    "Does the Durham Cathedral have any trees outside of it?" without ever saying "yes". ``adds_a_word``: the
    answer must also hold a content word the question does not (the colour, shape or count it was asked for).
    """
    q = set(content_tokens(question)) - _QUESTION_WORDS
    a = set(content_tokens(answer))
    return bool(q) and len(q & a) / len(q) >= 0.5 and (bool(a - q) or not adds_a_word)


def answer_mentions_keyword(record: WebQARecord, min_recall: float = 0.5) -> bool:
    """Does the answer state its evidence? (our rule; the reason is in ``FILTER_REASONS``)

    - ``YesNo``: the answer says yes / no ("not" / "n't" count as no), or is a sentence restating the question (its
      keyword is the verdict);
    - with ``Keywords_A``: at least ``min_recall`` of the keyword's content words appear in the answer (word forms
      such as "rectangular" / "rectangle", "twice" / "2" count as one);
    - text questions without keywords: the answer adds words beyond the question that occur in a gold snippet, or
      names words of the question that a gold snippet holds (choosing between options), or is a bare yes / no
      (a negation such as "It is not." counts as no);
    - image questions without keywords (the public release has none): the answer holds a word of the category's
      closed vocabulary (a colour, a shape, a number) or restates the question with a word of its own;
      ``Others``/``choose`` only need a non-empty answer.
    """
    answer = record.answer.strip()
    if not answer:
        return False
    ans = _answer_words(answer, record.qcate)
    if record.qcate == "YesNo":
        return (bool(ans & {"yes", "no"}) or _says_no(record.question, answer)
                or _restates_question(record.question, answer, adds_a_word=False))
    if record.keywords:
        kw = ({_WORD_FORMS.get(t, t) for t in content_tokens(record.keywords)}
              or _answer_words(record.keywords, record.qcate))
        return bool(kw) and len(kw & ans) / len(kw) >= min_recall
    if record.qcate == "text" or (record.qcate not in IMAGE_QCATES and record.txt_pos):
        said = set(content_tokens(answer))
        if _says_no(record.question, answer):  # "They do not.": a no, and the words around it
            said = _words_besides_negation(answer) | {"no"}
        novel = said - set(tokens(record.question))
        gold = set()
        for f in record.txt_pos + record.img_pos:
            gold |= set(tokens(_fact_text(f))) | set(tokens(f.title))
        if novel:
            return bool(novel & gold) or novel <= {"yes", "no"}
        return bool(said & gold)  # the answer picks one of the question's options
    vocab = {"color": _COLOR_WORDS, "shape": _SHAPE_WORDS}.get(record.qcate)
    if vocab is not None:
        return bool(ans & vocab) or _restates_question(record.question, answer, adds_a_word=True)
    if record.qcate == "number":
        return any(re.fullmatch(r"\d+(\.\d+)?", t) for t in ans) or _restates_question(record.question, answer, adds_a_word=True)
    return True


def overlong_ids(record: WebQARecord, max_words: int) -> tuple[list[str], list[str]]:
    """(gold ids, distractor ids) whose caption / fact is longer than ``max_words`` words."""
    gold, neg = [], []
    for fact, is_gold in record.facts():
        if len(_fact_text(fact).split()) > max_words:
            (gold if is_gold else neg).append(fact.id)
    return gold, neg


# ------------------------------------------------------------------------------------------ funnel
@dataclass
class FunnelStep:
    name: str
    reason: str
    before: int
    removed: int
    kept: int
    examples: list[str] = field(default_factory=list)  # a few removed Guids, to look at


@dataclass
class FunnelReport:
    """How many questions each filter removed; ``to_dict`` is what ``funnel.json`` holds."""

    source: str
    steps: list[FunnelStep] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    qcates: dict[str, int] = field(default_factory=dict)
    candidates: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    read_errors: list[str] = field(default_factory=list)  # the first few, as "record <Guid>: why"
    warnings: list[str] = field(default_factory=list)  # what the counts alone hide, e.g. a file that breaks off

    @property
    def n_read(self) -> int:
        return self.steps[0].before if self.steps else 0

    @property
    def n_kept(self) -> int:
        return self.steps[-1].kept if self.steps else 0

    def add(self, name: str, before: int, removed: Sequence[str]) -> None:
        self.steps.append(FunnelStep(name, FILTER_REASONS.get(name, ""), before, len(removed), before - len(removed),
                                     list(removed[:5])))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), exactly what ``funnel.json`` holds."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunnelReport:
        data = dict(data)
        data["steps"] = [FunnelStep(**s) for s in data.get("steps", [])]
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> FunnelReport:
        path = Path(path)
        if path.is_dir():
            path = path / "funnel.json"
        return cls.from_dict(json.loads(path.read_text()))

    def __str__(self) -> str:
        lines = [f"Mini-WebQA funnel ({self.source})"]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines.append(f"{'step':<24}{'removed':>9}{'kept':>9}  why")
        for s in self.steps:
            lines.append(f"{s.name:<24}{s.removed:>9}{s.kept:>9}  {s.reason}")
        if self.splits:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        if self.qcates:
            lines.append("qcates: " + ", ".join(f"{k} {v}" for k, v in sorted(self.qcates.items())))
        if self.candidates:
            lines.append("candidates: " + ", ".join(f"{k} {v}" for k, v in self.candidates.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- filter steps
def filter_records(
    records: Sequence[WebQARecord],
    filters: MiniWebQAFilters = MiniWebQAFilters(),
    store: ImageStore | None = None,
    report: FunnelReport | None = None,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
    balance: bool = True,
) -> list[WebQARecord]:
    """Run the question-level filters in order, recording each step in ``report``; returns the kept records.

    Pure apart from reading images through ``store`` (needed only when ``filters.check_images``), which ``workers``
    threads decode: the gold-image check reads every surviving question's gold images, before balancing.
    ``balance=False`` stops before ``balance_categories`` (the builder balances WebQA's train questions alone when
    their val questions are the test split).
    """
    from tqdm.auto import tqdm

    report = report if report is not None else FunnelReport(source="records")
    kept = list(records)

    def step(name: str, keep: Callable[[WebQARecord], bool], enabled: bool = True) -> None:
        nonlocal kept
        if not enabled:
            return
        before = len(kept)
        new, removed = [], []
        for r in kept:
            (new if keep(r) else removed).append(r)
        kept = new
        report.add(name, before, [r.guid for r in removed])

    step("no_gold_source", lambda r: bool(r.img_pos or r.txt_pos), filters.require_gold)
    step("answer_misses_keyword", lambda r: answer_mentions_keyword(r, filters.min_keyword_recall),
         filters.require_answer_keyword)
    if filters.max_candidate_words:
        step("overlong_gold", lambda r: not overlong_ids(r, filters.max_candidate_words)[0])
    if filters.check_images:
        if store is None:
            raise ValueError("check_images=True needs an ImageStore (or pass filters with check_images=False)")
        n_threads = _image_threads(workers, has_images=True)

        def gold_images(r: WebQARecord) -> tuple[bool, list[ImageNotFoundError]]:
            """(all gold images usable, the error of each one whose id the store does not hold)"""
            good, missing = True, []
            for f in r.img_pos:
                try:
                    im = store.get(f.image_id, filters.min_gold_decoded_share)
                except ImageNotFoundError as exc:
                    good = False
                    missing.append(exc)
                except ImageStoreError:
                    good = False
                else:
                    good = good and min(im.size) >= filters.min_image_side
            return good, missing

        with ThreadPoolExecutor(n_threads, thread_name_prefix="mini-webqa-gold") as executor:
            verdicts = _in_order(executor, gold_images, kept, 4 * n_threads)
            desc = f"check gold images ({n_threads} threads)" if n_threads > 1 else "check gold images"
            checked = list(zip(kept, tqdm(verdicts, total=len(kept), desc=desc, disable=not progress,
                                          mininterval=1.0, unit=" q")))
        ok = {id(r): good for r, (good, _) in checked}
        missing = [exc for _, (_, errors) in checked for exc in errors]
        step("broken_gold_image", lambda r: ok[id(r)])
        _refuse_missing_gold(missing, sum(len(r.img_pos) for r, _ in checked), store, report)
    if filters.drop_duplicates:  # after the quality checks: a broken first copy must not take its good twin along
        step("duplicate_question", _first_of_each(lambda r: question_key(r.question)))
        step("reworded_duplicate", _first_of_each(lambda r: (near_dup_key(r.question), gold_sources(r))
                                                  if r.img_pos or r.txt_pos else None))
    if filters.qcates is not None:
        allowed = set(filters.qcates)
        step("qcate_filter", lambda r: r.qcate in allowed)
    if balance:
        kept = balance_categories(kept, filters, report, seed)
    return kept


def gold_sources(record: WebQARecord) -> frozenset[tuple[str, str]]:
    """What a question's gold candidates are, whatever their ids: image ids, and the text of gold snippets (their ids
    carry the question's Guid, so a copy of a question under a new Guid has new snippet ids for the same facts)."""
    return frozenset([("img", str(f.image_id)) for f in record.img_pos]
                     + [("txt", question_key(f.fact)) for f in record.txt_pos])


def _first_of_each(key: Callable[[WebQARecord], Any]) -> Callable[[WebQARecord], bool]:
    """A ``keep`` test that passes the first record of each ``key`` and drops later ones (a ``None`` key always
    passes)."""
    seen: set[Any] = set()

    def first_seen(r: WebQARecord) -> bool:
        k = key(r)
        if k is None:
            return True
        if k in seen:
            return False
        seen.add(k)
        return True

    return first_seen


MAX_GOLD_NOT_IN_STORE = 0.5  # share of gold images whose id the store lacks, above which the store is the wrong one


def _refuse_missing_gold(missing: Sequence[ImageNotFoundError], checked: int, store: ImageStore,
                         report: FunnelReport | None) -> None:
    """Refuse a build in which most of the ``checked`` gold images are not in the store at all (as opposed to
    undecodable): the store is not this question file's (an index for another tsv, images of another copy) or is
    incomplete, and the build would otherwise come out text-only with only a large ``broken_gold_image`` count."""
    if not checked or len(missing) <= MAX_GOLD_NOT_IN_STORE * checked:
        return
    past_index = sum(e.image_id % ID_MODULUS >= len(store) for e in missing)
    past_end = int((store.offsets >= store.tsv_size).sum())
    if 2 * past_index > len(missing):
        cause = (f"{store.lineidx_path.name} is cut short: it has {len(store):,} lines, and {past_index:,} of these "
                 "images need a later one")
    elif 2 * past_end > len(store):
        cause = (f"{store.tsv_path.name} is cut short: it ends before the offsets of {past_end:,} of its "
                 f"{len(store):,} images (an incomplete copy or extraction?)")
    else:
        cause = (f"{store.lineidx_path.name} was made for another {store.tsv_path.name}, or the images are another "
                 "copy's, not this question file's")
    raise MiniWebQABuildError(
        f"{len(missing):,} of the {checked:,} gold images are not in the image store {store.tsv_path.parent} (e.g. "
        f"{missing[0]}): most likely {cause}. Take WebQA_train_val.json, imgs.tsv and imgs.lineidx from the same "
        "WebQA download; nothing was written", report)


def balance_categories(records: Sequence[WebQARecord], filters: MiniWebQAFilters, report: FunnelReport | None = None,
                       seed: int = 0, held_out: int = 0) -> list[WebQARecord]:
    """Cap each Qcate so that none holds more than ``max_qcate_fraction`` of the *balanced* set (and none more than
    ``max_per_qcate``); which questions stay is seeded.

    The fraction cap needs at least two categories (a one-category set cannot be balanced, only shrunk). It cuts the
    large categories to one common size, and the small ones must make up the rest of the set: when they are too small
    the cap falls to about their size, whatever the fraction (828 YesNo, 2,455 text and 1 shape at 0.4 keep 2, 2 and
    1: two categories at 40% each need a third at 20%). A fraction below 1 / (number of categories) cannot be met at
    all; every category is then cut to the smallest one's size. A fraction cap that would remove more than
    ``MAX_BALANCE_LOSS`` of the questions is refused with a ``MiniWebQABuildError`` naming the category sizes, rather
    than applied: that is a setting to change, not cleaning.

    ``held_out``: questions that reached this step but are not balanced (WebQA's val questions held out as the test
    split); the funnel counts them as passing through.
    """
    sizes = Counter(r.qcate for r in records)
    fraction_cap = None
    if filters.max_qcate_fraction is not None and len(sizes) >= 2:
        fraction_cap = _fraction_cap(sorted(sizes.values()), filters.max_qcate_fraction)
        lost = sum(max(0, n - fraction_cap) for n in sizes.values())
        if lost > MAX_BALANCE_LOSS * len(records):
            raise MiniWebQABuildError(
                f"category balance would remove {lost} of {len(records)} questions: with max_qcate_fraction="
                f"{filters.max_qcate_fraction} and the category sizes {dict(sorted(sizes.items()))}, no category can "
                f"stay at or under {filters.max_qcate_fraction:.0%} unless the large ones are cut to {fraction_cap} "
                "questions each (the small categories are too small to make up the rest). Pass "
                "MiniWebQAFilters(max_qcate_fraction=None) for no cap, a larger fraction, or qcates=(...) without the "
                "smallest categories, to build_mini_webqa(source, out_dir, filters=...) from Python (build-data and the "
                "notebooks use the default filters); nothing was written", report)
    caps = [c for c in (filters.max_per_qcate, fraction_cap) if c is not None]
    if not caps:
        if report is not None:
            report.add("category_balance", len(records) + held_out, [])
        return list(records)
    cap = max(1, min(caps))
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[r.qcate].append(i)
    drop: set[int] = set()
    rng = random.Random(f"balance-{seed}")
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        if len(idx) > cap:
            chosen = set(rng.sample(idx, cap))
            drop |= set(idx) - chosen
    kept = [r for i, r in enumerate(records) if i not in drop]
    if report is not None:
        report.add("category_balance", len(records) + held_out, [records[i].guid for i in sorted(drop)])
    return kept


MAX_BALANCE_LOSS = 0.5  # share of the questions the fraction cap may remove before the build refuses it


def _fraction_cap(sizes: Sequence[int], fraction: float) -> int:
    """The largest per-category cap ``c`` with ``c <= fraction * sum(min(n, c) for n in sizes)``, or the smallest
    size when even that does not fit (the fraction is below 1 / len(sizes)).

    ``c / sum(min(n, c))`` never decreases as ``c`` grows (the sum is concave in ``c``), so a binary search finds it.
    """
    def fits(c: int) -> bool:
        return c <= fraction * sum(min(n, c) for n in sizes)

    lo, hi = min(sizes), max(sizes)
    if not fits(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def split_records(records: Sequence[WebQARecord], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                  key: Callable[[str], str] = near_dup_key, link_gold_sources: bool = True,
                  stratify: bool = True) -> dict[str, list[WebQARecord]]:
    """Train / validation / test without leakage, each category spread over all three in proportion.

    Questions are linked when they share a ``key`` of their question text (rewordings) or, with
    ``link_gold_sources``, a gold source (an image id, or a snippet's text): real WebQA asks several questions about
    one image, and a test question whose gold image was a training target measures memory, not retrieval. Each
    connected group goes to one split. Groups are visited in a seeded order; each goes to the split furthest below
    its target, counted within the group's category when ``stratify`` (so a small category still reaches the test
    split), else over all questions.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    groups = _linked_groups(records, key, link_gold_sources)
    order = sorted(groups)
    random.Random(f"split-{seed}").shuffle(order)
    total = sum(fractions)

    def category(group: list[WebQARecord]) -> str:
        counts = Counter(r.qcate for r in group)
        return min(counts, key=lambda c: (-counts[c], c)) if stratify else ""

    sizes = Counter(category(groups[g]) for g in order for _ in groups[g])
    filled: dict[str, list[int]] = {c: [0, 0, 0] for c in sizes}
    out: dict[str, list[WebQARecord]] = {s: [] for s in SPLITS}
    for g in order:
        cat = category(groups[g])
        targets = [f / total * sizes[cat] for f in fractions]
        deficits = [(targets[i] - filled[cat][i]) / targets[i] if targets[i] > 0 else -1e9 for i in range(3)]
        best = max(range(3), key=lambda i: (deficits[i], -i))
        out[SPLITS[best]].extend(groups[g])
        filled[cat][best] += len(groups[g])
    return out


def hold_out_webqa_val(records: Sequence[WebQARecord], key: Callable[[str], str] = near_dup_key,
                       link_gold_sources: bool = True) -> tuple[list[WebQARecord], list[WebQARecord], list[str]]:
    """``(train_pool, test, dropped_guids)``: WebQA's own val questions held out as the test split.

    Linked groups as in ``split_records``; a group of val questions only is test, one without val questions is the
    pool that train and validation are cut from, and a group mixing both keeps its train questions in the pool and
    drops its val ones (a test question linked to a training one would measure memory). Any ``split`` other than
    ``"val"`` counts as train.
    """
    pool: list[WebQARecord] = []
    test: list[WebQARecord] = []
    dropped: list[str] = []
    for _, group in sorted(_linked_groups(records, key, link_gold_sources).items()):
        val = [r for r in group if r.split == "val"]
        if len(val) == len(group):
            test.extend(val)
        else:
            pool.extend(r for r in group if r.split != "val")
            dropped.extend(r.guid for r in val)
    return pool, test, dropped


def _linked_groups(records: Sequence[WebQARecord], key: Callable[[str], str],
                   link_gold_sources: bool) -> dict[str, list[WebQARecord]]:
    """Connected groups of records (union-find over shared question keys and gold sources), each named by the
    smallest question key in it so the grouping, and so the split, does not depend on record order."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        links = [("q", key(r.question))]
        if link_gold_sources:
            links += [("img", str(f.image_id)) for f in r.img_pos]
            links += [("txt", question_key(f.fact)) for f in r.txt_pos if f.fact.strip()]
        for link in links:
            j = owner.setdefault(link, i)
            parent[root(i)] = root(j)
    members: dict[int, list[WebQARecord]] = defaultdict(list)
    for i, r in enumerate(records):
        members[root(i)].append(r)
    return {min(key(r.question) + "\x00" + r.guid for r in rs): rs for rs in members.values()}


def split_leaks(splits: Mapping[str, Sequence[WebQARecord]], copies: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str]]:
    """(copy, original) Guid pairs that sit in different splits (pure).

    ``copies`` is ground truth from outside the splitter, e.g. the synthetic world's manifest (``make_world`` records
    which question each planted duplicate copies): checking a split with the key that made it would prove nothing.
    Pairs with a side missing from every split (removed by a filter) are not leaks.
    """
    where = {r.guid: name for name, rs in splits.items() for r in rs}
    return [(copy, info["of"]) for copy, info in copies.items()
            if copy in where and info["of"] in where and where[copy] != where[info["of"]]]


# ------------------------------------------------------------------------------------ candidate pools
def _image_payload(data: bytes, max_side: int, image_id: int, min_decoded_share: float = MIN_DECODED_SHARE
                   ) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """``(bytes to store, their width x height, the image's width x height as found)``: the bytes as they are, unless
    truncated (re-encoded so any reader opens them, cut to the rows that decoded: PIL's fill below the cut is a flat
    band, not picture; refused below ``min_decoded_share`` of its rows) or larger than ``max_side`` (downscaled). The
    size as found is what ``min_image_side`` judges, as ``ImageStore.check`` does: a 2000x20 banner is not "too small"
    because its 448x4 thumbnail is.

    One decode per image: on real WebQA (~800 px photos) decoding and downscaling are most of the build's time
    (``benchmarks/build_full_world.py --image-size 800``).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) <= max_side:
                with TRUNCATION_GATE.strict():
                    im.load()  # strict: a truncated file raises here and is re-encoded below
                return data, im.size, im.size
    except Exception:  # noqa: BLE001, S110 - truncated or unreadable: decode_image keeps the one, names the other
        pass
    im, share = decode_image(data, image_id, min_decoded_share)
    found = im.size
    im = decoded_rows(im, share)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    if data[:3] == b"\xff\xd8\xff":  # a JPEG stays a JPEG: as PNG a photo takes about four times the space
        im.save(buf, format="JPEG", quality=90)  # decode_image gives RGB
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), im.size, found


def _candidate(fact: ImageFact | TextFact, is_gold: bool, image: dict | None) -> dict[str, Any]:
    if isinstance(fact, ImageFact):
        return {"id": fact.id, "modality": "image", "title": fact.title, "text": fact.caption, "image": image,
                "is_gold": is_gold}
    return {"id": fact.id, "modality": "text", "title": fact.title, "text": fact.fact, "image": None, "is_gold": is_gold}


def record_to_row(record: WebQARecord, store: ImageStore | None, max_candidates: int | None = None,
                  filters: MiniWebQAFilters = MiniWebQAFilters(), seed: int = 0,
                  counts: Counter | None = None) -> dict[str, Any]:
    """One Mini-WebQA row: all gold candidates, then seeded distractors up to ``max_candidates``, shuffled.

    Distractors that are overlong or whose image does not decode are skipped (and counted in ``counts``), and so is
    a fact whose id the row already holds (a gold one wins): scores, kept ids and citations are keyed by id.
    Images are stored as encoded bytes (``{"bytes": ..., "path": None}``), the form ``datasets.Image`` takes.
    """
    counts = counts if counts is not None else Counter()
    rng = random.Random(f"{seed}:{record.guid}")
    max_words = filters.max_candidate_words
    gold, neg = [], []
    for fact, is_gold in record.facts():
        (gold if is_gold else neg).append(fact)
    rng.shuffle(neg)
    limit = max(len(gold), max_candidates) if max_candidates else len(gold) + len(neg)
    chosen: list[dict[str, Any]] = []
    ids: set[str] = set()
    for fact, is_gold in [(f, True) for f in gold] + [(f, False) for f in neg]:
        if fact.id in ids:
            counts["duplicate_candidate"] += 1
            continue
        if len(chosen) >= limit:
            counts["trimmed"] += 1
            continue
        if not is_gold and max_words and len(_fact_text(fact).split()) > max_words:
            counts["overlong_distractor"] += 1
            continue
        image = None
        if isinstance(fact, ImageFact) and store is not None:
            try:
                data = store.get_bytes(fact.image_id)
                payload, _, found = _image_payload(data, filters.max_image_side, fact.image_id,
                                                   filters.min_gold_decoded_share if is_gold else MIN_DECODED_SHARE)
                if filters.check_images and min(found) < filters.min_image_side:
                    raise ImageStoreError(fact.image_id, "too small")
                image = {"bytes": payload, "path": None}
            except ImageStoreError:
                if is_gold:
                    raise
                counts["broken_distractor_image"] += 1
                continue
        chosen.append(_candidate(fact, is_gold, image))
        ids.add(fact.id)
    rng.shuffle(chosen)
    counts["kept"] += len(chosen)
    return {
        "guid": record.guid,
        "question": record.question,
        "answer": record.answer,
        "keywords": record.keywords,
        "qcate": record.qcate,
        "topic": record.topic,
        "candidates": chosen,
        "gold_ids": [c["id"] for c in chosen if c["is_gold"]],
    }


def _row_or_skip(record: WebQARecord, store: ImageStore | None, max_candidates: int | None,
                 filters: MiniWebQAFilters, seed: int) -> tuple[dict[str, Any] | None, Counter, ImageStoreError | None]:
    """``(row, candidate counts, None)``, or ``(None, counts, why)`` for a broken gold image that the
    broken_gold_image step did not check (``check_images=False``): that question is skipped, the rest kept."""
    counts: Counter = Counter()
    try:
        return record_to_row(record, store, max_candidates, filters, seed, counts), counts, None
    except ImageStoreError as exc:
        counts["skipped_broken_gold_image"] += 1
        return None, counts, exc


def _image_threads(workers: int | None, has_images: bool) -> int:
    """Threads that read images: the gold-image check, then the rows. Decoding (and for rows downscaling and
    re-encoding) real WebQA's ~800 px images is most of a real build's time, and Pillow releases the GIL for all
    three, so threads spread it over the cores (no processes: no copies of the data, nothing a script must guard).
    Without images there is nothing to spread."""
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1 or None (one per core, at most 4), got {workers!r}")
        return workers if has_images else 1
    from ..config import usable_cores

    return min(usable_cores(), 4) if has_images else 1


def _in_order(executor: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``executor``, results in input order, at most ``ahead`` in flight (``Executor.map``
    would submit everything at once and could hold a whole split's images in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def mini_webqa_features():
    """The ``datasets.Features`` of docs/CONTRACTS.md (candidates: a list of structs, ``image`` an Image)."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    candidate = {
        "id": Value("string"), "modality": Value("string"), "title": Value("string"), "text": Value("string"),
        "image": HFImage(), "is_gold": Value("bool"),
    }
    return Features({
        "guid": Value("string"), "question": Value("string"), "answer": Value("string"),
        "keywords": Value("string"), "qcate": Value("string"), "topic": Value("string"),
        "candidates": [candidate], "gold_ids": [Value("string")],
    })


def rows_to_dataset(rows: Iterable[dict[str, Any]], chunk: int = 1000):
    """A ``datasets.Dataset`` from row dicts, built in chunks so memory stays at one chunk of Python objects."""
    from datasets import Dataset, concatenate_datasets

    features = mini_webqa_features()
    parts, buf = [], []
    for row in rows:
        buf.append(row)
        if len(buf) >= chunk:
            parts.append(Dataset.from_list(buf, features=features))
            buf = []
    if buf:
        parts.append(Dataset.from_list(buf, features=features))
    if not parts:  # an empty split still has every column
        parts.append(Dataset.from_dict({name: [] for name in features}, features=features))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


# ------------------------------------------------------------------------------------------ atomic I/O
def save_dataset_atomic(dataset_dict, out_dir: str | Path, extra_files: dict[str, str] | None = None,
                        progress: bool = True) -> Path:
    """``save_to_disk`` into a temporary folder next to ``out_dir``, then rename; never a half-written dataset.

    An existing ``out_dir`` stays intact until the new one is complete, and is only then replaced.
    """
    import datasets

    out_dir = Path(out_dir)
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        with atomic_dir(out_dir, create=False) as tmp:  # save_to_disk makes the folder itself
            dataset_dict.save_to_disk(str(tmp))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    finally:
        if was_enabled and not progress:
            datasets.enable_progress_bars()
    return out_dir


# --------------------------------------------------------------------------------------------- builder
def source_fingerprint(json_path: str | Path) -> dict[str, dict[str, int]]:
    """Size and ``mtime_ns`` of the question file and the image store beside it (those that exist).

    The cache key of a saved Mini-WebQA: a re-download, a cut file or a restored one changes it, and taking it reads
    no data (WebQA is 51 GB).
    """
    json_path = Path(json_path)
    out = {}
    for path in (json_path, *(json_path.parent / name for name in SOURCE_FILES)):
        if path.is_file():
            st = path.stat()
            out[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _nothing_left(report: FunnelReport, json_path: Path, unlabelled: bool) -> MiniWebQABuildError:
    """Why no question is left, named by the funnel step that removed the last ones, and what to check."""
    if report.n_read == 0:
        return MiniWebQABuildError(
            f"{json_path} holds no WebQA records, so there is nothing to build Mini-WebQA from: check that the file "
            "is complete (download it again) or, for a synthetic world, that it has n_questions > 0 "
            "(data.world_questions)", report)
    step = next(s for s in report.steps if s.kept == 0)
    message = (f"no question of {json_path} survives the Mini-WebQA filters: step {step.name!r} removed the last "
               f"{step.before} ({step.reason})")
    if step.name == "unreadable":
        message += ("; first errors: " + "; ".join(report.read_errors[:3]) + ". Check that the file is "
                    "WebQA_train_val.json as released (or written by make_world), not a cut or edited copy")
    elif step.name == "no_gold_source" and unlabelled:
        message += (": these are test-layout records (img_Facts / txt_Facts, no answers, no gold facts); "
                    "a training source needs WebQA_train_val.json")
    else:
        message += (f"; e.g. {', '.join(step.examples)}. Check the source, or switch that filter off or loosen it "
                    "in MiniWebQAFilters")
    return MiniWebQABuildError(message, report)


def check_webqa_source(source_dir: str | Path) -> Path:
    """The question file of a WebQA folder that ``ensure_mini_webqa`` (notebooks, CLI) can build from, or a
    ``FileNotFoundError`` saying what is missing: the question file, or the image store beside it. Reads nothing
    (the CLI asks before it makes a run folder)."""
    json_path = find_webqa_json(source_dir)
    folder = json_path.parent
    if json_path.name != "WebQA_test.json" and not all((folder / name).is_file() for name in SOURCE_FILES):
        raise FileNotFoundError(_no_images_message(folder))  # (the test file is refused by the builder, with why)
    return json_path


def _no_images_message(folder: Path) -> str:
    """Why a build that checks images cannot start, and what to do: add the images (CLI, notebooks), or build
    text-only from Python (the CLI has no switch for it, so the message must not send its user to one)."""
    return (f"{folder} has no imgs.tsv + imgs.lineidx (WebQA's images): put both beside the question file to build "
            "Mini-WebQA with images (the build-data command and the notebooks always check images). A text-only "
            "Mini-WebQA (image candidates get image=None) is built from Python only: build_mini_webqa(source, out_dir, "
            "filters=MiniWebQAFilters(check_images=False))")


def _refuse_empty_splits(sizes: Mapping[str, int], report: FunnelReport, json_path: Path,
                         fractions: Sequence[float], test_split: str = "pooled") -> None:
    """A saved empty split cannot be loaded (``datasets`` fails with an IndexError), so refuse to save one."""
    empty = [name for name in SPLITS if not sizes.get(name)]
    if empty:
        linked = next((s.removed for s in report.steps if s.name == "linked_to_train"), 0)
        held_out = (" The test split is WebQA's own val questions (data.test_split='webqa_val'): a source whose "
                    "surviving questions are all split 'train' has none"
                    + (f"; {linked} val question(s) were removed as linked to a train question "
                       "(step linked_to_train: a shared gold source or a reworded question)" if linked else "")
                    + "; use test_split='pooled'." if test_split == "webqa_val" and "test" in empty else "")
        raise MiniWebQABuildError(
            f"Mini-WebQA from {json_path} would have an empty {' and '.join(empty)} split: only "
            f"{sum(sizes.values())} question(s) survive the filters (split fractions {tuple(fractions)}). Build from "
            "a larger source (for the synthetic world: more data.world_questions) or give every split a non-zero "
            f"fraction; nothing was written.{held_out}", report)


def _data_settings(settings: Any):
    from ..config import DataSettings, Preset, resolve_preset

    if settings is None:
        return resolve_preset("cpu-tiny").data
    if isinstance(settings, DataSettings):
        return settings
    if isinstance(settings, Preset):
        return settings.data
    if isinstance(settings, str):
        return resolve_preset(settings).data
    raise TypeError(f"settings must be a DataSettings, Preset or preset name, got {type(settings).__name__}")


def build_mini_webqa(
    source_dir: str | Path,
    out_dir: str | Path | None = None,
    settings: Any = None,
    filters: MiniWebQAFilters | None = None,
    seed: int = 0,
    max_candidates: int | None = None,
    progress: bool = True,
    workers: int | None = None,
):
    """Read WebQA (real or synthetic) from ``source_dir``, filter, balance, split, trim pools and save.

    ``settings`` (a ``DataSettings``, ``Preset`` or preset name; default cpu-tiny) gives ``max_candidates``
    unless passed explicitly. ``workers`` threads check the gold images and decode and downscale the candidates'
    (``None``: one per core, at most 4; the output is the same for any number). Returns ``(DatasetDict,
    FunnelReport)``; with ``out_dir`` both are written there (``funnel.json`` beside the dataset, with the source
    files' fingerprint), atomically.

    Raises ``MiniWebQABuildError`` when no question survives, when a split to be saved would be empty (it could not
    be loaded), or for ``WebQA_test.json`` (no answers, no gold facts); ``WebQAFormatError`` for a file that is not
    WebQA at all. Either way nothing is written and an existing ``out_dir`` stays as it was.
    """
    from datasets import DatasetDict
    from tqdm.auto import tqdm

    data = _data_settings(settings)
    filters = filters or MiniWebQAFilters()
    max_candidates = max_candidates if max_candidates is not None else data.max_candidates
    source_dir = Path(source_dir)
    json_path = find_webqa_json(source_dir)
    if json_path.name == "WebQA_test.json":
        raise MiniWebQABuildError(
            f"{json_path} is WebQA's test file (no answers, no gold facts): a training source needs "
            f"WebQA_train_val.json; put it in {json_path.parent} (github.com/WebQnA/WebQA) or build a synthetic "
            "world with make_world")
    folder = json_path.parent
    if out_dir is not None:
        _check_mini_target(Path(out_dir), folder)
    has_images = (folder / "imgs.tsv").is_file() and (folder / "imgs.lineidx").is_file()
    if filters.check_images and not has_images:
        raise FileNotFoundError(_no_images_message(folder))
    try:
        store = ImageStore(folder) if has_images else None
    except ImageStoreFormatError as exc:  # the whole store, not one image: nothing to build images from
        raise MiniWebQABuildError(f"cannot build Mini-WebQA from {folder}: {exc}") from None
    report = FunnelReport(source=str(json_path.resolve()))  # absolute: compared later
    report.settings = {"filters": filters.to_dict(), "max_candidates": max_candidates, "seed": seed,
                       "test_split": data.test_split,
                       "source_files": source_fingerprint(json_path),  # before reading: a change meanwhile shows
                       "synthetic_world": _is_world(folder)}
    try:
        errors: list[RecordError] = []
        try:
            records = list(tqdm(iter_webqa(json_path, errors), desc="read WebQA", disable=not progress,
                                mininterval=1.0, unit=" q"))
        except WebQAFormatError as exc:  # the whole file, not one record: nothing to build from
            raise WebQAFormatError(f"cannot build Mini-WebQA from {json_path}: {exc}. Check that it is "
                                   "WebQA_train_val.json as released (download it again if it was cut) or a world "
                                   "written by make_world") from None
        bad = [e for e in errors if not e.file_break]  # a file break is no record: it is a WARNING, not a count
        report.steps.append(FunnelStep("unreadable", FILTER_REASONS["unreadable"], len(records) + len(bad),
                                       len(bad), len(records), [e.guid for e in bad[:5]]))
        report.read_errors = [str(e) for e in errors[:20]]
        report.warnings = [f"{json_path.name}: {e.message}" for e in errors if e.file_break]
        unlabelled = bool(records) and not any(r.is_labelled for r in records)
        n_threads = _image_threads(workers, store is not None)
        held_out = data.test_split == "webqa_val"  # balance the train questions only, after the hold-out
        kept = filter_records(records, filters, store, report, seed=seed, progress=progress, workers=n_threads,
                              balance=not held_out)
        del records
        if not kept:
            raise _nothing_left(report, json_path, unlabelled)
        if held_out:
            pool, test, linked = hold_out_webqa_val(kept)
            report.add("linked_to_train", len(kept), linked)
            random.Random(f"test-{seed}").shuffle(test)  # held out in key order: any first N must be a fair sample
            balanced = balance_categories(pool, filters, report, seed, held_out=len(test))
            kept = balanced + test
            parts = split_records(balanced, (*filters.split_fractions[:2], 0.0), seed=seed)
            parts["test"] = test
        else:
            parts = split_records(kept, filters.split_fractions, seed=seed)
        if out_dir is not None:  # cheap check first; the rows below may still skip a few
            _refuse_empty_splits({k: len(v) for k, v in parts.items()}, report, json_path, filters.split_fractions,
                                 data.test_split)
        counts: Counter = Counter()
        splits = {}
        bar = tqdm(total=len(kept), desc=f"build rows ({n_threads} threads)" if n_threads > 1 else "build rows",
                   disable=not progress, mininterval=1.0, unit=" q")
        skipped: list[str] = []
        not_in_store: list[ImageNotFoundError] = []  # skipped because a gold image's id is not in the store at all
        with ThreadPoolExecutor(n_threads, thread_name_prefix="mini-webqa-rows") as executor:
            def row_of(r: WebQARecord) -> tuple[dict[str, Any] | None, Counter, ImageStoreError | None]:
                return _row_or_skip(r, store, max_candidates, filters, seed)

            def rows(recs: list[WebQARecord]):
                for r, (row, row_counts, problem) in zip(recs, _in_order(executor, row_of, recs, 4 * n_threads)):
                    bar.update(1)
                    counts.update(row_counts)
                    if row is None:
                        skipped.append(r.guid)
                        report.read_errors.append(f"{r.guid}: skipped, {problem}")
                        if isinstance(problem, ImageNotFoundError):
                            not_in_store.append(problem)
                        continue
                    yield row

            for name in SPLITS:
                splits[name] = rows_to_dataset(rows(parts[name]))
        bar.close()
        dd = DatasetDict(splits)
        if skipped:  # the funnel ends at what the dataset holds
            report.add("broken_gold_image", len(kept), skipped)
        if store is not None and not filters.check_images:  # checked, the broken_gold_image step refused it already
            _refuse_missing_gold(not_in_store, sum(1 for r in kept if r.img_pos), store, report)
        report.splits = {k: len(v) for k, v in dd.items()}
        if report.n_kept == 0:
            raise _nothing_left(report, json_path, unlabelled)
        if out_dir is not None:
            _refuse_empty_splits(report.splits, report, json_path, filters.split_fractions, data.test_split)
        report.qcates = dict(sorted(Counter(q for split in dd.values() for q in split["qcate"]).items()))
        report.candidates = dict(counts)
        if out_dir is not None:
            save_dataset_atomic(dd, out_dir, {"funnel.json": json.dumps(report.to_dict(), indent=2)}, progress=progress)
        return dd, report
    finally:
        if store is not None:
            store.close()


_MINI_FILES = ("dataset_dict.json", "funnel.json")  # what the builder writes into a Mini-WebQA folder, besides splits
_SYSTEM_FILES = frozenset([".DS_Store", "Thumbs.db", "desktop.ini"])  # a file browser's, replaced without asking


def _check_mini_target(out_dir: Path, source_folder: Path) -> None:
    """Refuse an ``out_dir`` whose replacement would lose something the builder did not write: the WebQA files
    themselves (``out_dir`` is, or holds, the source folder), a folder of other files, or a previous Mini-WebQA
    (``dataset_dict.json`` + ``funnel.json``) with other files put beside it. A Mini-WebQA alone may be replaced."""
    out, source = out_dir.resolve(), source_folder.resolve()
    if out == source or out in source.parents:
        raise FileExistsError(f"out_dir {out_dir} is (or holds) the WebQA source folder {source_folder}: saving there "
                              "would delete the source files; pass a separate folder, e.g. <run>/mini_webqa")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder: Mini-WebQA is saved as a folder there")
    names = sorted(p.name for p in out_dir.iterdir())
    if names and not set(_MINI_FILES) <= set(names):
        raise FileExistsError(f"{out_dir} holds files that are not a Mini-WebQA (e.g. {names[0]!r}): the build would "
                              "delete them; pass a new or empty folder, or move those files away first")
    foreign = [n for n in names if n not in {*_MINI_FILES, *SPLITS, *_saved_splits(out_dir)} | _SYSTEM_FILES]
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out_dir} holds a Mini-WebQA and also files it did not write ({shown}): rebuilding "
                              "replaces the whole folder and would delete them; move them away first, or pass another "
                              "out_dir")


def _saved_splits(mini: Path) -> list[str]:
    """The split folders a saved Mini-WebQA's ``dataset_dict.json`` names (none when it cannot be read)."""
    try:
        splits = json.loads((mini / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(s) for s in splits] if isinstance(splits, list) else []


def load_mini_webqa(path: str | Path):
    """Load a saved Mini-WebQA ``DatasetDict``."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"no Mini-WebQA at {path}: build it with build_mini_webqa or ensure_mini_webqa")
    return load_from_disk(str(path))


def _world_matches(manifest: dict, preset: Any) -> bool:
    """The run's world is what ``preset`` would draw now: same settings, and pixels from this drawing code (a
    manifest from before ``drawing`` was recorded is version 1, whose jitter let a few shapes touch)."""
    from .world import DRAWING_VERSION

    want = {"seed": preset.seed, "n_questions": preset.data.world_questions, "image_size": preset.data.world_image_size}
    return all(manifest.get(k) == v for k, v in want.items()) and manifest.get("drawing", 1) == DRAWING_VERSION


def _saved_source(mini: Path) -> tuple[Path, dict[str, Any]] | None:
    """(question file, build settings) that ``funnel.json`` in ``mini`` records; None without a readable one."""
    try:
        meta = json.loads((mini / "funnel.json").read_text())
        return Path(meta["source"]), dict(meta.get("settings") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_world(folder: Path) -> bool:
    from .world import read_world_manifest

    return read_world_manifest(folder) is not None


def mini_webqa_source(work_dir: str | Path) -> str | None:
    """What run folder ``work_dir``'s Mini-WebQA was built from: ``"synthetic world"``, ``"WebQA files"``, or None.

    A results table must carry this: numbers on the synthetic world's coloured shapes say nothing about WebQA.
    A build from before ``funnel.json`` recorded it is judged by the world manifest beside its source, if still there.
    """
    saved = _saved_source(Path(work_dir) / "mini_webqa")
    if saved is None:
        return None
    source, settings = saved
    synthetic = settings.get("synthetic_world")
    if synthetic is None:
        if not source.is_file():
            return None
        synthetic = _is_world(source.parent)
    return "synthetic world" if synthetic else "WebQA files"


def mini_webqa_is_current(preset: Any, work_dir: str | Path, webqa_dir: str | Path | None = None) -> bool | None:
    """Whether the Mini-WebQA saved in run folder ``work_dir`` is what ``preset`` (and ``webqa_dir``) would build;
    ``None`` when none is saved. The cache check of ``ensure_mini_webqa``; the CLI asks it before overwriting a run.
    ``mini_webqa_staleness`` says why not.

    Current means: same ``max_candidates``, ``test_split`` and seed, and source files unchanged since the build (size and
    ``mtime_ns`` as recorded in ``funnel.json``; a build from before that was recorded is taken as it is). A Mini-WebQA that
    notebook 01 built from real WebQA counts as current when asked without ``webqa_dir``, unless its source files
    changed (if they are gone there is nothing to compare with, or to rebuild from, and it is kept).
    """
    reasons = mini_webqa_staleness(preset, work_dir, webqa_dir)
    return None if reasons is None else not reasons


def mini_webqa_staleness(preset: Any, work_dir: str | Path, webqa_dir: str | Path | None = None) -> list[str] | None:
    """Why the saved Mini-WebQA is not what ``preset`` would build, one phrase per difference (``[]``: it is;
    ``None``: none is saved). Said before a rebuild: on real WebQA one takes about an hour on 2 cores (projected)."""
    from .world import read_world_manifest

    wd = Path(work_dir)
    mini, world = wd / "mini_webqa", wd / "world"
    if not ((mini / "funnel.json").is_file() and (mini / "dataset_dict.json").is_file()):
        return None
    saved = _saved_source(mini)
    if saved is None:
        return ["its funnel.json cannot be read"]
    source, settings = saved
    built_from = source.parent.resolve()
    want = {"max_candidates": preset.data.max_candidates, "seed": preset.seed, "test_split": preset.data.test_split}
    had = {"max_candidates": settings.get("max_candidates"), "seed": settings.get("seed"),
           "test_split": settings.get("test_split", "pooled")}  # a build from before test_split existed pooled
    reasons = [f"built with {k}={had[k]!r}, the preset asks {v!r}" for k, v in want.items() if had[k] != v]
    # a build from before fingerprints were recorded cannot be checked: kept, as it was then
    changed = "source_files" in settings and settings["source_files"] != source_fingerprint(source)
    if webqa_dir is not None:
        asked = Path(webqa_dir).resolve()
        if asked not in (built_from, source.resolve()):
            reasons.append(f"built from {built_from}, not from {asked}")
    elif built_from != world.resolve():  # notebook 01 built it from real WebQA on purpose: keep it
        changed = changed and source.is_file()  # gone (a drive not mounted): nothing to compare with
    else:
        manifest = read_world_manifest(world)
        if manifest is None or not _world_matches(manifest, preset):
            reasons.append("the run's synthetic world is missing or was made with other settings")
    if changed:
        reasons.append(f"its source files in {built_from} changed since the build")
    return reasons


def synthetic_build_note(work_dir: str | Path) -> str:
    """What a GPU preset's user reads before a synthetic Mini-WebQA is built in a run folder that had none.

    The usual cause is not a choice but a lost folder: notebook 01 built real WebQA somewhere else (``/content`` of
    a runtime since wiped, or before ``MMRAG_HOME`` pointed at Drive), and hours of training would go to shapes.
    """
    return (f"NOTE: no Mini-WebQA in {work_dir}: building one from the SYNTHETIC world (drawn shapes, not WebQA). "
            "If notebook 01 built real WebQA, it is in another run folder: set MMRAG_HOME (or work_dir) as it was "
            "there, in every notebook, and restart this one.")


def ensure_mini_webqa(preset: Any = "auto", work_dir: str | Path | None = None, progress: bool = False,
                      webqa_dir: str | Path | None = None, force: bool = False):
    """The run's Mini-WebQA: build ``world/`` and ``mini_webqa/`` under the run folder if missing, then load it.

    ``webqa_dir`` builds from real WebQA files instead of the synthetic world. A world or dataset built with other
    settings (different preset sizes or seed) or from source files that changed since is rebuilt
    (``mini_webqa_is_current``), so the cache never goes stale silently. A Mini-WebQA that notebook 01 built from
    real WebQA is kept (later notebooks call this without ``webqa_dir``), and rebuilt from that same folder when it
    must be. ``force`` rebuilds unconditionally (the run's synthetic world too, when that is the source).
    ``progress`` shows bars for a synthetic build; one from real WebQA files always shows them.
    """
    from ..config import resolve_preset
    from ..config import work_dir as run_dir
    from .world import make_world, read_world_manifest

    p = resolve_preset(preset)
    if webqa_dir is not None:  # refused before the run folder and its lock are made: a refused build leaves nothing
        check_webqa_source(webqa_dir)
    wd = run_dir(p, work_dir)
    mini, world = wd / "mini_webqa", wd / "world"
    if not force and mini_webqa_is_current(p, wd, webqa_dir):
        return load_mini_webqa(mini)
    with folder_lock(mini):  # two kernels on one run folder: the second waits, then finds the first one's build
        stale = None if force else mini_webqa_staleness(p, wd, webqa_dir)
        if force or stale is None or stale:
            saved = _saved_source(mini) if webqa_dir is None else None
            if webqa_dir is not None:
                source = Path(webqa_dir)
            elif saved is not None and saved[0].parent.resolve() != world.resolve():
                source = saved[0]  # notebook 01's real WebQA: rebuild from it, never swap in the synthetic world
                if not source.is_file():
                    raise FileNotFoundError(
                        f"{mini} was built from {source}, which is gone, and must be rebuilt (other settings, or "
                        "force): pass webqa_dir= the folder that holds WebQA now (a mounted drive?), or delete "
                        f"{mini} to build from the synthetic world instead")
            else:
                if not force and stale is None and not p.model.is_miniature:  # a GPU run about to train hours on coloured shapes
                    print(synthetic_build_note(wd))
                manifest = read_world_manifest(world)
                if (force or manifest is None or not _world_matches(manifest, p)
                        or not (world / "imgs.lineidx").is_file()):
                    make_world(world, n_questions=p.data.world_questions, seed=p.seed,
                               image_size=p.data.world_image_size, progress=progress)
                source = world
            if stale:  # say why before a rebuild that takes hours on real WebQA
                print(f"rebuilding {mini} from {source}: " + "; ".join(stale))
            real = Path(source).resolve() != world.resolve()  # hours on real WebQA: always with progress bars
            build_mini_webqa(source, mini, settings=p.data, seed=p.seed, progress=progress or real)
    return load_mini_webqa(mini)
