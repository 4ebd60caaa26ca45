"""Random access to WebQA's pixels: ``imgs.tsv`` + ``imgs.lineidx``.

``imgs.tsv`` holds one line per image, ``"<image_id>\\t<base64 of the encoded image>"`` (51 GB for real WebQA), and
``imgs.lineidx`` one line per image with the byte offset of that image's line. Look-up is O(1):

    offset = lineidx[image_id % 10_000_000];  read the line at offset;  check the id;  base64-decode;  PIL-open

The offsets live in one compact ``numpy.int64`` array (8 bytes per image); the tsv is never read whole. Opening a
store probes a few offsets, so a tsv that its lineidx does not index (CRLF line endings, another copy's lineidx) is
one clear ``ImageStoreFormatError``, not thousands of missing images.
Opening a store also checks that each probed line holds the image id its row stands for (``id % 10_000_000 == row``):
an index shifted by a line, or made for another tsv, would otherwise read every look-up as "holds id ...".
Some real images are truncated; ``load_image_bytes`` opens them with ``ImageFile.LOAD_TRUNCATED_IMAGES`` (and refuses
one that is mostly missing). Images come out RGB, transparency laid on white (``to_rgb``).
A store and ``load_image_bytes`` are safe to use from several threads (the Mini-WebQA builder does) and from forked
processes (``DataLoader`` workers): a line is read with ``os.pread``, which shares no file position.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ID_MODULUS = 10_000_000  # WebQA image ids are 3xxxxxxx; the row in imgs.lineidx is id % 10_000_000


class _TruncationGate:
    """PIL reads its truncation tolerance from one process-wide flag. Strict decodes share the gate; a tolerant one
    holds it alone while the flag is raised, so a strict decode in another thread never runs with the flag up (it
    would pass a truncated file as whole). A waiting tolerant decode goes before strict ones that come later."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._strict = 0  # strict decodes running
        self._tolerant_waiting = 0
        self._tolerant = False

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not (self._tolerant or self._tolerant_waiting))
            self._strict += 1
        try:
            yield
        finally:
            with self._cond:
                self._strict -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def tolerant(self) -> Iterator[None]:
        with self._cond:
            self._tolerant_waiting += 1
            self._cond.wait_for(lambda: not (self._tolerant or self._strict))
            self._tolerant_waiting -= 1
            self._tolerant = True
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
            with self._cond:
                self._tolerant = False
                self._cond.notify_all()


TRUNCATION_GATE = _TruncationGate()  # every strict ``load()`` of store bytes runs under ``TRUNCATION_GATE.strict()``


class ImageStoreError(Exception):
    """Base class: every message names the image id it is about."""

    def __init__(self, image_id: int, message: str):
        super().__init__(f"image {image_id}: {message}")
        self.image_id = image_id


class ImageNotFoundError(ImageStoreError, KeyError):
    """The id has no line in the store (out of range, or the line holds another id)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ImageDecodeError(ImageStoreError):
    """The line exists but its bytes are not a readable image (bad base64, empty, or not an image)."""


def _eight_bit_grey(im: Image.Image) -> Image.Image:
    """A 16/32-bit greyscale image as 8-bit ``L`` (``LA`` with its transparent value), keeping the top 8 of 16 bits.

    ``I;16`` says its depth; plain ``I`` (a 16-bit PGM, a 32-bit TIFF) does not, so there values above 255 are read
    as 16-bit and an image wholly within 0-255 is kept as it is: a guess, for modes real WebQA does not use.
    """
    a = np.asarray(im).astype(np.int64)
    shift = 8 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 0
    grey = Image.fromarray((np.clip(a, 0, 65535) >> shift).astype(np.uint8), "L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):  # the one 16-bit value that is transparent: the alpha from before the shift
        return Image.merge("LA", (grey, Image.fromarray(np.where(a == transparent, 0, 255).astype(np.uint8), "L")))
    return grey


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as a new RGB image, transparent pixels laid on white.

    A plain ``convert("RGB")`` drops the alpha channel and keeps the colour under it, which for transparent pixels is
    usually black: a logo or a cut-out on a transparent background would become a black square. 16-bit greyscale
    (a PNG's ``I;16``) is scaled to 8 bits first: ``convert`` would clip every value above 255 to white.
    """
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = _eight_bit_grey(im)
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")  # a palette (or single-colour) transparency becomes a real alpha channel
    elif im.mode == "La":  # premultiplied: PIL converts it to LA only
        im = im.convert("LA")
    elif im.mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        background.alpha_composite(im.convert("RGBA"))
        return background.convert("RGB")
    return im.convert("RGB")


# A truncated image is refused when less than MIN_DECODED_SHARE of its rows decoded, or less than
# MIN_DETAILED_SHARE and under MIN_DETAIL_ROWS of its rows show anything (a blank top margin is most of what decoded).
# That is the rule for any image (a distractor, a picture in the viewer); a GOLD image must show the evidence, so the
# Mini-WebQA builder asks for far more (MiniWebQAFilters.min_gold_decoded_share, 0.9): a counting question whose image
# lost its lower rows shows fewer objects than its answer says. The synthetic world's truncated images (60% of their
# bytes) decode 20-60% of their rows at the presets' sizes: as distractors most are kept, but a single small shape's
# at 56 px keeps only its blank top rows and is refused (28 of 700 sprites); as gold images all are refused.
MIN_DECODED_SHARE = 0.1
MIN_DETAILED_SHARE = 0.25
MIN_DETAIL_ROWS = 0.05


def decoded_share(im: Image.Image) -> float:
    """Share of ``im``'s rows above the uniform band at its bottom: what a truncated file decoded to, roughly.

    PIL fills the rows a truncated file lacks with one value (0 for PNG, grey for JPEG), so the rows below the cut are
    identical; an image whose own bottom is one flat colour reads a little short, which is why only truncated files
    are measured.
    """
    a = np.asarray(im)
    if a.ndim < 2 or a.shape[0] == 0:
        return 1.0
    same = (a == a[-1, 0]).reshape(a.shape[0], -1).all(axis=1)[::-1]
    flat = len(same) if same.all() else int(np.argmin(same))
    return 1.0 - flat / a.shape[0]


def _truncation_problem(im: Image.Image, share: float, min_share: float = MIN_DECODED_SHARE) -> str | None:
    """Why a tolerantly decoded (truncated) image, ``share`` of whose rows decoded, is too incomplete to keep, or
    None. ``min_share`` above ``MIN_DECODED_SHARE`` is a stricter caller's rule (a gold image)."""
    if share < max(min_share, MIN_DECODED_SHARE):
        needs = f" (at least {min_share:.0%} needed)" if min_share > MIN_DECODED_SHARE else ""
        return f"truncated: only about {share:.0%} of its rows decoded{needs}, the rest of the file is missing"
    if share < MIN_DETAILED_SHARE:
        a = np.asarray(im)
        top = a[: max(1, round(share * a.shape[0]))]
        detail = int((~(top == top[:, :1]).reshape(top.shape[0], -1).all(axis=1)).sum())  # rows not one flat colour
        if detail < MIN_DETAIL_ROWS * a.shape[0]:
            return (f"truncated: only about {share:.0%} of its rows decoded, nearly all of them blank ({detail} with "
                    "any detail), the rest of the file is missing")
    return None


def decode_image(data: bytes, image_id: int = -1,
                 min_decoded_share: float = MIN_DECODED_SHARE) -> tuple[Image.Image, float]:
    """``(RGB image, share of its rows that decoded)``: ``load_image_bytes`` that also says how much of a truncated
    file was there (1.0 for a whole file), so a caller can crop PIL's fill away (``decoded_rows``)."""
    if not data:
        raise ImageDecodeError(image_id, "empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            try:
                with TRUNCATION_GATE.strict():
                    im.load()
            except OSError:  # truncated: retry with PIL's tolerance (a process-wide flag: see _TruncationGate)
                with TRUNCATION_GATE.tolerant(), Image.open(io.BytesIO(data)) as im2:
                    im2.load()
                    share = decoded_share(im2)
                    problem = _truncation_problem(im2, share, min_decoded_share)  # the rest is PIL's fill, a blank
                    if problem:
                        raise ImageDecodeError(image_id, problem)
                    return to_rgb(im2), share
            return to_rgb(im), 1.0
    except ImageStoreError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # DecompressionBombError is a plain Exception: a corrupt header claiming giant dimensions must fail like any
        # other unreadable image (one bad image never aborts a build), not escape as a crash
        # (PIL names the in-memory file by its address: a message that differed from run to run)
        detail = "no image format PIL knows" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageDecodeError(image_id, f"bytes are not a readable image ({type(exc).__name__}: {detail})") from None


def decoded_rows(im: Image.Image, share: float) -> Image.Image:
    """``im`` cut to the rows that decoded (``share`` from ``decode_image``): PIL's fill below a truncated file's
    cut is a flat band, not picture, and must not be stored as if it were."""
    if share >= 1.0:
        return im
    return im.crop((0, 0, im.width, max(1, min(im.height, round(share * im.height)))))


def load_image_bytes(data: bytes, image_id: int = -1, min_decoded_share: float = MIN_DECODED_SHARE) -> Image.Image:
    """Decode encoded image bytes to an RGB ``PIL.Image`` (transparency on white), tolerating truncated files unless
    little of them decoded (``MIN_DECODED_SHARE``, ``MIN_DETAILED_SHARE``; ``min_decoded_share`` asks for more, as
    the Mini-WebQA gold-image check does); a clear error otherwise. A kept truncated file keeps its full size, PIL's
    fill included."""
    return decode_image(data, image_id, min_decoded_share)[0]


class ImageStoreFormatError(ValueError):
    """``imgs.lineidx`` is not a list of byte offsets, or it does not index this ``imgs.tsv``; names the file."""


def read_lineidx(path: str | Path) -> np.ndarray:
    """The byte offsets of ``imgs.lineidx`` as one int64 array (8 bytes per image, read in one pass).

    A line that is not a whole number >= 0 is an ``ImageStoreFormatError`` naming the file and the line.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        return np.zeros(0, dtype=np.int64)
    try:
        offsets = np.array(raw.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        offsets = None
    if offsets is not None and not (offsets < 0).any():
        return offsets
    for n, line in enumerate(raw.splitlines(), start=1):  # only on failure: find the line to name
        text = line.strip()
        if text and not (text.isdigit() and len(text) < 19):
            shown = text[:40].decode("utf-8", "replace")
            raise ImageStoreFormatError(f"{path} line {n}: {shown!r} is not a byte offset ({path.name} holds one "
                                        "whole number per line): a corrupt or wrong file? Take imgs.lineidx and "
                                        "imgs.tsv from the same WebQA download")
    raise ImageStoreFormatError(f"{path}: not a list of byte offsets, one whole number per line")


class ImageStore:
    """O(1) access to images by WebQA ``image_id``; use as a context manager (or call ``close``).

    >>> with ImageStore(folder) as store:           # doctest: +SKIP
    ...     store.get(30174997).size
    """

    def __init__(self, tsv: str | Path, lineidx: str | Path | None = None):
        tsv = Path(tsv)
        if tsv.is_dir():
            tsv = tsv / "imgs.tsv"
        lineidx = Path(lineidx) if lineidx else tsv.with_name("imgs.lineidx")
        for p in (tsv, lineidx):
            if not p.is_file():
                raise FileNotFoundError(f"image store file missing: {p}")
        self.tsv_path, self.lineidx_path = tsv, lineidx
        self.offsets = read_lineidx(lineidx)
        self.tsv_size = tsv.stat().st_size
        if not len(self.offsets) and self.tsv_size:  # every look-up would read as "no line": say why, once
            raise ImageStoreFormatError(
                f"{lineidx} is empty, but {tsv.name} holds {self.tsv_size:,} bytes: no image could be found. Was "
                f"{lineidx.name} cut or not extracted? Take imgs.lineidx and imgs.tsv from the same WebQA download")
        self._check_alignment()  # first: a lineidx of another copy also points past the end, and that is not the news
        past_end = int((self.offsets >= self.tsv_size).sum())
        if past_end:  # a 51 GB extraction onto a full drive: say so once, not as thousands of "missing" images
            warnings.warn(f"{tsv} ends at byte {self.tsv_size:,}, before the offsets of {past_end:,} of "
                          f"{len(self.offsets):,} images in {lineidx.name}: an incomplete copy or extraction? "
                          "Those images read as missing.", stacklevel=2)
        self._fh = None
        self._lock = threading.Lock()  # guards opening and closing the file (reads use os.pread: no shared position)

    PROBES = 8  # lines checked when a store is opened: a handful of seeks
    READ_CHUNK = 1 << 16  # first os.pread of a line whose length is not known (it doubles until the line ends)
    MAX_READ = 1 << 24  # most bytes one os.pread asks for (an index out of file order can put the next row far off)

    def _check_alignment(self) -> None:
        """Refuse a tsv that the lineidx does not index, before thousands of look-ups each fail as "holds id ...".

        Probes a few rows spread over the index: each offset must start a line (the byte before it is a newline) that
        begins with an image id and a tab, and that id must belong to the row (``id % 10_000_000 == row``, the
        look-up rule). Line endings converted to CRLF (a Windows copy, git's autocrlf) shift every later line, a
        lineidx from another copy points into the middle of lines, and one shifted by a line (or made for another
        tsv) points at whole lines of the wrong images. A minority of probes with another id is let through (a gap
        in the ids would look like that); a majority means nearly every look-up would fail.
        """
        rows = np.flatnonzero(self.offsets < self.tsv_size)
        if not len(rows):
            return
        picks = sorted({int(rows[i]) for i in np.linspace(0, len(rows) - 1, min(self.PROBES, len(rows))).astype(int)})
        wrong_ids: list[tuple[int, int]] = []  # (row, id its line holds)
        with open(self.tsv_path, "rb") as fh:
            first = fh.readline(1 << 24)
            for row in picks:
                offset = int(self.offsets[row])
                fh.seek(max(0, offset - 1))
                head = (b"\n" if offset == 0 else b"") + fh.read(24)
                key, tab, _ = head[1:].partition(b"\t")
                if head[:1] == b"\n" and tab and key.isdigit():
                    if int(key) % ID_MODULUS != row:
                        wrong_ids.append((row, int(key)))
                    continue
                crlf = (" Its lines end in CRLF (\\r\\n): were its line endings converted (a Windows copy, git "
                        "autocrlf)? Re-extract imgs.tsv unchanged." if first.endswith(b"\r\n") else "")
                raise ImageStoreFormatError(
                    f"{self.tsv_path} and {self.lineidx_path} do not match: row {row} of {self.lineidx_path.name} gives "
                    f"offset {offset:,}, which is not the start of an image line in {self.tsv_path.name} (it holds "
                    f"{head[1:17]!r} there). Both files must come from the same copy; a lineidx made for another copy, "
                    f"or a tsv changed after its lineidx was made, misplaces every image.{crlf}")
        if 2 * len(wrong_ids) > len(picks):
            row, key = wrong_ids[0]
            shifts = {k % ID_MODULUS - r for r, k in wrong_ids}
            by = shifts.pop() if len(shifts) == 1 else 0
            shift = (f" Each holds the image of the row {abs(by)} {'after' if by > 0 else 'before'} it: "
                     f"{self.lineidx_path.name} looks shifted by {abs(by)} line(s) (lines lost or added at its start)."
                     if by else "")
            raise ImageStoreFormatError(
                f"{self.tsv_path} and {self.lineidx_path} do not match: row {row} of {self.lineidx_path.name} points "
                f"at the line of image {key}, which belongs at row {key % ID_MODULUS} (an id's row is id % "
                f"{ID_MODULUS:_}); {len(wrong_ids)} of {len(picks)} probed rows hold another row's image, so nearly "
                f"every look-up would fail.{shift} The lineidx was likely made for another imgs.tsv: take both "
                "from the same WebQA download.")

    # -- lifecycle -------------------------------------------------------------------------------
    def _file(self):
        fh = self._fh
        if fh is not None:  # the usual case, without the lock (a fork while another thread held it would deadlock)
            return fh
        with self._lock:
            if self._fh is None:
                self._fh = open(self.tsv_path, "rb")  # noqa: SIM115 - held for the store's lifetime, closed by close()
            return self._fh

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> ImageStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # an open file handle (or a lock) cannot cross processes; reopen lazily
        state = dict(self.__dict__)
        state["_fh"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return len(self.offsets)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.tsv_path)!r}, {len(self)} images)"

    # -- access ----------------------------------------------------------------------------------
    def _read_line(self, row: int) -> bytes:
        """The line at row ``row``'s offset, newline included (none at the end of the file).

        ``os.pread`` reads at an offset without moving a file position, so threads, and processes forked after the
        file was opened (``DataLoader`` workers share the parent's open file and so its position), never read from
        where another one left off. The line's length is the distance to the next row's offset when that is larger.
        """
        offset = int(self.offsets[row])
        fh = self._file()
        if not hasattr(os, "pread"):  # pragma: no cover - Windows: no fork there, so a lock on the one position does
            with self._lock:
                fh.seek(offset)
                return fh.readline()
        nxt = int(self.offsets[row + 1]) if row + 1 < len(self.offsets) else self.tsv_size
        size = min(nxt - offset, self.MAX_READ) if nxt > offset else self.READ_CHUNK
        chunks, pos = [], offset
        while True:
            buf = os.pread(fh.fileno(), size, pos)
            end = buf.find(b"\n")
            if end >= 0:
                chunks.append(buf[: end + 1])
                break
            chunks.append(buf)
            if len(buf) < size:  # the end of the file
                break
            pos += len(buf)
            size = min(2 * size, self.MAX_READ)
        return b"".join(chunks)

    def _line(self, image_id: int) -> bytes:
        row = int(image_id) % ID_MODULUS
        if row >= len(self.offsets):
            raise ImageNotFoundError(image_id, f"no line in {self.lineidx_path.name} (row {row} >= {len(self.offsets)})")
        if self.offsets[row] >= self.tsv_size:
            raise ImageNotFoundError(image_id, f"{self.tsv_path.name} ends at byte {self.tsv_size:,}, before this image's "
                                               f"offset {int(self.offsets[row]):,} (an incomplete copy or extraction?)")
        line = self._read_line(row)
        if not line.endswith(b"\n") and row < len(self.offsets) - 1:  # only the last line may lack its newline
            raise ImageNotFoundError(image_id, f"its line is cut off where {self.tsv_path.name} ends, at byte "
                                               f"{self.tsv_size:,} (an incomplete copy or extraction?)")
        key, sep, payload = line.partition(b"\t")
        if not sep or key.strip() != str(int(image_id)).encode():
            raise ImageNotFoundError(
                image_id, f"the line at offset {int(self.offsets[row])} holds id {key[:20]!r}, not this one"
            )
        return payload.rstrip(b"\r\n")

    def get_bytes(self, image_id: int) -> bytes:
        """The encoded image bytes (PNG/JPEG as stored) of ``image_id``."""
        payload = self._line(image_id)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(image_id, f"invalid base64 ({exc})") from None
        if not data:
            raise ImageDecodeError(image_id, "empty image bytes")
        return data

    def get(self, image_id: int, min_decoded_share: float = MIN_DECODED_SHARE) -> Image.Image:
        """The image as RGB; ``ImageNotFoundError`` / ``ImageDecodeError`` name the id on failure. A truncated file
        with less than ``min_decoded_share`` of its rows decoded is an ``ImageDecodeError`` (``load_image_bytes``)."""
        return load_image_bytes(self.get_bytes(image_id), image_id, min_decoded_share)

    __getitem__ = get

    def __contains__(self, image_id: object) -> bool:
        try:
            self._line(int(image_id))  # type: ignore[arg-type]
            return True
        except (ImageNotFoundError, TypeError, ValueError):
            return False

    def check(self, image_id: int, min_side: int = 1, min_decoded_share: float = MIN_DECODED_SHARE) -> str | None:
        """None when the image decodes (a truncated one: at least ``min_decoded_share`` of its rows) and is at least
        ``min_side`` px on each side, else the reason."""
        try:
            im = self.get(image_id, min_decoded_share)
        except ImageStoreError as exc:
            return str(exc)
        if min(im.size) < min_side:
            return f"image {image_id}: too small ({im.size[0]}x{im.size[1]} < {min_side}px)"
        return None

    def ids(self) -> Iterator[int]:
        """Every image id in file order (reads the tsv sequentially; for tools, not for training loops)."""
        with open(self.tsv_path, "rb") as fh:
            for line in fh:
                key = line.partition(b"\t")[0]
                if key.strip():
                    yield int(key)
