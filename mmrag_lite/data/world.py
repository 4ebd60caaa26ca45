"""A synthetic world in WebQA's exact file layout, so the real reader and builder run on it unchanged.

Why: the real WebQA pixels are 51 GB and CPU CI has minutes. The world writes ``WebQA_train_val.json`` (Guid-keyed,
quote-wrapped ``Q``/``A``/``Keywords_A``, ``img_posFacts``/``img_negFacts``/``txt_posFacts``/``txt_negFacts``,
snippet ids ``<Guid>_<n>``), ``imgs.tsv`` (``id\\tbase64``) and ``imgs.lineidx`` (byte offsets), with image ids
``30000000 + i`` so that ``id % 10_000_000`` is the line number, as in the real store.

Images are flat scenes: 1-5 copies of one big shape (circle, square, triangle, star, diamond) in one saturated
colour on a plain light background, drawn once per (shape, colour, count, jitter variant) and reused, so 400k
images cost seconds. The jitter never lets two shapes touch, so a "how many" picture shows its count as blobs.
Every question names its gold image's (or snippet's) title, e.g. "the Quiet Garden of Lina"; distractors carry
other titles, and hard distractors show the same kind of scene with a different answer.
So relevance is learnable from text (title match) and the answer from pixels (or the caption).

Low-quality samples are planted on purpose (rates in ``WorldNoise``) so the Mini-WebQA filters have work: answers
that miss the fact, broken / empty / truncated images, duplicate and near-duplicate questions, questions without a
gold source, overlong candidates and a few malformed records. ``world_manifest.json`` lists what was planted and,
for each planted copy, the question it copies (ground truth for checking that a split keeps them together). Its
counts are per planting: a copy of a question with a planted fault carries that fault too but is counted once, as a
copy (a 2,000-question world plants 88 missed answers and holds 91 such records), so a funnel step may remove a
few more than the manifest planted.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..atomic import atomic_dir
from .images import ID_MODULUS

FIRST_IMAGE_ID = 30_000_000
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 200, 0),
    "orange": (255, 120, 0),
    "purple": (130, 30, 180),
    "black": (20, 20, 20),
}
BACKGROUND = (245, 245, 245)
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# Title words: never a colour, shape, yes/no or number word of the metric's vocabularies (metrics.COLOR_SET ...), or
# a reference answer that names its title would score below 1 against its own keyword ("The squares in the Golden
# ... are red": two colours). Same sizes as before the colour/shape words were swapped out, so the seeded draws match.
ADJECTIVES = (
    "Quiet", "Sunny", "Old", "Hidden", "Northern", "Distant", "Humble", "Misty", "Windy", "Royal", "Little", "Great",
    "Eastern", "Western", "Southern", "Ancient", "Bright", "Stony", "Crystal", "Sleepy", "Lonely", "Painted", "Twin",
    "Upper",
)
PLACES = (
    "Garden", "Harbor", "Museum", "Market", "Tower", "Valley", "Bridge", "Plaza", "Meadow", "Castle", "Library",
    "Lighthouse", "Orchard", "Chapel", "Station", "Theater", "Abbey", "Fountain", "Quarry", "Mill", "Pier", "Forest",
    "Lake", "Canyon", "Island", "Village", "Gallery", "Palace", "Temple", "Observatory", "Vineyard", "Academy",
)
NAMES = (
    "Lina", "Omar", "Kai", "Mira", "Tomas", "Ada", "Yusuf", "Elena", "Ravi", "Sofia", "Jonas", "Amara", "Leo", "Ines",
    "Hugo", "Nadia", "Felix", "Zara", "Ivan", "Maya", "Oskar", "Lucia", "Emil", "Chen", "Aiko", "Bruno", "Clara",
    "Dario", "Esme", "Farid", "Greta", "Hana", "Igor", "Juno", "Karim", "Lotte", "Marco", "Nina", "Otto", "Priya",
    "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wim", "Xenia", "Yara", "Zeno", "Alba", "Boris", "Cora", "Dev",
    "Elif", "Finn", "Gaia", "Hiro", "Ilse", "Jude", "Kofi", "Lea", "Milo", "Noor",
)
CITIES = (
    "Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Quebec", "Porto", "Vienna", "Dakar", "Hanoi", "Bergen", "Tunis",
    "Bruges", "Cusco", "Galway", "Malmo",
)
FILLER = (
    "The site has been described in many travel guides and local histories over the years. "
    "Visitors often mention the weather, the paths, the old signs and the small shops nearby. "
)
QCATE_WEIGHTS: dict[str, float] = {  # flatter than real WebQA (text ~50%, shape ~1.5%) so every category is seen
    "text": 0.25, "YesNo": 0.15, "Others": 0.12, "choose": 0.12, "number": 0.12, "color": 0.12, "shape": 0.12,
}


@dataclass(frozen=True)
class WorldNoise:
    """Rates of planted low-quality samples (per question unless noted); all zero gives a clean world."""

    no_gold: float = 0.02  # question keeps only distractors
    answer_misses: float = 0.04  # A[0] no longer states the keyword / fact
    broken_gold_image: float = 0.02  # a gold image's bytes are garbage or empty
    broken_distractor_image: float = 0.005  # per distractor image
    truncated_image: float = 0.01  # per image: bytes cut short but still readable with PIL's tolerance
    duplicate: float = 0.03  # a copy of an earlier question under a new Guid (same text up to case/spacing)
    near_duplicate: float = 0.03  # an earlier question reworded (same content words, same pool)
    overlong: float = 0.02  # one candidate gets a ~300-word caption / fact
    bad_record: float = 0.005  # record that breaks the schema (the reader reports it by Guid)


# ------------------------------------------------------------------------------------------- drawing
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return None


_LAYOUTS: dict[int, tuple[float, list[tuple[float, float]]]] = {  # radius (fraction of side), centres
    1: (0.34, [(0.5, 0.5)]),
    2: (0.21, [(0.27, 0.5), (0.73, 0.5)]),
    3: (0.19, [(0.27, 0.29), (0.73, 0.29), (0.5, 0.73)]),
    4: (0.18, [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]),
    5: (0.14, [(0.2, 0.2), (0.8, 0.2), (0.2, 0.8), (0.8, 0.8), (0.5, 0.5)]),
}


# Bump when a change to the drawing moves pixels: a world's manifest records it, and a run's world drawn by an
# older version is redrawn (``data.mini._world_matches``). 2: jittered shapes never touch.
DRAWING_VERSION = 2
_JITTER = 0.03  # largest shift of a shape's centre, as a fraction of the side
_PLACEMENT_TRIES = 20


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is not None:
        draw.polygon(poly, fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # square
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)


def _extent(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is not None:
        xs, ys = [x for x, _ in poly], [y for _, y in poly]
        return min(xs), min(ys), max(xs), max(ys)
    half = r if shape == "circle" else r * 0.85
    return cx - half, cy - half, cx + half, cy + half


def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255)
    return mask


def _apart(shape: str, centres: list[tuple[float, float]], r: float, size: int) -> bool:
    """No two shapes touch, diagonally included: at least one background pixel between any two of them, as drawn.
    Pairs whose boxes are clear of each other pass without drawing (at 800 px the masks cost 40 ms a scene)."""
    boxes = [_extent(shape, cx, cy, r) for cx, cy in centres]
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[i], boxes[j]
            if ax1 + 3 < bx0 or bx1 + 3 < ax0 or ay1 + 3 < by0 or by1 + 3 < ay0:  # 3 px: rounding + the 1 px gap
                continue
            grown = _mask(shape, *centres[i], r, size).filter(ImageFilter.MaxFilter(3))
            if ImageChops.multiply(grown, _mask(shape, *centres[j], r, size)).getbbox():
                return False
    return True


def _place(shape: str, color: str, count: int, size: int, variant: int) -> list[tuple[float, float]]:
    """Jittered centres in pixels, redrawn until no two shapes touch: a "how many" image must show ``count`` blobs.

    The first draw is kept whenever it is apart, so a scene that never touched is the same picture as before the
    check; after ``_PLACEMENT_TRIES`` touching draws (only at sizes far below the course's) the plain layout is used.
    """
    jit = random.Random(f"{shape}-{color}-{count}-{variant}")
    radius, layout = _LAYOUTS[count]
    for _ in range(_PLACEMENT_TRIES):
        centres = [((fx + jit.uniform(-_JITTER, _JITTER)) * size, (fy + jit.uniform(-_JITTER, _JITTER)) * size)
                   for fx, fy in layout]
        if _apart(shape, centres, radius * size, size):
            return centres
    return [(fx * size, fy * size) for fx, fy in layout]


def draw_scene(shape: str, color: str, count: int, size: int = 56, variant: int = 0) -> Image.Image:
    """``count`` big flat ``shape``s in ``color`` on a plain background; ``variant`` jitters positions slightly,
    never so far that two shapes touch."""
    if shape not in SHAPES or color not in COLORS or count not in _LAYOUTS:
        raise ValueError(f"unknown scene ({shape!r}, {color!r}, {count!r})")
    im = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    r = _LAYOUTS[count][0] * size
    for cx, cy in _place(shape, color, count, size, variant):
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    return im


def encode_image(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        im.save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class _SpriteCache:
    """Encoded + base64'd scenes, rendered once per (shape, colour, count, variant)."""

    def __init__(self, size: int, fmt: str, variants: int):
        self.size, self.fmt, self.variants = size, fmt, variants
        self._b64: dict[tuple, bytes] = {}
        self._raw: dict[tuple, bytes] = {}

    def raw(self, key: tuple) -> bytes:
        if key not in self._raw:
            self._raw[key] = encode_image(draw_scene(*key[:3], size=self.size, variant=key[3]), self.fmt)
        return self._raw[key]

    def b64(self, key: tuple) -> bytes:
        if key not in self._b64:
            self._b64[key] = base64.b64encode(self.raw(key))
        return self._b64[key]


# ------------------------------------------------------------------------------------------- content
@dataclass
class _Img:
    scene: tuple[str, str, int]
    title: str
    caption: str
    payload: str = "ok"  # ok | garbage | empty | truncated

    def fact(self, image_id: int) -> dict[str, Any]:
        slug = self.title.replace(" ", "_")
        return {
            "caption": self.caption,
            "image_id": image_id,
            "imgUrl": f"https://example.org/world/images/{slug}.png",
            "title": self.title,
            "url": f"https://example.org/world/wiki/File:{slug}.png",
        }


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else shape + "s"


class _Titles:
    """Unique "<Adjective> <Place> of <Name>" titles, in a seeded order (suffix "II", "III"... past 49k)."""

    def __init__(self, rng: random.Random):
        self.n = len(ADJECTIVES) * len(PLACES) * len(NAMES)
        self.order = list(range(self.n))
        rng.shuffle(self.order)
        self.next = 0
        self.rng = rng

    @staticmethod
    def compose(adj: str, place: str, name: str, rnd: int = 0) -> str:
        return f"{adj} {place} of {name}" + ("" if rnd == 0 else " " + "I" * (rnd + 1) if rnd < 3 else f" {rnd + 1}")

    def take(self) -> tuple[str, str, str, int]:
        i = self.order[self.next % self.n]
        rnd = self.next // self.n
        self.next += 1
        a, rest = divmod(i, len(PLACES) * len(NAMES))
        p, n = divmod(rest, len(NAMES))
        return ADJECTIVES[a], PLACES[p], NAMES[n], rnd


def _caption(rng: random.Random, title: str, scene: tuple[str, str, int]) -> str:
    shape, color, count = scene
    if rng.random() < 0.6:
        return f"{title}. {COUNT_WORDS[count].capitalize()} {color} {_plural(shape, count)} on a plain background."
    return f"A picture of the {title}."


def _other(rng: random.Random, options, exclude) -> Any:
    pool = [o for o in options if o != exclude]
    return rng.choice(pool)


def _related_title(rng: random.Random, adj: str, place: str, name: str, avoid: Collection[str] = ()) -> str:
    """A hard distractor's title: same place noun, other adjective and name (shares a word, not the title), never
    one of ``avoid`` (a second gold title; redrawn only on a clash, like ``_random_title``)."""
    while True:
        title = f"{_other(rng, ADJECTIVES, adj)} {place} of {_other(rng, NAMES, name)}"
        if title not in avoid:
            return title


def _random_title(rng: random.Random, avoid: Collection[str] = ()) -> str:
    """An easy distractor's title, never one of ``avoid`` (the gold titles: a distractor named like the question's
    subject would be a mislabelled negative). Redrawn only on a clash, so other worlds stay byte-identical."""
    while True:
        title = f"{rng.choice(ADJECTIVES)} {rng.choice(PLACES)} of {rng.choice(NAMES)}"
        if title not in avoid:
            return title


def _random_scene(rng: random.Random) -> tuple[str, str, int]:
    return rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 5)


def _scene_img(rng: random.Random, title: str, scene: tuple[str, str, int]) -> _Img:
    return _Img(scene, title, _caption(rng, title, scene))


def _text_fact_sentence(rng: random.Random, title: str) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"The {title} was founded in {rng.randint(1650, 1990)} by {rng.choice(NAMES)} {rng.choice(NAMES)}son."
    if kind == 1:
        return f"The {title} is located in {rng.choice(CITIES)}, close to the old river."
    if kind == 2:
        return f"The {title} has {rng.randint(2, 90)} rooms and a small courtyard."
    return f"The {title} is {rng.randint(12, 240)} metres tall and was restored in {rng.randint(1900, 2020)}."


def _question(rng: random.Random, qcate: str, titles: _Titles) -> dict[str, Any]:
    """One clean question: text, answer, keyword, gold items, hard image distractors (before noise)."""
    adj, place, name, rnd = titles.take()
    title = _Titles.compose(adj, place, name, rnd)
    shape, color, count = _random_scene(rng)
    gold_imgs: list[_Img] = []
    hard_imgs: list[_Img] = []
    gold_txt: list[tuple[str, str]] = []  # (title, fact)
    hard_txt: list[tuple[str, str]] = []
    variants: list[str] = []  # rewordings with the same content words (for planted near-duplicates)
    rel = lambda: _related_title(rng, adj, place, name, avoid={im.title for im in gold_imgs})  # after the golds
    keyword = ""

    if qcate == "color":
        q = f"What color are the {_plural(shape)} in the {title}?"
        variants = [f"In the {title}, what color are the {_plural(shape)}?"]
        a = f"The {_plural(shape, count)} in the {title} {'is' if count == 1 else 'are'} {color}."
        keyword = color
        gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), (shape, _other(rng, COLORS, color), count)) for _ in range(3)]
    elif qcate == "shape":
        q = f"What shape are the {color} objects in the {title}?"
        variants = [f"In the {title}, what shape are the {color} objects?"]
        a = f"The {color} objects in the {title} are {_plural(shape, count)}."
        keyword = shape
        gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), (_other(rng, SHAPES, shape), color, count)) for _ in range(3)]
    elif qcate == "number":
        if rng.random() < 0.25:  # two gold images: add the counts
            adj2, place2, name2, rnd2 = titles.take()
            title2 = _Titles.compose(adj2, place2, name2, rnd2)
            count2 = rng.randint(1, 5)
            q = f"How many {_plural(shape)} are there in the {title} and the {title2} together?"
            variants = [f"In the {title} and the {title2} together, how many {_plural(shape)} are there?"]
            a = f"There are {count + count2} {_plural(shape)} in the {title} and the {title2} together."
            keyword = str(count + count2)
            gold_imgs += [_scene_img(rng, title, (shape, color, count)), _scene_img(rng, title2, (shape, color, count2))]
        else:
            q = f"How many {_plural(shape)} are there in the {title}?"
            variants = [f"In the {title}, how many {_plural(shape)} are there?"]
            a = f"There {'is' if count == 1 else 'are'} {count} {_plural(shape, count)} in the {title}."
            keyword = str(count)
            gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), (shape, color, _other(rng, range(1, 6), count))) for _ in range(3)]
    elif qcate == "YesNo":
        asked = color if rng.random() < 0.5 else _other(rng, COLORS, color)
        yes = asked == color
        q = f"Are the {_plural(shape)} in the {title} {asked}?"
        variants = [f"In the {title}, are the {_plural(shape)} {asked}?"]
        a = f"Yes, the {_plural(shape)} in the {title} are {color}." if yes else (
            f"No, the {_plural(shape)} in the {title} are {color}, not {asked}.")
        keyword = "yes" if yes else "no"
        gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), (shape, asked if not yes else _other(rng, COLORS, color), count))
                      for _ in range(3)]
    elif qcate == "choose":
        if rng.random() < 0.5:  # two gold images: which has more
            adj2, place2, name2, rnd2 = titles.take()
            title2 = _Titles.compose(adj2, place2, name2, rnd2)
            count2 = _other(rng, range(1, 6), count)
            more, less = (title, title2) if count > count2 else (title2, title)
            q = f"Which has more {_plural(shape)}, the {title} or the {title2}?"
            variants = [f"The {title} or the {title2}: which has more {_plural(shape)}?"]
            a = f"The {more} has more {_plural(shape)} than the {less}."
            keyword = more
            gold_imgs += [_scene_img(rng, title, (shape, color, count)), _scene_img(rng, title2, (shape, color, count2))]
        else:
            c2 = _other(rng, COLORS, color)
            pair = [color, c2] if rng.random() < 0.5 else [c2, color]
            q = f"Are the {_plural(shape)} in the {title} {pair[0]} or {pair[1]}?"
            variants = [f"In the {title}, are the {_plural(shape)} {pair[0]} or {pair[1]}?"]
            a = f"The {_plural(shape, count)} in the {title} {'is' if count == 1 else 'are'} {color}."
            keyword = color
            gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), (shape, _other(rng, COLORS, color), count)) for _ in range(3)]
    elif qcate == "Others":
        q = f"What is shown in the picture of the {title}?"
        variants = [f"In the picture of the {title}, what is shown?"]
        a = f"The {title} shows {COUNT_WORDS[count]} {color} {_plural(shape, count)}."
        keyword = f"{COUNT_WORDS[count]} {color} {_plural(shape, count)}"
        gold_imgs.append(_scene_img(rng, title, (shape, color, count)))
        hard_imgs += [_scene_img(rng, rel(), _random_scene(rng)) for _ in range(3)]
    elif qcate == "text":
        year, founder, city = rng.randint(1650, 1990), f"{rng.choice(NAMES)} {rng.choice(NAMES)}son", rng.choice(CITIES)
        if rng.random() < 0.5:
            q = f"In which year was the {title} founded?"
            variants = [f"The {title} was founded in which year?"]
            a = f"The {title} was founded in {year}."
            gold_txt.append((title, f"The {title} was founded in {year} by {founder}."))
        else:
            q = f"Who founded the {title}, and in which city is it?"
            variants = [f"In which city is the {title}, and who founded it?"]
            a = f"The {title} was founded by {founder} and is located in {city}."
            gold_txt += [(title, f"The {title} was founded by {founder} in {year}."),
                         (title, f"The {title} is located in {city}, close to the old river.")]
        for _ in range(3):
            t = rel()
            hard_txt.append((t, f"The {t} was founded in {rng.randint(1650, 1990)} by {rng.choice(NAMES)} {rng.choice(NAMES)}son."))
    else:  # pragma: no cover - guarded by QCATE_WEIGHTS
        raise ValueError(qcate)
    return {
        "Q": q, "A": a, "keyword": keyword, "qcate": qcate, "topic": place.lower(), "variants": variants,
        "gold_imgs": gold_imgs, "hard_imgs": hard_imgs, "gold_txt": gold_txt, "hard_txt": hard_txt,
    }


# --------------------------------------------------------------------------------------------- writer
class _Writer:
    """Streams records to the JSON file and images to imgs.tsv / imgs.lineidx, assigning image ids in order."""

    def __init__(self, folder: Path, sprites: _SpriteCache, seed: int):
        # held open while streaming; closed when the ``with`` block ends
        self.json = open(folder / "WebQA_train_val.json", "w", encoding="utf-8")  # noqa: SIM115
        self.tsv = open(folder / "imgs.tsv", "wb")  # noqa: SIM115
        self.idx = open(folder / "imgs.lineidx", "w", encoding="ascii")  # noqa: SIM115
        self.sprites = sprites
        self.offset = 0
        self.n_images = 0
        self.n_records = 0
        self.garbage = random.Random(f"garbage-{seed}")
        self.json.write("{")

    def image(self, img: _Img) -> int:
        image_id = FIRST_IMAGE_ID + self.n_images
        if self.n_images >= ID_MODULUS:
            raise ValueError("more than 10,000,000 images cannot be indexed by id % 10_000_000")
        key = (*img.scene, self.n_images % self.sprites.variants)
        if img.payload == "ok":
            payload = self.sprites.b64(key)
        elif img.payload == "truncated":
            raw = self.sprites.raw(key)
            payload = base64.b64encode(raw[: max(60, int(len(raw) * 0.6))])
        elif img.payload == "empty":
            payload = b""
        else:  # garbage: valid base64 of bytes that are no image
            payload = base64.b64encode(bytes(self.garbage.getrandbits(8) for _ in range(64)))
        line = str(image_id).encode() + b"\t" + payload + b"\n"
        self.idx.write(f"{self.offset}\n")
        self.tsv.write(line)
        self.offset += len(line)
        self.n_images += 1
        return image_id

    def record(self, guid: str, record: Any) -> None:
        sep = "," if self.n_records else ""
        self.json.write(f"{sep}\n{json.dumps(guid)}: {json.dumps(record, ensure_ascii=False)}")
        self.n_records += 1

    def __enter__(self) -> _Writer:  # noqa: PYI034
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:  # complete the JSON object; on failure just let go of the files
            self.json.write("\n}\n")
        for fh in (self.json, self.tsv, self.idx):
            fh.close()


def _snippets(guid: str, facts: list[tuple[str, str]], start: int) -> list[dict[str, str]]:
    out = []
    for n, (title, fact) in enumerate(facts, start=start):
        out.append({"fact": fact, "snippet_id": f"{guid}_{n}", "title": title,
                    "url": f"https://example.org/world/wiki/{title.replace(' ', '_')}"})
    return out


def _guid(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _check_world_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` whose replacement would lose something that ``make_world`` did not write."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder: make_world writes a folder there; pass a "
                                 "folder path (new, empty, or holding a previous world)")
    names = sorted(p.name for p in out_dir.iterdir())
    if names and "world_manifest.json" not in names:
        raise FileExistsError(f"{out_dir} holds files that are not a synthetic world (no world_manifest.json; e.g. "
                              f"{names[0]!r}): make_world would delete them; pass a new or empty folder, or move "
                              "those files away first")
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")


# the shape of a question's pool: ~10 images per question on average (~390k at WebQA size), a few snippets
IMAGES_PER_QUESTION = (8, 12)  # gold + hard + easy distractor images, inclusive range
EASY_SNIPPETS_PER_QUESTION = (3, 6)  # random-title text distractors on top of the hard ones, inclusive range
OVERLONG_FILLER_REPEATS = 12  # the planted overlong caption / fact: FILLER this many times (~300 words)
DUPLICATE_SOURCE_WINDOW = 64  # a planted duplicate copies one of the last this-many clean questions
_MISSED_ANSWERS = ("It is hard to say from what is shown.", "Nobody seems to know for sure.",
                   "That is not mentioned anywhere.")


def _copy_record(qrng: random.Random, guid: str, split: str, duplicate: bool,
                 recent: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], str, str]:
    """A planted copy of an earlier question under a new Guid: ``(record, kind, original's Guid)``.

    A duplicate keeps the text up to case and spacing; a near-duplicate is reworded (same content words, same pool).
    """
    src_q, src_rec = recent[qrng.randrange(len(recent))]
    rec = json.loads(json.dumps(src_rec))
    rec["Guid"], rec["split"] = guid, split
    if duplicate:
        q = src_q["Q"]
        rec["Q"] = json.dumps(q.lower() if qrng.random() < 0.5 else "  " + q)
        kind = "duplicate"
    else:
        rec["Q"] = json.dumps(src_q["variants"][0])
        kind = "near_duplicate"
    for key in ("txt_posFacts", "txt_negFacts"):
        for snippet in rec[key]:
            snippet["snippet_id"] = guid + "_" + snippet["snippet_id"].rsplit("_", 1)[1]
    return rec, kind, src_rec["Guid"]


def _distractors(qrng: random.Random, qd: dict[str, Any]) -> tuple[list[_Img], list[tuple[str, str]]]:
    """The question's hard distractors (same scene type, other answer) topped up with easy ones (random scenes)."""
    n_img = qrng.randint(*IMAGES_PER_QUESTION)
    gold_titles = {im.title for im in qd["gold_imgs"]} | {title for title, _ in qd["gold_txt"]}
    imgs_neg = list(qd["hard_imgs"])
    while len(qd["gold_imgs"]) + len(imgs_neg) < n_img:
        imgs_neg.append(_scene_img(qrng, _random_title(qrng, gold_titles), _random_scene(qrng)))
    txt_neg = list(qd["hard_txt"])
    for _ in range(qrng.randint(*EASY_SNIPPETS_PER_QUESTION)):
        t = _random_title(qrng, gold_titles)
        txt_neg.append((t, _text_fact_sentence(qrng, t)))
    return imgs_neg, txt_neg


def _plant_pool_noise(qrng: random.Random, noise: WorldNoise, planted: dict[str, int], answer: str,
                      gold_imgs: list[_Img], gold_txt: list[Any], imgs_neg: list[_Img]
                      ) -> tuple[str, list[_Img], list[Any], list[_Img], bool]:
    """Low-quality samples for the cleaning to find: an answer that misses the fact, no gold, broken and truncated
    images, an overlong candidate (returned as a flag: it is planted once the facts exist). Counts in ``planted``."""
    if qrng.random() < noise.answer_misses:
        answer = qrng.choice(_MISSED_ANSWERS)
        planted["answer_misses"] += 1
    if qrng.random() < noise.no_gold:
        imgs_neg = imgs_neg[: max(1, len(imgs_neg) - 1)]
        gold_imgs, gold_txt = [], []
        planted["no_gold"] += 1
    if gold_imgs and qrng.random() < noise.broken_gold_image:
        gold_imgs[0].payload = qrng.choice(["garbage", "empty"])
        planted["broken_gold_image"] += 1
    for im in imgs_neg:
        if qrng.random() < noise.broken_distractor_image:
            im.payload = "garbage"
            planted["broken_distractor_image"] += 1
    for im in gold_imgs + imgs_neg:
        if im.payload == "ok" and qrng.random() < noise.truncated_image:
            im.payload = "truncated"
            planted["truncated_image"] += 1
    overlong = qrng.random() < noise.overlong
    if overlong:
        planted["overlong"] += 1
    return answer, gold_imgs, gold_txt, imgs_neg, overlong


def _make_overlong(qrng: random.Random, img_neg: list[dict], txt_pos: list[dict], txt_neg: list[dict]) -> None:
    """Append ~300 words of filler to one candidate's caption or fact."""
    target = qrng.choice([txt_neg, img_neg, txt_pos or txt_neg])
    item = target[qrng.randrange(len(target))]
    long_text = (FILLER * OVERLONG_FILLER_REPEATS).strip()
    if "fact" in item:
        item["fact"] = item["fact"] + " " + long_text
    else:
        item["caption"] = item["caption"] + " " + long_text


def _break_record(qrng: random.Random, record: dict[str, Any]) -> None:
    """Break the schema in one of three ways the reader must report by Guid (missing Q, bad image id, bad facts)."""
    broken = qrng.randrange(3)
    if broken == 0:
        del record["Q"]
    elif broken == 1 and record["img_negFacts"]:
        record["img_negFacts"][0]["image_id"] = "not-an-id"
    else:
        record["txt_negFacts"] = "oops"


def _new_record(qrng: random.Random, guid: str, split: str, titles: _Titles, writer: _Writer, noise: WorldNoise,
                planted: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh question of a random category with its pool and planted noise: ``(question dict, WebQA record)``."""
    qcates, weights = zip(*QCATE_WEIGHTS.items())
    qcate = qrng.choices(qcates, weights)[0]
    qd = _question(qrng, qcate, titles)
    imgs_neg, txt_neg = _distractors(qrng, qd)
    answer, gold_imgs, gold_txt, imgs_neg, overlong = _plant_pool_noise(
        qrng, noise, planted, qd["A"], list(qd["gold_imgs"]), list(qd["gold_txt"]), imgs_neg)
    img_pos = [im.fact(writer.image(im)) for im in gold_imgs]
    img_neg = [im.fact(writer.image(im)) for im in imgs_neg]
    txt_pos = _snippets(guid, gold_txt, 0)
    txt_neg = _snippets(guid, txt_neg, len(gold_txt))
    if overlong:
        _make_overlong(qrng, img_neg, txt_pos, txt_neg)
    record: dict[str, Any] = {
        "Guid": guid,
        "Q": json.dumps(qd["Q"]),  # json.dumps adds the literal quotes WebQA wraps around Q and A
        "A": [json.dumps(answer)],
        "Qcate": qcate,
        "topic": qd["topic"],
        "split": split,
        "img_posFacts": img_pos,
        "img_negFacts": img_neg,
        "txt_posFacts": txt_pos,
        "txt_negFacts": txt_neg,
    }
    if qd["keyword"]:  # image questions carry the official keyword answer; text questions have none
        record["Keywords_A"] = json.dumps(qd["keyword"])
    return qd, record


def make_world(
    out_dir: str | Path,
    n_questions: int = 400,
    seed: int = 0,
    image_size: int = 56,
    noise: WorldNoise | None = None,
    image_format: str = "PNG",
    variants: int = 4,
    val_fraction: float = 0.12,
    overwrite: bool = True,
    progress: bool = True,
) -> Path:
    """Write a WebQA-format world (``WebQA_train_val.json``, ``imgs.tsv``, ``imgs.lineidx``) into ``out_dir``.

    Written into a temporary folder next to ``out_dir`` and renamed when complete. Deterministic by ``seed``: each
    question draws from its own ``Random(f"{seed}:{i}")``. ``n_questions`` counts the records in the file (planted
    duplicates and malformed records included). ``overwrite`` replaces only an empty folder or a previous world (one
    with ``world_manifest.json``): any other folder (a real WebQA download, say) or a file at ``out_dir`` is refused,
    never deleted.
    """
    from tqdm.auto import tqdm

    noise = noise or WorldNoise()
    out_dir = Path(out_dir)
    _check_world_target(out_dir, overwrite)
    titles = _Titles(random.Random(seed + 1))
    sprites = _SpriteCache(image_size, image_format, variants)
    planted: dict[str, int] = {k: 0 for k in asdict(noise)}
    planted["truncated_image"] = 0
    recent: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (question dict, record) for planting duplicates
    copies: dict[str, dict[str, str]] = {}  # planted copy's Guid -> {"of": original's Guid, "kind": ...}: ground truth
    with atomic_dir(out_dir) as tmp, _Writer(tmp, sprites, seed) as writer:
        for i in tqdm(range(n_questions), desc="world", disable=not progress, mininterval=1.0):
            qrng = random.Random(f"{seed}:{i}")
            guid = _guid(qrng)
            split = "val" if qrng.random() < val_fraction else "train"
            roll = qrng.random()
            if recent and roll < noise.duplicate + noise.near_duplicate:
                record, kind, original = _copy_record(qrng, guid, split, roll < noise.duplicate, recent)
                planted[kind] += 1
                copies[guid] = {"of": original, "kind": kind}
            else:
                qd, record = _new_record(qrng, guid, split, titles, writer, noise, planted)
                if qrng.random() < noise.bad_record:
                    _break_record(qrng, record)
                    planted["bad_record"] += 1
                else:
                    recent.append((qd, record))
                    if len(recent) > DUPLICATE_SOURCE_WINDOW:
                        recent.pop(0)
            writer.record(guid, record)
        manifest = {
            "format": "WebQA_train_val.json + imgs.tsv + imgs.lineidx (synthetic world)",
            "seed": seed, "n_questions": n_questions, "image_size": image_size, "image_format": image_format,
            "drawing": DRAWING_VERSION, "n_images": writer.n_images, "noise": asdict(noise), "planted": planted, "copies": copies,
        }
        (tmp / "world_manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def read_world_manifest(world_dir: str | Path) -> dict[str, Any] | None:
    """What ``make_world`` recorded about a world (None for a real WebQA folder)."""
    path = Path(world_dir) / "world_manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None
