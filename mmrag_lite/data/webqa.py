"""Reading WebQA exactly as released: ``WebQA_train_val.json`` / ``WebQA_test.json``.

The file is one JSON object keyed by Guid. In each record ``Q``, every ``A`` and ``Keywords_A`` are wrapped in
literal double quotes (``"\\"What color ...?\\""``); image facts carry an integer ``image_id`` that indexes
``imgs.tsv`` and text facts a ``snippet_id`` ``"<Guid>_<n>"``. The train/val file splits candidates into
``img_posFacts`` / ``img_negFacts`` / ``txt_posFacts`` / ``txt_negFacts``; the test file merges them into
``img_Facts`` / ``txt_Facts`` (no labels, no answers).

The reader streams the top-level object record by record (``json.JSONDecoder.raw_decode`` over a sliding buffer),
so the real 1 GB file never sits in memory as one parsed tree. A record that does not fit the schema becomes a
``RecordError`` naming its Guid; the other records are still returned (``strict=True`` raises instead). A file that
is not a WebQA file at all (a JSON list, broken before its first record) is a ``WebQAFormatError`` naming the file.
"""

from __future__ import annotations

import codecs
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QCATES: tuple[str, ...] = ("text", "YesNo", "Others", "choose", "number", "color", "shape")
IMAGE_QCATES: frozenset[str] = frozenset(QCATES) - {"text"}


class WebQAFormatError(ValueError):
    """A record (or the whole file) does not follow the WebQA layout; the message names the Guid."""

    def __init__(self, message: str, guid: str | None = None):
        super().__init__(message)
        self.guid = guid


@dataclass(frozen=True, slots=True)
class ImageFact:
    """One image candidate: ``image_id`` is the row key of ``imgs.tsv`` (look-up: ``image_id % 10_000_000``)."""

    image_id: int
    title: str
    caption: str
    url: str = ""
    img_url: str = ""

    @property
    def id(self) -> str:
        return str(self.image_id)


@dataclass(frozen=True, slots=True)
class TextFact:
    """One text candidate (a Wikipedia snippet): ``snippet_id`` is ``"<Guid>_<n>"``."""

    snippet_id: str
    title: str
    fact: str
    url: str = ""

    @property
    def id(self) -> str:
        return self.snippet_id


@dataclass(frozen=True, slots=True)
class WebQARecord:
    """One WebQA question with its candidate pool; quotes already stripped from question, answers, keywords.

    ``img_facts`` / ``txt_facts`` hold the unlabelled pool of the test file (empty for train/val).
    """

    guid: str
    question: str
    answers: tuple[str, ...]
    qcate: str
    topic: str
    split: str
    img_pos: tuple[ImageFact, ...] = ()
    img_neg: tuple[ImageFact, ...] = ()
    txt_pos: tuple[TextFact, ...] = ()
    txt_neg: tuple[TextFact, ...] = ()
    img_facts: tuple[ImageFact, ...] = ()
    txt_facts: tuple[TextFact, ...] = ()
    keywords: str = ""

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""

    @property
    def gold_ids(self) -> list[str]:
        return [f.id for f in self.img_pos] + [f.id for f in self.txt_pos]

    @property
    def is_labelled(self) -> bool:
        return not (self.img_facts or self.txt_facts)

    def facts(self) -> Iterator[tuple[ImageFact | TextFact, bool]]:
        """Every candidate with its gold flag (test-file candidates count as not gold)."""
        for f in self.img_pos:
            yield f, True
        for f in self.txt_pos:
            yield f, True
        for group in (self.img_neg, self.txt_neg, self.img_facts, self.txt_facts):
            for f in group:
                yield f, False


@dataclass(frozen=True)
class RecordError:
    """Why one record could not be read; the rest of the file is unaffected.

    ``file_break``: not one bad record but the place where the file stops being readable (a cut download, a syntax
    error): every record after it is lost, so a builder must say so plainly, not count it as one record.
    """

    guid: str
    message: str
    file_break: bool = False

    def __str__(self) -> str:
        return f"record {self.guid}: {self.message}"


@dataclass
class WebQAReadResult:
    records: list[WebQARecord] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[WebQARecord]:
        return iter(self.records)


# ----------------------------------------------------------------------------------------- parsing
def strip_quotes(text: str) -> str:
    """Remove the literal double quotes WebQA wraps around Q, A and Keywords_A (and surrounding spaces)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    return text


def _str(raw: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in raw:
        if required:
            raise WebQAFormatError(f"{where}: missing key {key!r}")
        return ""
    value = raw[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise WebQAFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _image_fact(raw: Any, where: str) -> ImageFact:
    if not isinstance(raw, Mapping):
        raise WebQAFormatError(f"{where}: an image fact must be an object, got {type(raw).__name__}")
    image_id = raw.get("image_id")
    if isinstance(image_id, str) and image_id.strip().isascii() and image_id.strip().isdigit():  # not "²"
        image_id = int(image_id)
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
        raise WebQAFormatError(f"{where}: image_id must be a non-negative integer, got {image_id!r}")
    return ImageFact(
        image_id=image_id,
        title=_str(raw, "title", where, required=False),
        caption=_str(raw, "caption", where, required=False),
        url=_str(raw, "url", where, required=False),
        img_url=_str(raw, "imgUrl", where, required=False),
    )


def _text_fact(raw: Any, where: str) -> TextFact:
    if not isinstance(raw, Mapping):
        raise WebQAFormatError(f"{where}: a text fact must be an object, got {type(raw).__name__}")
    return TextFact(
        snippet_id=_str(raw, "snippet_id", where),
        title=_str(raw, "title", where, required=False),
        fact=_str(raw, "fact", where),
        url=_str(raw, "url", where, required=False),
    )


def _facts(raw: Mapping[str, Any], key: str, kind: str, guid: str) -> tuple:
    value = raw.get(key, [])
    if value is None:
        value = []
    if not isinstance(value, list):
        raise WebQAFormatError(f"{key} must be a list, got {type(value).__name__}", guid)
    parse = _image_fact if kind == "image" else _text_fact
    return tuple(parse(item, f"{key}[{i}]") for i, item in enumerate(value))


def parse_record(guid: str, raw: Mapping[str, Any]) -> WebQARecord:
    """One raw record (as in the file) -> ``WebQARecord``; raises ``WebQAFormatError`` naming the Guid."""
    try:
        if not isinstance(raw, Mapping):
            raise WebQAFormatError(f"record must be an object, got {type(raw).__name__}")
        if "Guid" in raw and raw["Guid"] != guid:
            raise WebQAFormatError(f"Guid field {raw['Guid']!r} differs from its key")
        question = strip_quotes(_str(raw, "Q", "record"))
        if not question:
            raise WebQAFormatError("empty question Q")
        answers_raw = raw.get("A", [])
        if isinstance(answers_raw, str):
            answers_raw = [answers_raw]
        if not isinstance(answers_raw, list) or not all(isinstance(a, str) for a in answers_raw):
            raise WebQAFormatError(f"A must be a list of strings, got {answers_raw!r:.80}")
        qcate = _str(raw, "Qcate", "record", required=False)
        if qcate and qcate not in QCATES:
            raise WebQAFormatError(f"unknown Qcate {qcate!r}; known: {', '.join(QCATES)}")
        return WebQARecord(
            guid=guid,
            question=question,
            answers=tuple(strip_quotes(a) for a in answers_raw),
            qcate=qcate,
            topic=_str(raw, "topic", "record", required=False),
            split=_str(raw, "split", "record", required=False),
            img_pos=_facts(raw, "img_posFacts", "image", guid),
            img_neg=_facts(raw, "img_negFacts", "image", guid),
            txt_pos=_facts(raw, "txt_posFacts", "text", guid),
            txt_neg=_facts(raw, "txt_negFacts", "text", guid),
            img_facts=_facts(raw, "img_Facts", "image", guid),
            txt_facts=_facts(raw, "txt_Facts", "text", guid),
            keywords=strip_quotes(_str(raw, "Keywords_A", "record", required=False)),
        )
    except WebQAFormatError as exc:
        raise WebQAFormatError(f"WebQA record {guid}: {exc}", guid) from None


# ------------------------------------------------------------------------------------- streaming
def iter_raw_records(path: str | Path, chunk_chars: int = 1 << 20,
                     max_record_chars: int = 1 << 25) -> Iterator[tuple[str, Any]]:
    """Yield ``(guid, raw_record)`` from a WebQA JSON file without parsing the whole file at once.

    A value that still does not parse after ``max_record_chars`` more characters is a syntax error, not a record
    cut by the buffer (real records are under 100 kB), so a broken file never gets read into memory whole.
    """
    decoder = json.JSONDecoder()
    path = Path(path)
    # bytes, decoded incrementally: a text-mode read that meets a bad byte (a cut multi-byte character, a corrupt
    # byte) raises for its whole chunk, losing the records before the bad byte with it
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        where = "at the start of the file"
        pos = 0
        consumed = 0  # characters of the file before buf[0], for error positions
        eof = False
        bad: str | None = None  # a decoding error, raised once the text before it is used up

        def read() -> str:
            nonlocal eof, bad
            if bad is not None:  # a format error like broken JSON: the reader keeps the records before it
                raise WebQAFormatError(f"{path.name}: bytes that are not UTF-8 after character {consumed + len(buf)} "
                                       f"({where}): {bad}")
            chunk = fh.read(chunk_chars)
            eof = len(chunk) < chunk_chars
            try:
                return utf8.decode(chunk, final=eof)
            except UnicodeDecodeError as exc:
                eof, bad = False, exc.reason
                return exc.object[:exc.start].decode("utf-8")

        buf = ""  # read() names the position of a bad byte by it
        buf = read()

        def fill() -> bool:
            nonlocal buf, pos, consumed
            if eof:
                return False
            more = read()
            consumed += pos
            buf = buf[pos:] + more
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        def decode() -> Any:
            nonlocal pos
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if len(buf) - pos < max_record_chars and fill():
                        continue
                    raise WebQAFormatError(f"{path.name}: invalid JSON at character {consumed + exc.pos} "
                                           f"({where}): {exc.msg}") from None
                # a number at the very end of the buffer may be cut; strings/objects end with a delimiter (reading
                # ahead after them could only meet a bad byte early and lose the whole record before it)
                if isinstance(value, (int, float)) and end == len(buf) and not eof and fill():
                    continue
                pos = end
                return value

        skip_ws()
        if pos >= len(buf) or buf[pos] != "{":
            raise WebQAFormatError(f"{path.name}: a WebQA file is one JSON object keyed by Guid")
        pos += 1
        skip_ws()
        if pos < len(buf) and buf[pos] == "}":
            return
        while True:
            skip_ws()
            key = decode()
            if not isinstance(key, str):
                raise WebQAFormatError(f"{path.name}: expected a Guid string key, got {key!r:.40}")
            skip_ws()
            if pos >= len(buf) or buf[pos] != ":":
                raise WebQAFormatError(f"{path.name}: expected ':' after key {key!r}")
            pos += 1
            skip_ws()
            where = f"in record {key!r}"
            value = decode()
            where = f"after record {key!r}"
            yield key, value
            if pos > chunk_chars:  # drop what is consumed so the buffer stays small
                consumed += pos
                buf = buf[pos:]
                pos = 0
            skip_ws()
            if pos >= len(buf):
                raise WebQAFormatError(f"{path.name}: file ends inside the top-level object (after {key!r})")
            if buf[pos] == ",":
                pos += 1
                continue
            if buf[pos] == "}":
                return
            raise WebQAFormatError(f"{path.name}: expected ',' or '}}' after record {key!r}")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and tqdm.

    The reader warns from inside a generator, so a fixed level lands in whoever advances it (tqdm's loop, the
    builder, ``read_webqa``) instead of the line the user wrote.
    """
    frame, level = sys._getframe(2), 2  # the function that wants to warn is level 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(("mmrag_lite.data", "tqdm")):
        frame, level = frame.f_back, level + 1
    return level


def iter_webqa(path: str | Path, errors: list[RecordError] | None = None, strict: bool = False) -> Iterator[WebQARecord]:
    """Yield typed records one at a time; bad records go to ``errors`` (or raise when ``strict``).

    A file that breaks off (cut download, syntax error) keeps the records before the break: the break is one more
    entry in ``errors`` (``file_break=True``, "the file ends mid-record after N records"), named by the last record
    read, and a warning says the rest of the file was not read. A
    file that breaks before its first record (not a Guid-keyed object, cut inside the first record) has nothing to
    keep: that is a ``WebQAFormatError`` naming the file, strict or not.
    """
    raw_records = iter_raw_records(path)
    last, n_read = None, 0
    while True:
        try:
            guid, raw = next(raw_records)
        except StopIteration:
            return
        except WebQAFormatError as exc:
            if strict or last is None:
                raise
            broken = "bytes that are not UTF-8" if "not UTF-8" in str(exc) else "invalid JSON"
            where = "the file ends mid-record" if _ends_mid_object(path) else f"the file breaks off ({broken})"
            message = (f"{where} after {n_read} records (the last whole one: {last}); the rest of the file is not "
                       f"read: a cut download? Download it again ({exc})")
            warnings.warn(f"{exc}; keeping the records before it ({n_read}), the rest of the file is not read: "
                          f"{where}", stacklevel=_caller_stacklevel())
            if errors is not None:
                errors.append(RecordError(f"<file after {last}>", message, file_break=True))
            return
        last, n_read = guid, n_read + 1
        try:
            yield parse_record(guid, raw)
        except WebQAFormatError as exc:
            if strict:
                raise
            if errors is not None:
                errors.append(RecordError(guid, str(exc).removeprefix(f"WebQA record {guid}: ")))


def _ends_mid_object(path: str | Path) -> bool:
    """Whether the file stops before its closing ``}`` (reads its last few bytes only)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 64))
        return not fh.read().rstrip().endswith(b"}")


def read_webqa(path: str | Path, strict: bool = False) -> WebQAReadResult:
    """Read a whole WebQA JSON file into records plus the list of records that failed (named by Guid)."""
    result = WebQAReadResult()
    result.records.extend(iter_webqa(path, result.errors, strict=strict))
    return result


def find_webqa_json(source_dir: str | Path) -> Path:
    """The question file inside a WebQA folder: ``WebQA_train_val.json`` (else ``WebQA_test.json``)."""
    source_dir = Path(source_dir)
    if source_dir.is_file():
        return source_dir
    for name in ("WebQA_train_val.json", "WebQA_test.json"):
        if (source_dir / name).is_file():
            return source_dir / name
    raise FileNotFoundError(
        f"no WebQA_train_val.json or WebQA_test.json in {source_dir}; get them from github.com/WebQnA/WebQA "
        "or build a synthetic world with mmrag_lite.data.make_world"
    )
