"""Reading MultimodalQA (Talmor et al., 2021) as released: ``MMQA_<split>.jsonl.gz`` plus document metadata.

Each question line carries its own candidate pool in ``metadata.image_doc_ids`` / ``metadata.text_doc_ids`` (about
10 + 10 documents), its gold sources in ``supporting_context`` (``doc_id`` + ``doc_part``), and a list of
``answers`` (MMQA answers are sets: EM/F1 compare sets of spans). ``MMQA_images.jsonl.gz`` maps image ids to
``title, url, id, path`` (no pixels here), ``MMQA_texts.jsonl.gz`` maps passage ids to ``title, url, id, text``.

``mmqa_to_rows`` shapes the image+text questions like Mini-WebQA rows so the evaluation code can run on them; an
image candidate carries its title as ``text`` and no pixels. ``attach_mmqa_images`` adds the pixels where the
release's image folder (``final_dataset_images/``, unzipped from ``final_dataset_images.zip``) is at hand; offline
it is not, so image candidates stay titles. Without ``MMQA_texts`` a passage is only an id, so passage candidates
are left out: offline retrieval then compares the question with image titles only.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import ImageDecodeError, load_image_bytes
from .webqa import RecordError

MMQA_IMAGE_FOLDER = "final_dataset_images"  # what the release's final_dataset_images.zip unpacks to


class MMQAFormatError(ValueError):
    """A line does not follow the MMQA layout; the message names the qid (or line number)."""


@dataclass(frozen=True, slots=True)
class MMQADoc:
    """Metadata of one image or passage (``text`` is empty for images)."""

    id: str
    title: str
    url: str = ""
    path: str = ""
    text: str = ""


@dataclass(frozen=True, slots=True)
class MMQAQuestion:
    qid: str
    question: str
    answers: tuple[str, ...]
    answer_modalities: tuple[str, ...]
    qtype: str  # metadata.type: ImageQ, TextQ, TableQ, Compose(...), ...
    modalities: tuple[str, ...]
    image_doc_ids: tuple[str, ...]
    text_doc_ids: tuple[str, ...]
    table_id: str
    supporting: tuple[tuple[str, str], ...]  # (doc_id, doc_part)

    @property
    def gold_doc_ids(self) -> tuple[str, ...]:
        """Supporting documents that are in the candidate pool (tables are not candidates here)."""
        pool = set(self.image_doc_ids) | set(self.text_doc_ids)
        seen: dict[str, None] = {}
        for doc_id, _ in self.supporting:
            if doc_id in pool:
                seen.setdefault(doc_id)
        return tuple(seen)


def _open(path: str | Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) per non-empty line; a line that is not JSON comes as an ``MMQAFormatError``, so a
    reader can record it and go on (one cut line must not lose the file). A file that ends early (a cut download:
    gzip's end-of-stream missing, bytes that stop mid-character) yields one last ``MMQAFormatError`` after the lines
    read before the cut."""
    n = 0
    with _open(path) as fh:
        try:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield n, MMQAFormatError(f"{Path(path).name} line {n}: invalid JSON ({exc.msg})")
        except (EOFError, UnicodeDecodeError, gzip.BadGzipFile, zlib.error) as exc:
            yield n + 1, MMQAFormatError(f"{Path(path).name} line {n + 1}: the file ends early or is corrupt "
                                         f"({type(exc).__name__}: {exc}); the lines before it are kept")


def parse_mmqa_question(raw: Mapping[str, Any]) -> MMQAQuestion:
    qid = raw.get("qid", "?") if isinstance(raw, Mapping) else "?"
    try:
        meta = raw.get("metadata") or {}
        answers = raw.get("answers") or []
        return MMQAQuestion(
            qid=str(raw["qid"]),
            question=str(raw["question"]),
            answers=tuple(str(a["answer"]) for a in answers),
            answer_modalities=tuple(str(a.get("modality", "")) for a in answers),
            qtype=str(meta.get("type", "")),
            modalities=tuple(meta.get("modalities") or ()),
            image_doc_ids=tuple(meta.get("image_doc_ids") or ()),
            text_doc_ids=tuple(meta.get("text_doc_ids") or ()),
            table_id=str(meta.get("table_id") or ""),
            supporting=tuple((str(s["doc_id"]), str(s.get("doc_part", ""))) for s in raw.get("supporting_context") or ()),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise MMQAFormatError(f"MMQA question {qid}: missing or malformed field ({exc!r})") from None


def _parse_doc(raw: Any, name: str, n: int) -> MMQADoc:
    if not isinstance(raw, Mapping) or "id" not in raw:
        raise MMQAFormatError(f"{name} line {n}: a document needs an 'id'")
    return MMQADoc(id=str(raw["id"]), title=str(raw.get("title", "")), url=str(raw.get("url", "")),
                   path=str(raw.get("path", "")), text=str(raw.get("text", "")))


def _read_lines(path: str | Path, parse, strict: bool, errors: list[RecordError] | None) -> list:
    """``parse(raw, line number)`` over every line; bad lines go to ``errors`` (raise when ``strict``)."""
    out = []
    for n, raw in _iter_jsonl(path):
        try:
            if isinstance(raw, MMQAFormatError):
                raise raw
            out.append(parse(raw, n))
        except MMQAFormatError as exc:
            if strict:
                raise
            if errors is not None:
                key = raw.get("qid", raw.get("id")) if isinstance(raw, Mapping) else None
                errors.append(RecordError(str(key or f"line {n}"), str(exc)))
    return out


def read_mmqa(path: str | Path, strict: bool = False, errors: list[RecordError] | None = None) -> list[MMQAQuestion]:
    """All questions of an ``MMQA_<split>.jsonl(.gz)`` file; bad lines go to ``errors`` (raise when ``strict``)."""
    return _read_lines(path, lambda raw, n: parse_mmqa_question(raw), strict, errors)


def read_mmqa_docs(path: str | Path, strict: bool = False,
                   errors: list[RecordError] | None = None) -> dict[str, MMQADoc]:
    """``MMQA_images.jsonl.gz`` or ``MMQA_texts.jsonl.gz`` -> {id: MMQADoc}; bad lines as in ``read_mmqa``."""
    return {d.id: d for d in _read_lines(path, lambda raw, n: _parse_doc(raw, Path(path).name, n), strict, errors)}


@dataclass
class MMQAData:
    questions: list[MMQAQuestion]
    images: dict[str, MMQADoc]
    texts: dict[str, MMQADoc]  # empty when MMQA_texts.jsonl.gz is absent


def load_mmqa(folder: str | Path, split: str = "dev") -> MMQAData:
    """Questions of ``split`` plus image (and, when present, passage) metadata from one folder."""
    folder = Path(folder)

    def find(stem: str) -> Path | None:
        for suffix in (".jsonl.gz", ".jsonl"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        return None

    qpath = find(f"MMQA_{split}")
    if qpath is None:
        raise FileNotFoundError(f"no MMQA_{split}.jsonl(.gz) in {folder} (github.com/allenai/multimodalqa)")
    ipath, tpath = find("MMQA_images"), find("MMQA_texts")
    return MMQAData(read_mmqa(qpath), read_mmqa_docs(ipath) if ipath else {}, read_mmqa_docs(tpath) if tpath else {})


def is_image_text_question(q: MMQAQuestion) -> bool:
    """Answerable from the image/text pool alone: no table among the supporting documents, and no answer read from
    a table (15 dev ``Compare(Compose(TableQ, ...))`` questions list no table as support yet answer from one)."""
    return (bool(q.supporting) and all(part in ("image", "text") for _, part in q.supporting) and bool(q.gold_doc_ids)
            and all(m in ("image", "text") for m in q.answer_modalities))


def mmqa_to_rows(
    questions: Iterable[MMQAQuestion],
    images: Mapping[str, MMQADoc],
    texts: Mapping[str, MMQADoc] | None = None,
    qtypes: tuple[str, ...] | None = ("ImageQ",),
    max_candidates: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Image+text MMQA questions as Mini-WebQA-shaped rows (plus an ``answers`` list for set-valued EM/F1).

    ``qtypes=("ImageQ",)`` gives the 230-question dev subset multi-modal RAG papers report on; ``None`` keeps every
    question whose supporting documents are images or passages. Image candidates carry ``image=None`` and ``text`` =
    their title (``attach_mmqa_images`` adds the pixels, where the release's image folder is at hand). Passages carry
    their title and text from ``MMQA_texts``; a passage it does not hold (all of them when it is absent, as offline)
    is left out of the pool, since a blank candidate only pads it (about 45% of an ImageQ pool), and a question with
    such a passage among its gold documents is skipped (nothing could retrieve it). Pools are trimmed to
    ``max_candidates`` (gold always kept, distractors of the documents known) and shuffled deterministically.
    """
    texts = texts or {}
    rows = []
    for q in questions:
        if qtypes is not None and q.qtype not in qtypes:
            continue
        if not is_image_text_question(q):
            continue
        gold = set(q.gold_doc_ids)
        if any(doc_id in gold and doc_id not in texts for doc_id in q.text_doc_ids):
            continue  # a gold passage whose text is unknown: no pool could show it
        cands = []
        for doc_id in q.image_doc_ids:
            doc = images.get(doc_id)
            title = doc.title if doc else ""
            cands.append({"id": doc_id, "modality": "image", "title": title, "text": title, "image": None,
                          "is_gold": doc_id in gold})
        for doc_id in q.text_doc_ids:
            doc = texts.get(doc_id)
            if doc is None:  # without MMQA_texts a passage is a bare id: a blank candidate would only pad the pool
                continue
            cands.append({"id": doc_id, "modality": "text", "title": doc.title, "text": doc.text, "image": None,
                          "is_gold": doc_id in gold})
        rng = random.Random(f"{seed}:{q.qid}")
        if max_candidates is not None:
            golds = [c for c in cands if c["is_gold"]]
            negs = [c for c in cands if not c["is_gold"]]
            rng.shuffle(negs)
            cands = golds + negs[: max(0, max_candidates - len(golds))]
        rng.shuffle(cands)
        rows.append({
            "guid": q.qid, "question": q.question, "answer": q.answers[0] if q.answers else "",
            "answers": list(q.answers), "keywords": "", "qcate": q.qtype, "topic": "",
            "candidates": cands, "gold_ids": [c["id"] for c in cands if c["is_gold"]],
        })
    return rows


@dataclass
class MMQAImageReport:
    """What ``attach_mmqa_images`` found: pixels attached, files absent, files unreadable (a few ids of each)."""

    attached: int = 0
    missing: int = 0
    unreadable: int = 0
    examples: list[str] = field(default_factory=list)  # "image <id>: why", the first few problems

    def describe(self) -> str:
        total = self.attached + self.missing + self.unreadable
        text = f"pixels for {self.attached} of {total} image candidates"
        if self.missing or self.unreadable:
            text += (f" ({self.missing} without a file, {self.unreadable} unreadable: shown as their titles"
                     + (f"; e.g. {'; '.join(self.examples)}" if self.examples else "") + ")")
        return text


def attach_mmqa_images(
    rows: Iterable[Mapping[str, Any]],
    images: Mapping[str, MMQADoc],
    images_dir: str | Path,
    max_side: int = 448,
    max_examples: int = 3,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], MMQAImageReport]:
    """Copies of ``rows`` whose image candidates carry their pixels from ``images_dir/<path>``, downscaled to
    ``max_side`` (as Mini-WebQA stores WebQA images), plus what was found.

    A candidate whose file is absent or unreadable keeps ``image=None`` and stays its title: one bad file never loses
    the question, and the report counts it. Questions share images (the 230 dev ImageQ pools at 8 candidates: 1,786
    image candidates, 1,126 files), so each file is decoded once and its candidates share the one image.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no MMQA image folder {folder} (unzip final_dataset_images.zip there)")
    from tqdm.auto import tqdm

    report = MMQAImageReport()
    loaded: dict[Path, tuple[Any, str, str | None]] = {}  # file -> (image or None, outcome, problem)
    out = []
    for row in tqdm(rows, desc="MMQA images", disable=not progress, mininterval=1.0):
        cands = []
        for cand in row["candidates"]:
            cand = dict(cand)
            if cand.get("modality") == "image" and cand.get("image") is None:
                doc = images.get(cand["id"])
                file = folder / (doc.path if doc and doc.path else f"{cand['id']}.jpg")
                if file not in loaded:
                    loaded[file] = _load_mmqa_image(file, cand["id"], max_side)
                image, outcome, problem = loaded[file]
                setattr(report, outcome, getattr(report, outcome) + 1)
                cand["image"] = image
                if problem and len(report.examples) < max_examples and problem not in report.examples:
                    report.examples.append(problem)
            cands.append(cand)
        out.append({**row, "candidates": cands})
    return out, report


def _load_mmqa_image(file: Path, doc_id: str, max_side: int) -> tuple[Any, str, str | None]:
    """``(image or None, which MMQAImageReport count it adds to, what went wrong)`` for one release image file."""
    try:
        im = load_image_bytes(file.read_bytes(), doc_id)
    except (FileNotFoundError, IsADirectoryError):
        return None, "missing", f"image {doc_id}: no file {file}"
    except ImageDecodeError as exc:  # its message names the id
        return None, "unreadable", str(exc)
    except OSError as exc:  # unreadable file (permissions, I/O)
        return None, "unreadable", f"image {doc_id}: {type(exc).__name__}: {exc.strerror or exc}"
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    return im, "attached", None
