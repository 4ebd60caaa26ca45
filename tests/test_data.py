"""Tests for mmrag_lite.data: readers, image store, synthetic world, Mini-WebQA filters and builder."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag_lite import data as D
from mmrag_lite.data import (
    FunnelReport,
    ImageDecodeError,
    ImageNotFoundError,
    ImageStore,
    MiniWebQAFilters,
    WebQAFormatError,
    mini,
)

NO_IMAGES = MiniWebQAFilters(check_images=False)


# ------------------------------------------------------------------------------------------- helpers
def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _png(color=(200, 10, 10), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=32) -> bytes:
    """A noisy JPEG: most of its bytes are scan data, so cutting it leaves the headers whole (like real ones)."""
    import random

    rng = random.Random(0)
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))).save(buf, "JPEG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height``: a corrupt header that PIL refuses as a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR data starts at byte 16
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # its CRC covers the chunk type and data
    return bytes(png)


def write_store(folder: Path, payloads: dict[int, bytes | str]) -> Path:
    """imgs.tsv + imgs.lineidx with the given lines (bytes are base64'd; str payloads are written raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets, offset = [], 0
    with open(folder / "imgs.tsv", "wb") as tsv:
        for image_id, payload in payloads.items():
            raw = payload.encode() if isinstance(payload, str) else base64.b64encode(payload)
            line = f"{image_id}\t".encode() + raw + b"\n"
            offsets.append(offset)
            tsv.write(line)
            offset += len(line)
    (folder / "imgs.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    return folder


def raw_record(guid="g1", q=None, a="The ball is red.", kw="red", qcate="color",
               img_pos=((30000000, "Ball of Lina", "A red ball."),), img_neg=((30000001, "Box of Omar", "A box."),),
               txt_pos=(), txt_neg=(("A fact about boxes.", "Boxes"),)) -> dict:
    q = q if q is not None else f"What color is the ball {guid}?"  # distinct by default: no duplicate filter hits
    rec = {
        "Guid": guid, "Q": json.dumps(q), "A": [json.dumps(a)], "Qcate": qcate, "topic": "ball", "split": "train",
        "img_posFacts": [{"image_id": i, "title": t, "caption": c, "url": "", "imgUrl": ""} for i, t, c in img_pos],
        "img_negFacts": [{"image_id": i, "title": t, "caption": c, "url": "", "imgUrl": ""} for i, t, c in img_neg],
        "txt_posFacts": [{"fact": f, "title": t, "snippet_id": f"{guid}_{n}", "url": ""} for n, (f, t) in enumerate(txt_pos)],
        "txt_negFacts": [{"fact": f, "title": t, "snippet_id": f"{guid}_{n + 10}", "url": ""}
                         for n, (f, t) in enumerate(txt_neg)],
    }
    if kw is not None:
        rec["Keywords_A"] = json.dumps(kw)
    return rec


def record(**kw) -> D.WebQARecord:
    raw = raw_record(**kw)
    return D.parse_record(raw["Guid"], raw)


def questions(n: int) -> dict:
    """``n`` raw records g1..gn with a gold image each (questions sharing a gold image are split together)."""
    return {f"g{i}": raw_record(guid=f"g{i}", img_pos=((30000000 + i, "Ball", "A red ball."),)) for i in range(1, n + 1)}


def write_webqa(folder: Path, records: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "WebQA_train_val.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return D.make_world(tmp_path_factory.mktemp("w") / "world", n_questions=400, seed=0, progress=False)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "mini_webqa"
    dd, report = D.build_mini_webqa(world, out, settings="cpu-tiny", progress=False)
    return out, dd, report


# ----------------------------------------------------------------------------------------- WebQA reader
def test_reads_the_real_shared_record(shared_data):
    path = next((shared_data / "webqa-val").glob("train_record_*.json"))
    result = D.read_webqa(path, strict=True)
    assert not result.errors and len(result) == 1
    r = result.records[0]
    assert r.guid == "d5c5bcf60dba11ecb1e81171463288e9"
    assert r.question == "What color is the belly of a Green Tree Frog?"  # literal quotes stripped
    assert r.answers == ("The belly of a Green Tree Frog is white.",)
    assert r.keywords == "white" and r.qcate == "color" and r.topic == "frog" and r.split == "train"
    assert (len(r.img_pos), len(r.img_neg), len(r.txt_pos), len(r.txt_neg)) == (1, 16, 0, 16)
    assert r.img_pos[0].image_id == 30240126 and isinstance(r.img_pos[0].image_id, int)
    assert r.gold_ids == ["30240126"]
    assert all(f.snippet_id.startswith(r.guid + "_") for f in r.txt_neg)
    assert D.answer_mentions_keyword(r)


def test_reads_the_test_layout_with_merged_facts(tmp_path):
    raw = raw_record(guid="t1")
    raw["img_Facts"] = raw.pop("img_posFacts") + raw.pop("img_negFacts")
    raw["txt_Facts"] = raw.pop("txt_negFacts")
    del raw["txt_posFacts"], raw["A"], raw["Keywords_A"]
    r = D.parse_record("t1", raw)
    assert not r.is_labelled and len(r.img_facts) == 2 and len(r.txt_facts) == 1 and r.answers == ()
    assert r.gold_ids == []


def test_one_bad_record_never_loses_the_others(tmp_path):
    bad = raw_record(guid="bad1")
    bad["img_negFacts"][0]["image_id"] = "not-an-id"
    superscript = raw_record(guid="bad3")
    superscript["img_negFacts"][0]["image_id"] = "\u00b2"  # "²": str.isdigit() says yes, int() says no
    recs = {"g1": raw_record(guid="g1"), "bad1": bad, "g2": raw_record(guid="g2"), "bad2": {"Q": 3},
            "bad3": superscript}
    path = write_webqa(tmp_path, recs) / "WebQA_train_val.json"
    result = D.read_webqa(path)
    assert [r.guid for r in result] == ["g1", "g2"]
    assert [e.guid for e in result.errors] == ["bad1", "bad2", "bad3"]
    assert "image_id" in result.errors[0].message
    with pytest.raises(WebQAFormatError, match="bad1") as exc:
        D.read_webqa(path, strict=True)
    assert exc.value.guid == "bad1"


def test_streaming_reader_matches_json_load_with_tiny_chunks(world):
    path = world / "WebQA_train_val.json"
    streamed = dict(D.iter_raw_records(path, chunk_chars=97))
    assert streamed == json.loads(path.read_text())


def test_streaming_reader_reads_records_cut_at_any_chunk_edge(tmp_path):
    """Every chunk size from 2 to 63 characters: a record cut anywhere (inside a bare ``image_id`` number, a string,
    between keys) reads the same as ``json.load``."""
    path = write_webqa(tmp_path, {"g1": raw_record(guid="g1"), "g2": raw_record(guid="g2", q="Another one?")})
    whole = json.loads(path.joinpath("WebQA_train_val.json").read_text())
    for chunk in range(2, 64):
        assert dict(D.iter_raw_records(path / "WebQA_train_val.json", chunk_chars=chunk)) == whole, chunk


def test_broken_json_file_is_a_clear_error(tmp_path):
    path = tmp_path / "WebQA_train_val.json"
    path.write_text('{"g1": {"Q": "\\"x\\""}, "g2": {"Q": ')
    with pytest.raises(WebQAFormatError, match="WebQA_train_val.json"):
        list(D.iter_raw_records(path))
    path.write_text("[1, 2]")
    with pytest.raises(WebQAFormatError, match="keyed by Guid"):
        list(D.iter_raw_records(path))


def test_cut_or_broken_file_keeps_the_records_before_the_break(tmp_path):
    records = {f"g{i}": raw_record(guid=f"g{i}") for i in range(30)}
    text = json.dumps(records)
    path = tmp_path / "WebQA_train_val.json"
    path.write_text(text[: int(len(text) * 0.9)])  # a download cut at 90 %
    with pytest.warns(UserWarning, match="keeping the records before it"):
        result = D.read_webqa(path)
    assert 20 <= len(result.records) < 30 and result.records[0].guid == "g0"
    assert result.errors[-1].guid == f"<file after {result.records[-1].guid}>"
    with pytest.raises(WebQAFormatError):
        D.read_webqa(path, strict=True)
    # a syntax error is reported at its character in the file, inside the record it breaks
    at = text.index('"g25"') + len('"g25": {"Guid"')
    path.write_text(text[:at] + "::" + text[at:])
    with pytest.raises(WebQAFormatError, match=r"record 'g25'") as err:
        list(D.iter_raw_records(path, chunk_chars=512, max_record_chars=4096))
    with pytest.raises(json.JSONDecodeError) as whole:  # the position json.loads gives for the whole file
        json.loads(path.read_text())
    assert f"character {whole.value.pos} " in str(err.value)


def test_cut_file_warning_points_at_the_callers_line(tmp_path):
    """The reader warns from inside a generator: the warning must name the line that called the reader (here),
    not tqdm's loop or the builder, and say how many records it keeps."""
    text = json.dumps({f"g{i}": raw_record(guid=f"g{i}") for i in range(30)})
    path = tmp_path / "WebQA_train_val.json"
    path.write_text(text[: int(len(text) * 0.9)])
    for read in (lambda: D.read_webqa(path), lambda: list(D.iter_webqa(path)),
                 lambda: D.build_mini_webqa(tmp_path, None, filters=NO_IMAGES, progress=True)):
        with pytest.warns(UserWarning, match="keeping the records before it") as caught:
            read()
        assert [Path(w.filename).name for w in caught] == [Path(__file__).name]  # not tqdm/std.py
        assert re.search(r"before it \(2\d\), the rest of the file is not read", str(caught[0].message))


def test_file_broken_before_its_first_record_is_an_error_not_an_empty_read(tmp_path):
    path = tmp_path / "WebQA_train_val.json"
    for text in ("[1, 2]", "", json.dumps({"g0": raw_record(guid="g0")})[:200]):
        path.write_text(text)
        with pytest.raises(WebQAFormatError, match="WebQA_train_val.json"):
            D.read_webqa(path)  # not strict: still nothing to keep, so no "keeping ..." warning and an empty list


# ------------------------------------------------------------------------------------------ image store
def test_image_store_offsets_and_random_access(tmp_path):
    ids = {30000000 + i: _png((i * 40, 0, 0), 8 + i) for i in range(5)}
    folder = write_store(tmp_path, ids)
    with ImageStore(folder) as store:
        assert len(store) == 5 and store.offsets.dtype.name == "int64"
        for image_id in [30000004, 30000001, 30000003]:  # out of order: seeks, never scans
            im = store.get(image_id)
            assert im.mode == "RGB" and im.size == (8 + image_id % 10, 8 + image_id % 10)
        assert 30000002 in store and 30000009 not in store and 30000005 not in store  # one past the last row
        with pytest.raises(D.ImageNotFoundError, match="30000005"):
            store.get(30000005)
        assert store.get_bytes(30000000) == ids[30000000]
    assert store._fh is None  # closed by the context manager


def test_image_store_errors_name_the_id(tmp_path):
    good = _jpeg(48)
    folder = write_store(tmp_path, {
        30000000: good,
        30000001: good[: len(good) * 2 // 3],  # truncated: still readable
        30000002: b"\x00\x01 not an image at all",
        30000003: "!!!not base64!!!",
        30000004: b"",
        30000005: _png_claiming(20_000, 20_000),  # PIL raises DecompressionBombError, a plain Exception
    })
    with ImageStore(folder / "imgs.tsv", folder / "imgs.lineidx") as store:
        assert store.get(30000001).size == (48, 48)
        with pytest.raises(ImageDecodeError, match="30000002"):
            store.get(30000002)
        with pytest.raises(ImageDecodeError, match="30000003"):
            store.get(30000003)
        with pytest.raises(ImageDecodeError, match="30000004.*empty"):
            store.get(30000004)
        with pytest.raises(ImageDecodeError, match="30000005.*DecompressionBomb"):
            store.get(30000005)
        assert "30000005" in store.check(30000005)
        with pytest.raises(ImageNotFoundError, match="30000099"):  # past the end of lineidx
            store.get(30000099)
        with pytest.raises(ImageNotFoundError, match="40000001"):  # row 1 exists but holds another id
            store.get(40000001)
        assert store.check(30000000) is None and "30000002" in store.check(30000002)
        assert "too small" in store.check(30000000, min_side=100)


def test_a_cut_imgs_tsv_is_named_as_incomplete_once_not_as_missing_images(tmp_path):
    """A 51 GB extraction onto a full drive leaves imgs.tsv short of imgs.lineidx's offsets: the store says so when
    opened, and each image past the cut says where the file ends instead of "holds id b''"."""
    folder = write_store(tmp_path, {30000000 + i: _jpeg(16) for i in range(4)})
    offsets = [int(x) for x in (folder / "imgs.lineidx").read_text().split()]
    tsv = folder / "imgs.tsv"
    tsv.write_bytes(tsv.read_bytes()[: offsets[2] + 10])  # the last line lost, the one before it cut mid-way
    with pytest.warns(UserWarning, match="before the offsets of 1 of 4 images.*incomplete"):
        store = ImageStore(tsv)
    with store:
        assert store.get(30000001).size == (16, 16)
        with pytest.raises(ImageNotFoundError, match="30000002: its line is cut off where imgs.tsv ends.*incomplete"):
            store.get(30000002)
        with pytest.raises(ImageNotFoundError, match="30000003: imgs.tsv ends at byte .*incomplete"):
            store.get(30000003)
        assert 30000003 not in store and "ends at byte" in store.check(30000003)


def test_missing_store_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="imgs"):
        ImageStore(tmp_path)


# --------------------------------------------------------------------------------------- synthetic world
def test_world_has_the_real_layout(world, shared_data):
    real = json.loads(next((shared_data / "webqa-val").glob("train_record_*.json")).read_text())
    real_rec = next(iter(real.values()))
    synth = json.loads((world / "WebQA_train_val.json").read_text())
    image_q = next(r for r in synth.values() if r.get("Qcate") == "color" and r.get("img_posFacts") and "Q" in r)
    assert set(image_q) == set(real_rec)
    for key, value in real_rec.items():
        assert type(image_q[key]) is type(value), key
    for kind in ("img_negFacts", "txt_negFacts"):
        real_keys = set(real_rec[kind][0]) - {"old_image_id"}  # old_image_id is not in the public release
        assert set(image_q[kind][0]) == real_keys
        for key in real_keys:
            assert type(image_q[kind][0][key]) is type(real_rec[kind][0][key]), (kind, key)
    for rec in (real_rec, image_q):
        assert rec["Q"].startswith('"') and rec["Q"].endswith('"') and rec["A"][0].startswith('"')
        assert rec["Keywords_A"].startswith('"')
    assert all(s["snippet_id"].startswith(image_q["Guid"] + "_") for s in image_q["txt_negFacts"])


def test_world_image_ids_index_lineidx(world):
    offsets = D.read_lineidx(world / "imgs.lineidx")
    recs = D.read_webqa(world / "WebQA_train_val.json").records
    with open(world / "imgs.tsv", "rb") as fh:
        for fact in [f for r in recs[:20] for f in r.img_pos + r.img_neg]:
            fh.seek(int(offsets[fact.image_id % 10_000_000]))
            assert fh.readline().split(b"\t")[0] == str(fact.image_id).encode()


def test_world_is_deterministic_and_covers_every_category(world, tmp_path):
    again = D.make_world(tmp_path / "again", n_questions=400, seed=0, progress=False)
    other = D.make_world(tmp_path / "other", n_questions=400, seed=1, progress=False)
    for name in ("WebQA_train_val.json", "imgs.tsv", "imgs.lineidx"):
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    assert (world / "WebQA_train_val.json").read_bytes() != (other / "WebQA_train_val.json").read_bytes()
    result = D.read_webqa(world / "WebQA_train_val.json")
    assert {r.qcate for r in result} == set(D.QCATES)
    planted = D.read_world_manifest(world)["planted"]
    assert all(planted[k] > 0 for k in ("no_gold", "answer_misses", "broken_gold_image", "duplicate",
                                        "near_duplicate", "overlong", "bad_record", "truncated_image"))
    assert len(result.errors) == planted["bad_record"]
    clean = [r for r in result if r.img_pos or r.txt_pos]
    assert all(any(f.title.lower() in r.question.lower() for f, g in r.facts() if g) for r in clean)  # gold titles are named


def test_no_distractor_is_named_like_a_gold_source(world):
    """A distractor titled like the question's subject would be a mislabelled negative for stage 1's judge."""
    import random

    from mmrag_lite.data import world as W

    for r in D.read_webqa(world / "WebQA_train_val.json"):
        gold = {f.title for f, g in r.facts() if g}
        assert not [f.title for f, g in r.facts() if not g and f.title in gold], r.guid
    # the rare clash (about 1 in 10k questions, too rare for a 400-question world) is redrawn: avoid all but one
    rng = random.Random(0)
    every = {f"{a} {p} of {n}" for a in W.ADJECTIVES for p in W.PLACES for n in W.NAMES}
    keep = f"{W.ADJECTIVES[0]} {W.PLACES[0]} of {W.NAMES[0]}"
    assert W._random_title(rng, every - {keep}) == keep
    related = f"{W.ADJECTIVES[1]} {W.PLACES[0]} of {W.NAMES[1]}"
    assert W._related_title(rng, W.ADJECTIVES[0], W.PLACES[0], W.NAMES[0], every - {related}) == related


def test_world_images_show_the_answer(world):
    recs = [r for r in D.read_webqa(world / "WebQA_train_val.json") if r.qcate == "color" and r.img_pos]
    checked = 0
    with ImageStore(world) as store:
        for r in recs[:10]:
            if not D.answer_mentions_keyword(r) or store.check(r.img_pos[0].image_id):
                continue
            colours = {c for _, c in store.get(r.img_pos[0].image_id).getcolors(maxcolors=4096)}
            assert D.COLORS[r.keywords] in colours
            checked += 1
    assert checked >= 5  # the planted noise skipped at most half: the property was really checked


def test_world_write_is_atomic(tmp_path, monkeypatch):
    from mmrag_lite.data import world as W

    target = D.make_world(tmp_path / "world", n_questions=20, progress=False)
    before = (target / "WebQA_train_val.json").read_bytes()
    monkeypatch.setattr(W, "_question", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        D.make_world(target, n_questions=20, seed=5, progress=False)
    assert (target / "WebQA_train_val.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_make_world_replaces_only_an_empty_folder_or_a_world(tmp_path):
    """A folder with the student's own files (a real WebQA download, say) or a file is refused, never deleted."""
    mine = tmp_path / "webqa"
    mine.mkdir()
    (mine / "WebQA_train_val.json").write_text("the real download")
    with pytest.raises(FileExistsError, match=f"{mine}.*not a synthetic world"):
        D.make_world(mine, n_questions=5, progress=False)
    assert _names(mine) == ["WebQA_train_val.json"] and (mine / "WebQA_train_val.json").read_text() == "the real download"
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"{notes} is a file"):
        D.make_world(notes, n_questions=5, progress=False)
    assert notes.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    first = (D.make_world(empty, n_questions=5, progress=False) / "WebQA_train_val.json").read_bytes()
    again = D.make_world(empty, n_questions=5, seed=1, progress=False)  # a previous world is replaced
    assert (again / "WebQA_train_val.json").read_bytes() != first
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.make_world(empty, n_questions=5, overwrite=False, progress=False)
    assert _names(tmp_path) == ["empty", "notes.txt", "webqa"]  # no temporary or old-copy litter


# ---------------------------------------------------------------------------------------------- filters
def _run(records, **filters):
    report = FunnelReport("test")
    kept = D.filter_records(records, MiniWebQAFilters(check_images=False, max_qcate_fraction=None,
                                                      **filters), report=report)
    return [r.guid for r in kept], {s.name: s.removed for s in report.steps}


def test_filter_no_gold_source():
    kept, removed = _run([record(guid="a"), record(guid="b", img_pos=())])
    assert kept == ["a"] and removed["no_gold_source"] == 1
    assert _run([record(guid="b", img_pos=())], require_gold=False)[0] == ["b"]


def test_filter_answer_misses_keyword():
    recs = [
        record(guid="ok"),
        record(guid="miss", a="Hard to say."),
        record(guid="yn_ok", qcate="YesNo", kw=None, a="Yes, it is."),  # no Keywords_A: closed vocabulary
        record(guid="yn_miss", qcate="YesNo", kw=None, a="Maybe."),
        record(guid="txt_ok", qcate="text", kw=None, q="When was the Mill of Ada built?", a="It was built in 1850.",
               img_pos=(), txt_pos=(("The Mill of Ada was built in 1850.", "Mill of Ada"),)),
        record(guid="txt_miss", qcate="text", kw=None, q="When was the Mill of Ada built?", a="Nobody knows.",
               img_pos=(), txt_pos=(("The Mill of Ada was built in 1850.", "Mill of Ada"),)),
        record(guid="num_ok", qcate="number", kw=None, a="There are three balls."),  # number words count
    ]
    kept, removed = _run(recs)
    assert kept == ["ok", "yn_ok", "txt_ok", "num_ok"] and removed["answer_misses_keyword"] == 3


def test_filter_accepts_how_real_webqa_answers_are_written():
    """WebQA answers are sentences: a yes/no answer restates the question, a shape answer says "rectangular" for the
    keyword "Rectangle", a count says "twice" or "no benches", a text answer picks one of the question's options."""
    pick = (("Lake Ida lies south of Lake Omar.", "Lake Ida"),)
    recs = [
        record(guid="yn_sentence", qcate="YesNo", kw="yes", q="Does the Mill of Ada have a red roof?",
               a="The Mill of Ada has a red roof."),
        record(guid="yn_negated", qcate="YesNo", kw="no", q="Does the Mill of Ada have a red roof?",
               a="The Mill of Ada does not have a red roof."),
        record(guid="yn_refusal", qcate="YesNo", kw="yes", q="Does the Mill of Ada have a red roof?",
               a="It is hard to say from what is shown."),
        record(guid="shape_form", qcate="shape", kw="Rectangle", q="What shape are the windows of the Mill?",
               a="The windows of the Mill are rectangular."),
        record(guid="shape_sentence", qcate="shape", kw=None, q="What shape is the beak of the Ada finch?",
               a="The beak of the Ada finch is curved."),
        record(guid="count_twice", qcate="number", kw="Two", q="How many times does the ring appear on the shirt?",
               a="The ring appears twice on the shirt."),
        record(guid="count_none", qcate="number", kw="None", q="How many benches are on the terrace?",
               a="There are no benches on the terrace."),
        record(guid="count_wrong", qcate="number", kw="Two", q="How many benches are on the terrace?",
               a="There are five benches on the terrace."),
        record(guid="txt_option", qcate="text", kw=None, q="Which lies further south, Lake Ida or Lake Omar?",
               a="Lake Ida", img_pos=(), txt_pos=pick),
        record(guid="txt_yes", qcate="text", kw=None, q="Does Lake Ida lie south of Lake Omar?", a="Yes.",
               img_pos=(), txt_pos=pick),
        record(guid="txt_unsupported", qcate="text", kw=None, q="Which lies further south, Lake Ida or Lake Omar?",
               a="Nobody knows.", img_pos=(), txt_pos=pick),
        # an "-es" plural of the fact's singular ("churches" was "churche", which no "church" matched)
        record(guid="txt_plural", qcate="text", kw=None, q="What kind of building are St Mary and St Anne?",
               a="They are both churches.", img_pos=(),
               txt_pos=(("St Mary is a church in Lincoln.", "St Mary"), ("St Anne is a church in Derby.", "St Anne"))),
        record(guid="kw_plural", qcate="Others", kw="A cross.", q="What is mounted on the two towers?",
               a="Both towers have crosses mounted on them."),
        # a singular in "-che": "niches" must still meet "niche" (the "-es" cut alone made it "nich" against "niche")
        record(guid="kw_niche", qcate="Others", kw="A niche.", q="What is carved into the wall?",
               a="Niches are carved into the wall."),
    ]
    kept, removed = _run(recs, drop_duplicates=False)
    assert kept == ["yn_sentence", "yn_negated", "shape_form", "shape_sentence", "count_twice", "count_none",
                    "txt_option", "txt_yes", "txt_plural", "kw_plural", "kw_niche"]
    assert removed["answer_misses_keyword"] == 3


def test_filter_reads_answers_without_keywords_as_the_public_release_has_them():
    """The public WebQA_train_val.json has no Keywords_A, so these branches are the live path on real data: a count
    that only restates the question states nothing; a text answer that only repeats the question's words must name
    words a gold snippet holds."""
    recs = [
        record(guid="n_restates", qcate="number", kw=None, q="How many benches are on the terrace?",
               a="The benches are on the terrace."),
        record(guid="n_adds", qcate="number", kw=None, q="How many benches are on the terrace?",
               a="There are several benches on the terrace."),
        record(guid="t_unsupported", qcate="text", kw=None, q="Which is older, the tower or the bridge?",
               a="The tower or the bridge.", img_pos=(), txt_pos=(("The mill was built in 1800.", "Mill"),)),
        record(guid="t_supported", qcate="text", kw=None, q="Which is older, the tower or the bridge?",
               a="The tower.", img_pos=(), txt_pos=(("The tower was built before the bridge.", "Tower"),)),
    ]
    kept, removed = _run(recs, drop_duplicates=False)
    assert kept == ["n_adds", "t_supported"] and removed["answer_misses_keyword"] == 2


def test_pools_mix_distractors_of_both_modalities_by_seed():
    """A record lists its image distractors before its text ones: without the seeded shuffle a trimmed pool kept
    images only, and a text question's gold snippet stood out among them (a modality shortcut)."""
    imgs = tuple((30000100 + i, f"Place {i}", f"A view of place {i}.") for i in range(10))
    txts = tuple((f"Place {i} lies on a river.", f"Place {i}") for i in range(10))
    rec = record(guid="mix", qcate="text", kw=None, img_pos=(), img_neg=imgs, txt_pos=(("Lina lives by the sea.", "Lina"),),
                 txt_neg=txts, q="Where does Lina live?", a="By the sea.")
    rows = {seed: D.record_to_row(rec, None, max_candidates=8, seed=seed) for seed in (0, 1)}
    for row in rows.values():
        distractors = [c for c in row["candidates"] if not c["is_gold"]]
        assert len(row["candidates"]) == 8 and {c["modality"] for c in distractors} == {"image", "text"}
    assert D.record_to_row(rec, None, max_candidates=8, seed=0) == rows[0]  # deterministic
    assert [c["id"] for c in rows[0]["candidates"]] != [c["id"] for c in rows[1]["candidates"]]
    assert rows[0]["keywords"] == "" and D.record_to_row(record(kw="red"), None)["keywords"] == "red"  # Keywords_A kept


def test_the_built_rows_keep_the_worlds_keywords(world, built):
    """QA-Acc and the answer reward read Keywords_A: a build that dropped it would score every answer against the
    whole sentence, silently."""
    raw = json.loads((world / "WebQA_train_val.json").read_text())
    _, dd, _ = built
    rows = [r for split in dd.values() for r in split]
    assert rows and all(r["keywords"] == json.loads(raw[r["guid"]]["Keywords_A"]) for r in rows if "Keywords_A" in raw[r["guid"]])
    assert sum(bool(r["keywords"]) for r in rows) > len(rows) // 2


def test_mmqa_rows_exclude_table_answers_and_mix_their_distractors():
    """A question whose answer is read from a table is not answerable from the image/text pool even when its listed
    support is images and passages (15 dev Compare(Compose(TableQ, ...)) questions); a supporting id outside the pool
    is not gold; trimmed pools are a seeded mix of the image and passage distractors."""
    def q(qid, answer_modalities=("image",), supporting=(("i0", "image"),)):
        return D.MMQAQuestion(qid=qid, question="Which one?", answers=("x",), answer_modalities=answer_modalities,
                              qtype="Compare(Compose(TableQ,ImageQ),TextQ)", modalities=("image", "text"),
                              image_doc_ids=tuple(f"i{i}" for i in range(10)), text_doc_ids=tuple(f"t{i}" for i in range(10)),
                              table_id="tab", supporting=supporting)
    images = {f"i{i}": D.MMQADoc(f"i{i}", f"Image {i}") for i in range(10)}
    texts = {f"t{i}": D.MMQADoc(f"t{i}", f"Passage {i}", text=f"Passage {i} says something.") for i in range(10)}
    table = q("table", answer_modalities=("table",))
    assert not D.is_image_text_question(table)
    assert D.mmqa_to_rows([table], images, texts, qtypes=None) == []
    outside = q("outside", supporting=(("i0", "image"), ("elsewhere", "image")))
    assert outside.gold_doc_ids == ("i0",)
    rows = {seed: D.mmqa_to_rows([outside], images, texts, qtypes=None, max_candidates=6, seed=seed)[0] for seed in (0, 1)}
    for row in rows.values():
        assert row["gold_ids"] == ["i0"] and len(row["candidates"]) == 6
        assert {c["modality"] for c in row["candidates"] if not c["is_gold"]} == {"image", "text"}
    assert [c["id"] for c in rows[0]["candidates"]] != [c["id"] for c in rows[1]["candidates"]]


def test_filter_keeps_real_webqa_val_answers(shared_data):
    """On the real val questions the answer filter must remove little: their answers are written by annotators
    from the gold sources (a filter that drops a third of YesNo, as an earlier literal "yes"/"no" check did, is
    wrong, not strict)."""
    import csv

    csv.field_size_limit(10**9)
    path = shared_data / "webqa-val" / "val_image_queries.tsv"
    rows = list(csv.DictReader(path.open(encoding="utf-8"), delimiter="\t"))
    for with_keywords in (True, False):  # the public WebQA_train_val.json has no Keywords_A: the check then uses A
        dropped: dict[str, list[int]] = {}
        for r in rows:
            rec = D.WebQARecord(guid=r["Guid"], question=r["Q"], answers=tuple(json.loads(r["A"])), qcate=r["Qcate"],
                                topic="", split="val", keywords=r["Keywords_A"] if with_keywords else "",
                                img_pos=(D.ImageFact(30000000, "t", ""),))
            n = dropped.setdefault(r["Qcate"], [0, 0])
            n[0] += 1
            n[1] += not D.answer_mentions_keyword(rec)
        assert sum(n for n, _ in dropped.values()) == len(rows) > 2000
        for qcate, (total, removed) in dropped.items():
            assert removed <= 0.04 * total, (with_keywords, qcate, removed, total)


def test_filter_duplicate_questions():
    recs = [record(guid="a", q="What color is the ball?"), record(guid="b", q="  what COLOR is the ball"),
            record(guid="c", q="What color is the box?")]
    kept, removed = _run(recs)
    assert kept == ["a", "c"] and removed["duplicate_question"] == 1
    assert list(removed).index("duplicate_question") > list(removed).index("overlong_gold")


def test_a_bad_first_copy_of_a_question_leaves_its_good_twin():
    """Duplicates are dropped after the quality checks: when the first copy is removed for a bad gold candidate,
    the second (good) copy of the same question is kept, not lost with it."""
    bad = record(guid="bad", q="What color is the ball?", img_pos=((30000000, "Ball", "word " * 200),))
    good = record(guid="good", q="What color is the ball?")
    kept, removed = _run([bad, good], max_candidate_words=150)
    assert kept == ["good"] and removed["overlong_gold"] == 1 and removed["duplicate_question"] == 0


def test_filter_overlong_candidates():
    long_text = "word " * 200
    gold_long = record(guid="g", img_pos=((30000000, "Ball", long_text),))
    neg_long = record(guid="n", img_neg=((30000001, "Box", long_text), (30000002, "Cup", "A cup.")))
    kept, removed = _run([gold_long, neg_long], max_candidate_words=150)
    assert kept == ["n"] and removed["overlong_gold"] == 1
    row = D.record_to_row(neg_long, None, max_candidates=10, filters=NO_IMAGES)
    assert "30000001" not in [c["id"] for c in row["candidates"]]  # an overlong distractor is just dropped


def test_filter_broken_gold_image(tmp_path):
    folder = write_store(tmp_path, {30000000: _png(), 30000001: b"garbage", 30000002: _png(size=2)})
    recs = [record(guid="ok"), record(guid="broken", img_pos=((30000001, "Ball", "x"),), img_neg=()),
            record(guid="tiny", img_pos=((30000002, "Ball", "x"),), img_neg=()),
            record(guid="missing", img_pos=((30000007, "Ball", "x"),), img_neg=())]
    with ImageStore(folder) as store:
        report = FunnelReport("t")
        kept = D.filter_records(recs, MiniWebQAFilters(max_qcate_fraction=None), store, report)
        assert [r.guid for r in kept] == ["ok"]
        assert {s.name: s.removed for s in report.steps}["broken_gold_image"] == 3
        threaded = FunnelReport("t")  # three threads check the gold images: the same verdicts, in input order
        assert D.filter_records(recs * 3, MiniWebQAFilters(max_qcate_fraction=None, drop_duplicates=False), store,
                                threaded, workers=3) == [recs[0]] * 3
        gold_step = {s.name: s for s in threaded.steps}["broken_gold_image"]
        assert (gold_step.removed, gold_step.examples) == (9, ["broken", "tiny", "missing", "broken", "tiny"])
        second = record(guid="second", img_pos=((30000000, "Ball", "x"), (30000001, "Ball", "y")), img_neg=())
        assert D.filter_records([second], MiniWebQAFilters(max_qcate_fraction=None), store) == []  # every gold checked
        # a broken distractor is skipped, not fatal
        row = D.record_to_row(record(guid="x", img_neg=((30000001, "Box", "x"),)), store, 8, MiniWebQAFilters())
        assert [c["id"] for c in row["candidates"] if c["modality"] == "image"] == ["30000000"]


def test_filter_qcate_and_category_balance():
    recs = [record(guid=f"c{i}", q=f"What color is ball {i}?") for i in range(6)] + [
        record(guid=f"n{i}", q=f"How many balls {i}?", qcate="number", kw="3", a="3 balls") for i in range(2)]
    kept, removed = _run(recs, max_per_qcate=3)
    assert sum(g.startswith("c") for g in kept) == 3 and sum(g.startswith("n") for g in kept) == 2
    assert removed["category_balance"] == 3
    assert _run(recs, max_per_qcate=3)[0] == kept  # seeded
    assert all(g.startswith("n") for g in _run(recs, qcates=("number",))[0])
    report = FunnelReport("t")
    # the fraction is a share of the balanced set: 6 colour + 2 number at 0.5 gives 2 + 2, not 4 + 2 (4 of 6 = 67%)
    assert len(D.balance_categories(recs, MiniWebQAFilters(max_qcate_fraction=0.5), report)) == 4
    mixed = recs + [record(guid=f"s{i}", q=f"What shape is ball {i}?", qcate="shape", kw="round", a="It is round.")
                    for i in range(3)]  # 6 colour, 3 shape, 2 number
    kept = D.balance_categories(mixed, MiniWebQAFilters(max_qcate_fraction=0.4))
    shares = {c: sum(r.qcate == c for r in kept) / len(kept) for c in ("color", "shape", "number")}
    assert max(shares.values()) <= 0.4 and len(kept) == 3 + 3 + 2  # colour capped at 3 (3 of 8)
    both = D.balance_categories(recs, MiniWebQAFilters(max_per_qcate=2, max_qcate_fraction=0.9))
    assert Counter(r.qcate for r in both) == {"color": 2, "number": 2}  # the tighter of the two caps wins
    sizes_3_3_10 = [record(guid=f"{c}{i}", q=f"{c} question {i}?", qcate=c) for c, n in
                    (("color", 3), ("number", 3), ("text", 10)) for i in range(n)]
    at_share = D.balance_categories(sizes_3_3_10, MiniWebQAFilters(max_qcate_fraction=0.4))
    assert Counter(r.qcate for r in at_share)["text"] == 4  # 4 of 10 is exactly 0.4: allowed


def test_split_keeps_near_duplicates_together():
    recs = []
    for i in range(60):
        recs.append(record(guid=f"a{i}", q=f"What color are the stars in the Garden {i}?",
                           img_pos=((31000000 + i, "Garden", "Stars."),)))
        if i % 3 == 0:  # a rewording with a gold image of its own: only the question key links the two
            recs.append(record(guid=f"b{i}", q=f"In the Garden {i}, what color are the stars?",
                               img_pos=((32000000 + i, "Garden", "Stars."),)))
    splits = D.split_records(recs, (0.8, 0.1, 0.1), seed=0)
    where = {r.guid: name for name, rs in splits.items() for r in rs}
    assert all(where[f"a{i}"] == where[f"b{i}"] for i in range(0, 60, 3))
    assert sum(map(len, splits.values())) == len(recs) and all(splits.values())
    assert D.split_records(recs, seed=0) == splits


def test_near_dup_key_drops_stopwords_that_end_in_s():
    """"does"/"this" are stopwords; cutting a plural "s" first made them content words ("doe", "thi") that kept
    two rewordings of one question apart (371 of the 4,966 real val questions hold one of them)."""
    assert D.near_dup_key("What color does this bus have?") == D.near_dup_key("What color is the bus?") == "bus color"
    assert mini.content_tokens("Does this bus have stripes?") == ["bus", "stripe"]


def test_near_dup_key_meets_plurals_in_es_and_possessives():
    key = D.near_dup_key
    assert key("What's the color of the bus?") == key("What is the color of the bus?")
    assert key("Is Lina's bus red?") == key("Is the bus of Lina red?")
    assert key("Do the buses have stripes?") == key("Does this bus have stripes?")
    assert key("How many horses are there?") == key("How many horse are there?")
    assert key("Are there 2 dogs?") != key("Are there 3 dogs?")  # a number is part of the question


def test_split_keeps_questions_about_one_gold_image_together(shared_data):
    """Real WebQA asks several questions about one image (243 val gold images serve 477 questions): split by
    question text alone, 37 of 251 test questions had a gold image that was a training target. Ground truth is the
    real gold-source file, not the splitter's key. Every category also reaches every split."""
    import csv

    folder = shared_data / "webqa-val"
    gold: dict[str, list[int]] = defaultdict(list)
    for row in csv.DictReader((folder / "val_gold_sources.tsv").open(encoding="utf-8"), delimiter="\t"):
        if row["source_id"].isdigit():
            gold[row["Guid"]].append(int(row["source_id"]))
    rows = list(csv.DictReader((folder / "val_image_queries.tsv").open(encoding="utf-8"), delimiter="\t"))
    recs = [D.WebQARecord(guid=r["Guid"], question=r["Q"], answers=(r["A"],), qcate=r["Qcate"], topic="", split="val",
                          img_pos=tuple(D.ImageFact(i, "", "") for i in gold[r["Guid"]])) for r in rows if gold[r["Guid"]]]
    shared = Counter(i for r in recs for i in {f.image_id for f in r.img_pos})
    assert sum(n > 1 for n in shared.values()) > 200  # the real data has the case this test is about
    splits = D.split_records(recs, (0.8, 0.1, 0.1), seed=0)
    images = {s: {f.image_id for r in rs for f in r.img_pos} for s, rs in splits.items()}
    assert not (images["train"] & images["validation"] or images["train"] & images["test"]
                or images["validation"] & images["test"])
    for name, rs in splits.items():
        assert abs(len(rs) / len(recs) - {"train": 0.8}.get(name, 0.1)) < 0.02, (name, len(rs))
        assert {r.qcate for r in rs} == {r.qcate for r in recs}, name
    unlinked = D.split_records(recs, (0.8, 0.1, 0.1), seed=0, link_gold_sources=False)
    assert {f.image_id for r in unlinked["test"] for f in r.img_pos} & {f.image_id for r in unlinked["train"] for f in r.img_pos}


def test_split_spreads_every_category_over_the_splits():
    """Dealt within each category, a category of 8 questions still reaches validation and test (8 x 0.1 < 1: dealt
    over all questions it often did not, and notebook 05's per-category table then lacked a row)."""
    recs = [record(guid=f"{c}{i}", q=f"{c} question {i}?", qcate=c, img_pos=((31000000 + 100 * n + i, "t", "c"),))
            for n, (c, size) in enumerate((("color", 80), ("shape", 8), ("number", 40))) for i in range(size)]
    splits = D.split_records(recs, (0.8, 0.1, 0.1), seed=0)
    for name, rs in splits.items():
        assert Counter(r.qcate for r in rs).keys() == {"color", "shape", "number"}, name
    assert Counter(r.qcate for r in splits["test"]) == {"color": 8, "number": 4, "shape": 1}


def test_split_keeps_planted_copies_together(tmp_path):
    """Ground truth from the world's manifest, not the splitter's own key: the check could fail."""
    world = D.make_world(tmp_path / "noisy", n_questions=300, seed=1, progress=False,
                         noise=D.WorldNoise(near_duplicate=0.2, duplicate=0.05))
    copies = D.read_world_manifest(world)["copies"]
    kinds = Counter(c["kind"] for c in copies.values())
    assert kinds["near_duplicate"] > 30 and kinds["duplicate"] > 5
    recs = D.filter_records(D.read_webqa(world / "WebQA_train_val.json").records,
                            MiniWebQAFilters(check_images=False, drop_duplicates=False))
    assert D.split_leaks(D.split_records(recs, seed=0), copies) == []
    # exact keys miss rewordings when nothing else links them (a planted copy keeps its pool: gold sources would)
    exact = D.split_leaks(D.split_records(recs, seed=0, key=D.question_key, link_gold_sources=False), copies)
    assert D.split_leaks(D.split_records(recs, seed=0, key=D.question_key), copies) == []
    assert exact and all(copies[c]["kind"] == "near_duplicate" for c, _ in exact)  # exact keys miss only rewordings


def test_webqa_val_held_out_as_test_unless_linked_to_train():
    """test_split='webqa_val': WebQA's val questions are the test split; one that shares a gold image with a train
    question, or rewords one, is dropped (it would be answered from memory), its train partner stays in the pool."""
    from dataclasses import replace

    def val(r):
        return replace(r, split="val")

    recs = [
        record(guid="t1", img_pos=((30000001, "Ball", "x"),)),
        val(record(guid="v1", img_pos=((30000001, "Ball", "y"),))),  # same gold image as t1
        record(guid="t2", q="What color are the stars in the Garden?", img_pos=((30000002, "Garden", "x"),)),
        val(record(guid="v2", q="In the Garden, what color are the stars?", img_pos=((30000003, "Garden", "y"),))),
        val(record(guid="v3", img_pos=((30000004, "Kite", "x"),))),
        val(record(guid="v4", q="Is the kite red?", img_pos=((30000004, "Kite", "y"),))),  # val-only group of two
        record(guid="t3", img_pos=((30000005, "Box", "x"),)),
    ]
    pool, test, dropped = D.hold_out_webqa_val(recs)
    assert sorted(r.guid for r in test) == ["v3", "v4"]
    assert sorted(dropped) == ["v1", "v2"] and sorted(r.guid for r in pool) == ["t1", "t2", "t3"]
    assert sorted(r.guid for r in D.hold_out_webqa_val(list(reversed(recs)))[1]) == ["v3", "v4"]  # any file order
    _, linked_test, _ = D.hold_out_webqa_val(recs, link_gold_sources=False)
    assert "v1" in {r.guid for r in linked_test}  # without gold-source links only the rewording is caught


@pytest.mark.parametrize("seed", range(20))
def test_webqa_val_hold_out_never_links_test_to_the_pool(seed):
    """Random small worlds of shared gold images and rewordings: every record lands in exactly one of pool / test /
    dropped, the pool holds no val question, the test only val ones, and no test question shares a gold image or a
    question key with a pool question (the leak the hold-out exists to prevent)."""
    import random
    from dataclasses import replace

    rng = random.Random(seed)
    topics = [f"Garden {i}" for i in range(8)]
    recs = [replace(record(guid=f"q{i}", q=f"What color are the stars in the {rng.choice(topics)}?" if rng.random() < 0.3
                           else f"What color is the ball {i}?",
                           img_pos=((30000000 + rng.randrange(25), "t", "c"),)),
                    split=rng.choice(["train", "train", "val"])) for i in range(40)]
    pool, test, dropped = D.hold_out_webqa_val(recs)
    guids = [r.guid for r in pool] + [r.guid for r in test] + dropped
    assert sorted(guids) == sorted(r.guid for r in recs)
    assert all(r.split == "train" for r in pool) and all(r.split == "val" for r in test)
    assert {f.image_id for r in test for f in r.img_pos}.isdisjoint({f.image_id for r in pool for f in r.img_pos})
    assert {D.near_dup_key(r.question) for r in test}.isdisjoint({D.near_dup_key(r.question) for r in pool})


def test_build_with_webqa_val_test_split(tmp_path, world, capsys):
    """The whole build: test holds only val questions, none sharing a gold image with train or validation, the funnel
    counts the dropped ones, and a Mini-WebQA built the other way is not current for this setting."""
    from mmrag_lite.config import ConfigError, get_preset

    preset = get_preset("cpu-tiny").with_overrides(**{"data.test_split": "webqa_val"})
    dd, report = D.build_mini_webqa(world, tmp_path / "mini", settings=preset, progress=False)
    split_of = {r.guid: r.split for r in D.read_webqa(world / "WebQA_train_val.json").records}
    assert {split_of[g] for g in dd["test"]["guid"]} == {"val"}
    assert {split_of[g] for s in ("train", "validation") for g in dd[s]["guid"]} == {"train"}
    step = next(s for s in report.steps if s.name == "linked_to_train")
    assert step.kept == sum(report.splits.values()) and set(step.examples) <= {g for g, sp in split_of.items() if sp == "val"}
    gold = {s: {c["id"] for row in dd[s] for c in row["candidates"] if c["is_gold"] and c["modality"] == "image"}
            for s in D.SPLITS}
    assert gold["test"] and not gold["test"] & (gold["train"] | gold["validation"])
    assert FunnelReport.load(tmp_path / "mini").settings["test_split"] == "webqa_val"
    run = tmp_path / "run"
    D.ensure_mini_webqa(preset, run, webqa_dir=world)
    assert D.mini_webqa_is_current(preset, run, world) is True
    assert D.mini_webqa_is_current(get_preset("cpu-tiny"), run, world) is False
    assert D.mini_webqa_staleness(get_preset("cpu-tiny"), run, world) == [
        "built with test_split='webqa_val', the preset asks 'pooled'"]
    D.ensure_mini_webqa(get_preset("cpu-tiny"), run, webqa_dir=world)  # a notebook run without the override
    assert "rebuilding" in capsys.readouterr().out  # says why before it rebuilds (an hour on real WebQA)
    with pytest.raises(ConfigError, match="test_split"):
        get_preset("cpu-tiny").with_overrides(**{"data.test_split": "val"})


def test_webqa_val_test_split_without_val_questions_says_why(tmp_path):
    from mmrag_lite.config import get_preset

    source = write_webqa(tmp_path / "all_train", questions(30))  # every record is split "train"
    settings = get_preset("cpu-tiny").with_overrides(**{"data.test_split": "webqa_val"})
    with pytest.raises(D.MiniWebQABuildError, match="empty test split.*WebQA's own val questions"):
        D.build_mini_webqa(source, tmp_path / "out", settings=settings, filters=NO_IMAGES, progress=False)
    assert not (tmp_path / "out").exists()


def test_candidate_pool_keeps_gold_and_is_deterministic():
    negs = tuple((30000010 + i, f"Box {i}", "A box.") for i in range(12))
    r = record(img_pos=((30000000, "Ball", "x"), (30000001, "Ball 2", "y")), img_neg=negs)
    row = D.record_to_row(r, None, max_candidates=5, filters=NO_IMAGES, seed=3)
    assert len(row["candidates"]) == 5 and sorted(row["gold_ids"]) == ["30000000", "30000001"]
    assert row == D.record_to_row(r, None, max_candidates=5, filters=NO_IMAGES, seed=3)
    assert [c["id"] for c in row["candidates"]] != [c["id"] for c in
                                                   D.record_to_row(r, None, 5, NO_IMAGES, seed=4)["candidates"]]
    assert len(D.record_to_row(r, None, max_candidates=1, filters=NO_IMAGES)["candidates"]) == 2  # gold always kept


def test_candidate_pool_holds_each_id_once_and_gold_wins():
    """Scores, kept ids and citations are keyed by id: an image listed twice (or as gold and as a distractor) is
    one candidate, the gold one."""
    from collections import Counter as Counts

    r = record(img_pos=((30000000, "Ball", "x"),),
               img_neg=((30000000, "Ball again", "x"), (30000002, "Box", "y"), (30000002, "Box", "y")))
    counts: Counts = Counts()
    row = D.record_to_row(r, None, max_candidates=8, filters=NO_IMAGES, counts=counts)
    ids = [c["id"] for c in row["candidates"]]
    assert sorted(ids) == ["30000000", "30000002", f"{r.guid}_10"] and row["gold_ids"] == ["30000000"]
    assert next(c for c in row["candidates"] if c["id"] == "30000000")["title"] == "Ball"
    assert counts["duplicate_candidate"] == 2


def test_downscaled_images_keep_their_format():
    big_jpeg, big_png = _jpeg(size=96), _png(size=96)
    small, size, found = D.mini._image_payload(big_jpeg, 48, 1)
    assert small[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(small)).size == size == (48, 48) and found == (96, 96)
    assert D.mini._image_payload(big_png, 48, 2)[0][:4] == b"\x89PNG"
    assert D.mini._image_payload(_jpeg(size=32), 48, 3) == (_jpeg(size=32), (32, 32), (32, 32))  # stored as it is
    cut = _jpeg(size=32)[: len(_jpeg(size=32)) * 2 // 3]  # truncated: re-encoded whole, so any reader opens it
    fixed, size, found = D.mini._image_payload(cut, 48, 4)
    rows = round(D.decoded_share(D.load_image_bytes(cut)) * 32)  # cut to the rows that decoded: no fill stored
    assert 0 < rows < 32 and fixed != cut and size == (32, rows) and found == (32, 32)
    assert D.load_image_bytes(fixed).size == (32, rows) and D.decoded_share(D.load_image_bytes(fixed)) == 1.0
    Image.open(io.BytesIO(fixed)).load()  # strict decode, no truncation tolerance needed
    with pytest.raises(D.ImageDecodeError, match="image 5"):
        D.mini._image_payload(b"not an image", 48, 5)


def test_a_strict_check_waits_while_another_thread_decodes_tolerantly(monkeypatch):
    """PIL's truncation tolerance is one process-wide flag, raised while ``load_image_bytes`` opens a truncated file.
    A strict check in another thread at that moment would pass its own truncated file as whole, and the builder would
    store it unrepaired; under the gate it waits until the flag is down, then re-encodes the file."""
    import contextlib
    import threading

    from mmrag_lite.data import images

    big = _jpeg(size=64)
    cut = big[: len(big) * 2 // 3]

    def check_while_flag_is_up(gate) -> tuple[bool, bytes]:
        inside, leave, out = threading.Event(), threading.Event(), []

        def tolerant_decode():  # what load_image_bytes does for a truncated file, held open
            with gate.tolerant():
                inside.set()
                leave.wait(10)

        holder = threading.Thread(target=tolerant_decode)
        holder.start()
        inside.wait(10)
        checker = threading.Thread(target=lambda: out.append(D.mini._image_payload(cut, 64, 1)[0]))
        checker.start()
        checker.join(0.3)
        waited = checker.is_alive()
        leave.set()
        checker.join(10)
        holder.join(10)
        return waited, out[0]

    waited, stored = check_while_flag_is_up(images.TRUNCATION_GATE)
    assert waited and stored != cut
    Image.open(io.BytesIO(stored)).load()  # whole: opens without any tolerance

    class NoGate:  # the flag alone, as before the gate: the check runs at once and passes the cut file
        strict = staticmethod(contextlib.nullcontext)

        @staticmethod
        @contextlib.contextmanager
        def tolerant():
            previous, images.ImageFile.LOAD_TRUNCATED_IMAGES = images.ImageFile.LOAD_TRUNCATED_IMAGES, True
            try:
                yield
            finally:
                images.ImageFile.LOAD_TRUNCATED_IMAGES = previous

    monkeypatch.setattr(mini, "TRUNCATION_GATE", NoGate())
    waited, stored = check_while_flag_is_up(NoGate())
    assert not waited and stored == cut


def test_rows_built_in_threads_are_the_serial_rows(world):
    """``workers=3`` threads give the same dataset, candidate counts and skipped questions as one; with
    ``check_images=False`` a broken gold image is skipped in a thread, the rest kept."""
    serial, serial_report = D.build_mini_webqa(world, None, filters=NO_IMAGES, progress=False, workers=1)
    parallel, parallel_report = D.build_mini_webqa(world, None, filters=NO_IMAGES, progress=False, workers=3)
    for name in D.SPLITS:
        assert serial[name].to_list() == parallel[name].to_list(), name
    assert serial_report.to_dict() == parallel_report.to_dict()
    assert parallel_report.candidates["skipped_broken_gold_image"] > 0  # the world plants broken gold images
    _, checked_serial = D.build_mini_webqa(world, None, progress=False, workers=1)  # the gold check in threads too
    _, checked_parallel = D.build_mini_webqa(world, None, progress=False, workers=3)
    assert checked_serial.to_dict() == checked_parallel.to_dict()
    assert {s.name: s.removed for s in checked_parallel.steps}["broken_gold_image"] > 0
    assert mini._image_threads(None, False) == mini._image_threads(5, False) == 1  # no images: nothing to spread
    assert 1 <= mini._image_threads(None, True) <= 4 and mini._image_threads(3, True) == 3
    with pytest.raises(ValueError, match="workers"):
        D.build_mini_webqa(world, None, filters=NO_IMAGES, progress=False, workers=0)


# ----------------------------------------------------------------------------------------------- builder
def test_build_on_the_world_matches_the_contract(built):
    out, dd, report = built
    assert set(dd) == {"train", "validation", "test"}
    assert dd["train"].features == D.mini_webqa_features()
    assert report.splits == {k: len(v) for k, v in dd.items()} and sum(report.splits.values()) == report.n_kept
    assert report.n_read == 400 and report.steps[0].name == "unreadable" and report.steps[0].removed > 0
    assert all(s.removed > 0 for s in report.steps if s.name in (
        "no_gold_source", "answer_misses_keyword", "duplicate_question", "broken_gold_image"))
    assert FunnelReport.load(out).to_dict() == report.to_dict()
    for row in dd["validation"]:
        ids = [c["id"] for c in row["candidates"]]
        assert 1 <= len(row["gold_ids"]) and set(row["gold_ids"]) <= set(ids) and len(ids) <= 8
        assert row["question"][0] != '"' and row["answer"][0] != '"'
        for c in row["candidates"]:
            assert (c["image"] is None) == (c["modality"] == "text")
            if c["image"] is not None:  # a planted cut image is kept cropped to its decoded rows (gold: 90% at least)
                width, height = c["image"].size
                assert width == 56 and (0.9 * 56 if c["is_gold"] else 1) <= height <= 56
    guids = [set(dd[s]["guid"]) for s in dd]
    assert not (guids[0] & guids[1] or guids[0] & guids[2] or guids[1] & guids[2])
    first_gold = Counter(next(i for i, c in enumerate(r["candidates"]) if c["is_gold"]) for r in dd["train"])
    assert len(first_gold) >= 4 and first_gold[0] < 0.5 * len(dd["train"])  # pools are shuffled: no gold slot
    # leakage judged by ground truth, not by the key the split used: the world's planted near-duplicates reword a
    # question and keep its pool, so a gold image in two splits is a reworded question on both sides
    gold_images = {s: {i for ids in dd[s]["gold_ids"] for i in ids if "_" not in i} for s in dd}
    assert not (gold_images["train"] & gold_images["validation"] or gold_images["train"] & gold_images["test"]
                or gold_images["validation"] & gold_images["test"])


def test_build_without_images_and_text_report(tmp_path):
    folder = write_webqa(tmp_path, {"g1": raw_record(guid="g1"), "g2": raw_record(guid="g2", q="Other q?")})
    dd, report = D.build_mini_webqa(folder, None, filters=MiniWebQAFilters(check_images=False), progress=False)
    assert sum(len(v) for v in dd.values()) == 2 and "unreadable" in str(report)
    with pytest.raises(FileNotFoundError, match="imgs.tsv"):
        D.build_mini_webqa(folder, None, progress=False)


def test_unchecked_broken_gold_images_skip_their_question_not_the_build(world):
    """With check_images=False the broken_gold_image step does not run; the planted broken gold images must then
    cost their own questions only, and the report must say which."""
    dd, report = D.build_mini_webqa(world, None, settings="cpu-tiny", filters=MiniWebQAFilters(check_images=False),
                                    progress=False)
    skipped = report.candidates.get("skipped_broken_gold_image", 0)
    assert skipped >= 1 and sum(len(v) for v in dd.values()) > 300
    assert sum("skipped" in e for e in report.read_errors) == skipped
    assert report.steps[-1].name == "broken_gold_image" and report.steps[-1].removed == skipped
    assert report.n_kept == sum(report.splits.values()) == sum(report.qcates.values()) == sum(len(v) for v in dd.values())


def _test_layout(guid: str) -> dict:
    raw = raw_record(guid=guid)
    raw["img_Facts"] = raw.pop("img_posFacts") + raw.pop("img_negFacts")
    raw["txt_Facts"] = raw.pop("txt_negFacts")
    del raw["txt_posFacts"], raw["A"], raw["Keywords_A"]
    return raw


def _unusable_sources(root: Path) -> list[tuple[Path, type, str]]:
    """(source, error, message pattern): each leaves no question, or is not a training source at all."""
    def folder(name: str, text: str, file: str = "WebQA_train_val.json") -> Path:
        (root / name).mkdir(parents=True)
        (root / name / file).write_text(text)
        return root / name

    cut = json.dumps({"g0": raw_record(guid="g0")})
    return [
        (folder("broken", json.dumps({"a": {"Q": 3}, "b": {**raw_record(guid="b"), "txt_negFacts": "oops"}})),
         D.MiniWebQABuildError, r"'unreadable' removed the last 2.*record a: .*'Q' must be a string"),
        (folder("empty", "{}"), D.MiniWebQABuildError, "holds no WebQA records"),
        (folder("list", "[1, 2]"), WebQAFormatError, r"list/WebQA_train_val.json.*keyed by Guid"),
        (folder("cut", cut[: len(cut) // 2]), WebQAFormatError, r"cut/WebQA_train_val.json.*invalid JSON"),
        (folder("test_only", json.dumps({"t1": _test_layout("t1")}), "WebQA_test.json"), D.MiniWebQABuildError,
         r"WebQA_test.json is WebQA's test file.*needs WebQA_train_val.json"),
        (folder("test_layout", json.dumps({f"t{i}": _test_layout(f"t{i}") for i in range(3)})),
         D.MiniWebQABuildError, r"'no_gold_source' removed the last 3.*test-layout.*needs WebQA_train_val.json"),
        (write_webqa(root / "no_answers", {f"g{i}": raw_record(guid=f"g{i}", a="Hard to say.") for i in range(4)}),
         D.MiniWebQABuildError, r"'answer_misses_keyword' removed the last 4"),
        (D.make_world(root / "world0", n_questions=0, progress=False), D.MiniWebQABuildError,
         "holds no WebQA records.*world_questions"),
        (write_webqa(root / "too_few", questions(2)),
         D.MiniWebQABuildError, "empty test split: only 2 question"),
    ]


def test_build_refuses_a_source_without_usable_questions(tmp_path):
    """An empty Mini-WebQA used to be saved (and then cached as current) and to crash later in datasets with an
    IndexError; now the build says why, and writes nothing: a Mini-WebQA already there stays as it was."""
    good = write_webqa(tmp_path / "good", questions(10))
    out = tmp_path / "out" / "mini_webqa"
    D.build_mini_webqa(good, out, filters=NO_IMAGES, progress=False)
    stamp = (out / "dataset_dict.json").stat().st_mtime_ns
    sources = _unusable_sources(tmp_path / "sources")
    for source, error, pattern in sources:
        with pytest.raises(error, match=pattern):
            D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)
        with pytest.raises(error, match=pattern):
            D.build_mini_webqa(source, tmp_path / "out" / "new", filters=NO_IMAGES, progress=False)
    assert _names(tmp_path / "out") == ["mini_webqa"]  # nothing new, no temporary left behind
    assert (out / "dataset_dict.json").stat().st_mtime_ns == stamp and len(D.load_mini_webqa(out)["train"]) == 8
    too_few = sources[-1][0]  # in memory an empty split is no crash: only saving one is refused
    assert sum(map(len, D.build_mini_webqa(too_few, None, filters=NO_IMAGES, progress=False)[0].values())) == 2


def test_build_refuses_an_out_dir_it_would_wipe(tmp_path):
    """Saving replaces out_dir whole: the source folder itself, a folder above it, or a folder of other files would
    be deleted, so each is refused before anything is read; an earlier Mini-WebQA is replaced as before."""
    source = write_webqa(tmp_path / "webqa", questions(10))
    (source / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="source folder"):
        D.build_mini_webqa(source, source, filters=NO_IMAGES, progress=False)
    with pytest.raises(FileExistsError, match="source folder"):
        D.build_mini_webqa(source, tmp_path, filters=NO_IMAGES, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not a Mini-WebQA.*thesis.tex"):
        D.build_mini_webqa(source, other, filters=NO_IMAGES, progress=False)
    assert _names(source) == sorted(["WebQA_train_val.json", "my_notes.txt"]) and _names(other) == ["thesis.tex"]
    out = tmp_path / "mini"
    D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)
    D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)  # a Mini-WebQA is replaced
    assert len(D.load_mini_webqa(out)["train"]) == 8


def test_a_fixed_source_is_rebuilt_after_a_refused_build(tmp_path, world):
    """A broken source leaves no cache behind; once the file is fixed the next call builds it."""
    from mmrag_lite.config import get_preset

    source = tmp_path / "webqa"
    source.mkdir()
    for name in ("imgs.tsv", "imgs.lineidx"):
        (source / name).write_bytes((world / name).read_bytes())
    (source / "WebQA_train_val.json").write_text((world / "WebQA_train_val.json").read_text()[:300])
    preset, run = get_preset("cpu-tiny"), tmp_path / "run"
    with pytest.raises(WebQAFormatError, match="webqa/WebQA_train_val.json"):
        D.ensure_mini_webqa(preset, run, webqa_dir=source)
    assert D.mini_webqa_is_current(preset, run, source) is None and not (run / "mini_webqa").exists()
    (source / "WebQA_train_val.json").write_bytes((world / "WebQA_train_val.json").read_bytes())
    assert len(D.ensure_mini_webqa(preset, run, webqa_dir=source)["train"]) > 200


def test_save_is_atomic_on_failure(tmp_path, monkeypatch, built):
    import datasets

    _, dd, _ = built
    target = tmp_path / "mini"

    def half_write(self, path, *a, **k):
        Path(path).mkdir(parents=True)
        (Path(path) / "half.arrow").write_bytes(b"xx")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", half_write)
    with pytest.raises(OSError, match="disk full"):
        D.save_dataset_atomic(dd, target)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary left behind
    monkeypatch.undo()
    D.save_dataset_atomic(dd, target, {"funnel.json": "{}"}, progress=False)
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", half_write)
    with pytest.raises(OSError):
        D.save_dataset_atomic(dd, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini"]
    assert len(D.load_mini_webqa(target)["train"]) == len(dd["train"])  # the old one is intact


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_ensure_mini_webqa_builds_once(tmp_path):
    """The course reuses its cache when nothing changed (world and Mini-WebQA untouched); ``force`` rebuilds both."""
    from mmrag_lite.config import get_preset

    dd = D.ensure_mini_webqa("cpu-tiny", tmp_path)
    assert (tmp_path / "world" / "imgs.lineidx").is_file() and (tmp_path / "mini_webqa" / "funnel.json").is_file()
    world, mini = _stamps(tmp_path / "world"), _stamps(tmp_path / "mini_webqa")
    assert D.mini_webqa_is_current(get_preset("cpu-tiny"), tmp_path) is True
    again = D.ensure_mini_webqa("cpu-tiny", tmp_path)
    assert _stamps(tmp_path / "world") == world and _stamps(tmp_path / "mini_webqa") == mini
    assert again["train"]["guid"] == dd["train"]["guid"] and len(dd["train"]) > 200
    forced = D.ensure_mini_webqa("cpu-tiny", tmp_path, force=True)
    assert _stamps(tmp_path / "world")["imgs.tsv"] != world["imgs.tsv"]
    assert _stamps(tmp_path / "mini_webqa")["dataset_dict.json"] != mini["dataset_dict.json"]
    assert forced["train"]["guid"] == dd["train"]["guid"]  # same seed, same data


def test_two_callers_on_one_run_folder_build_it_once(tmp_path, monkeypatch):
    """Two kernels on one run folder: without the lock both built, and racing renames onto one target can fail."""
    import threading

    builds = []
    real = D.mini.build_mini_webqa

    def counted(*args, **kw):
        builds.append(threading.get_ident())
        return real(*args, **kw)

    monkeypatch.setattr(D.mini, "build_mini_webqa", counted)
    results, errors = [], []

    def call():
        try:
            results.append(D.ensure_mini_webqa("cpu-tiny", tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and len(builds) == 1
    assert results[0]["train"]["guid"] == results[1]["train"]["guid"]


def test_ensure_mini_webqa_notices_changed_source_files(tmp_path, world):
    """A cut imgs.tsv later restored, or a re-downloaded question file, changes size or mtime: the cache key."""
    import shutil

    from mmrag_lite.config import get_preset

    source = shutil.copytree(world, tmp_path / "webqa")
    preset, run = get_preset("cpu-tiny"), tmp_path / "run"
    mini = run / "mini_webqa"
    D.ensure_mini_webqa(preset, run, webqa_dir=source)
    stamp = (mini / "dataset_dict.json").stat().st_mtime_ns
    D.ensure_mini_webqa(preset, run, webqa_dir=source)
    assert (mini / "dataset_dict.json").stat().st_mtime_ns == stamp  # nothing changed: reused
    tsv = (source / "imgs.tsv").read_bytes()
    (source / "imgs.tsv").write_bytes(tsv[: len(tsv) // 2])
    assert D.mini_webqa_is_current(preset, run, source) is False
    (source / "imgs.tsv").write_bytes(tsv)  # restored: same bytes, but the build read the cut file
    assert D.mini_webqa_is_current(preset, run, source) is False
    D.ensure_mini_webqa(preset, run, webqa_dir=source)
    assert (mini / "dataset_dict.json").stat().st_mtime_ns != stamp
    assert D.mini_webqa_is_current(preset, run, source) is True
    recorded = FunnelReport.load(mini).settings["source_files"]  # in funnel.json, beside the build settings
    assert recorded == D.source_fingerprint(source / "WebQA_train_val.json")
    assert sorted(recorded) == ["WebQA_train_val.json", "imgs.lineidx", "imgs.tsv"]
    # asked without webqa_dir (notebooks 03-05): a changed real source is rebuilt from itself, not from a world
    os.utime(source / "WebQA_train_val.json", ns=(1, 1))
    assert D.mini_webqa_is_current(preset, run) is False
    D.ensure_mini_webqa(preset, run)
    assert FunnelReport.load(mini).source == str((source / "WebQA_train_val.json").resolve())
    assert D.mini_webqa_is_current(preset, run) is True and not (run / "world").exists()
    # that source gone (a drive not mounted) when a rebuild is due: an error, never the synthetic world instead
    built_from = FunnelReport.load(mini).source
    moved = source.rename(tmp_path / "webqa-moved")
    with pytest.raises(FileNotFoundError, match="which is gone.*webqa_dir"):
        D.ensure_mini_webqa(preset.with_overrides(**{"data.max_candidates": 6}), run)
    with pytest.raises(FileNotFoundError, match="which is gone"):
        D.ensure_mini_webqa(preset, run, force=True)
    assert not (run / "world").exists() and FunnelReport.load(mini).source == built_from
    assert len(D.ensure_mini_webqa(preset, run)["train"]) > 0  # nothing to rebuild: the saved build still loads
    source = moved.rename(source)
    # a build that recorded no fingerprint (an older version) cannot be checked: its run folder stays usable
    funnel = json.loads((mini / "funnel.json").read_text())
    del funnel["settings"]["source_files"]
    (mini / "funnel.json").write_text(json.dumps(funnel))
    assert D.mini_webqa_is_current(preset, run, source) is True
    assert D.mini_webqa_is_current(preset.with_overrides(**{"data.max_candidates": 6}), run, source) is False


def test_mini_webqa_source_says_synthetic_world_or_webqa_files(tmp_path, world, built):
    """Results must say what the data was: a world's manifest marks it; a folder without one is WebQA's files."""
    import shutil

    assert D.mini_webqa_source(built[0].parent) == "synthetic world"
    assert FunnelReport.load(built[0]).settings["synthetic_world"] is True
    source = shutil.copytree(world, tmp_path / "webqa", ignore=shutil.ignore_patterns("world_manifest.json"))
    run = tmp_path / "run"
    D.build_mini_webqa(source, run / "mini_webqa", settings="cpu-tiny", progress=False)
    assert D.mini_webqa_source(run) == "WebQA files"
    assert D.mini_webqa_source(tmp_path / "nothing here") is None
    # a build from before the flag was recorded: judged by the manifest beside its source, unknown once that is gone
    funnel = json.loads((run / "mini_webqa" / "funnel.json").read_text())
    del funnel["settings"]["synthetic_world"]
    (run / "mini_webqa" / "funnel.json").write_text(json.dumps(funnel))
    assert D.mini_webqa_source(run) == "WebQA files"
    (source / "world_manifest.json").write_text(json.dumps({"n_questions": 1}))
    assert D.mini_webqa_source(run) == "synthetic world"
    (source / "WebQA_train_val.json").unlink()
    assert D.mini_webqa_source(run) is None


def test_ensure_mini_webqa_notices_other_settings_from_another_directory(tmp_path, monkeypatch):
    """The cache check compares absolute paths: a run folder given relative to one working directory and
    absolute from another is the same folder, and a change of preset sizes still rebuilds it."""
    from mmrag_lite.config import get_preset

    monkeypatch.chdir(tmp_path)
    small = get_preset("cpu-tiny", **{"data.world_questions": 60})
    first = D.ensure_mini_webqa(small, "run")
    monkeypatch.chdir(tmp_path.parent)
    bigger = D.ensure_mini_webqa(get_preset("cpu-tiny", **{"data.world_questions": 90}), tmp_path / "run")
    assert sum(map(len, bigger.values())) > sum(map(len, first.values()))


# --------------------------------------------------------------------------------------------------- MMQA
def test_mmqa_reader_on_shared_dev(shared_data):
    data = D.load_mmqa(shared_data / "mmqa-dev", "dev")
    assert len(data.questions) == 2441 and len(data.images) == 57058
    assert sum(q.qtype == "ImageQ" for q in data.questions) == 230
    q = next(q for q in data.questions if q.qtype == "ImageQ")
    assert q.answers and set(q.gold_doc_ids) <= set(q.image_doc_ids)
    rows = D.mmqa_to_rows(data.questions, data.images, data.texts)
    assert len(rows) == 230
    for row in rows:
        assert row["gold_ids"] and set(row["gold_ids"]) <= {c["id"] for c in row["candidates"]}
        assert all(c["image"] is None for c in row["candidates"])
        assert row["answers"] and row["answer"] == row["answers"][0]
    assert all(c["title"] for row in rows for c in row["candidates"] if c["modality"] == "image")
    trimmed = D.mmqa_to_rows(data.questions, data.images, max_candidates=5)
    assert all(len(r["candidates"]) <= max(5, len(r["gold_ids"])) for r in trimmed)
    every = [q for q in data.questions if D.is_image_text_question(q)]  # qtypes=None keeps these
    assert every and all(set(q.answer_modalities) <= {"image", "text"} for q in every)
    assert any("TableQ" in q.qtype and not any(p == "table" for _, p in q.supporting) for q in data.questions)


def test_mmqa_bad_line_is_reported_by_qid(tmp_path):
    path = tmp_path / "MMQA_dev.jsonl"
    good = {"qid": "q1", "question": "Q?", "answers": [{"answer": "x"}], "metadata": {"type": "TextQ"},
            "supporting_context": []}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"qid": "q2"}) + "\n")
    errors: list = []
    assert [q.qid for q in D.read_mmqa(path, errors=errors)] == ["q1"] and errors[0].guid == "q2"
    with pytest.raises(D.MMQAFormatError, match="q2"):
        D.read_mmqa(path, strict=True)


def test_mmqa_cut_json_line_loses_only_itself(tmp_path):
    good = {"question": "Q?", "answers": [{"answer": "x"}], "metadata": {"type": "TextQ"}, "supporting_context": []}
    path = tmp_path / "MMQA_dev.jsonl"
    path.write_text(json.dumps({**good, "qid": "q1"}) + "\n" + json.dumps({**good, "qid": "q2"})[:25] + "\n"
                    + json.dumps({**good, "qid": "q3"}) + "\n")
    errors: list = []
    assert [q.qid for q in D.read_mmqa(path, errors=errors)] == ["q1", "q3"]
    assert errors[0].guid == "line 2" and "invalid JSON" in errors[0].message
    with pytest.raises(D.MMQAFormatError, match="line 2"):
        D.read_mmqa(path, strict=True)
    docs = tmp_path / "MMQA_images.jsonl"
    docs.write_text('{"id": "a", "title": "A"}\n{"id": "b", "tit\n{"title": "no id"}\n{"id": "c"}\n')
    errors = []
    assert sorted(D.read_mmqa_docs(docs, errors=errors)) == ["a", "c"] and len(errors) == 2
    with pytest.raises(D.MMQAFormatError, match="line 2"):
        D.read_mmqa_docs(docs, strict=True)


def test_mmqa_cut_gzip_keeps_the_lines_before_the_cut(tmp_path):
    """A cut download of a ``.jsonl.gz`` ends without gzip's end-of-stream marker: keep what came before it."""
    import gzip

    good = {"question": "Q?", "answers": [{"answer": "x"}], "metadata": {"type": "TextQ"}, "supporting_context": []}
    lines = "".join(json.dumps({**good, "qid": f"q{i}", "pad": os.urandom(300).hex()}) + "\n" for i in range(200))
    whole = gzip.compress(lines.encode())
    path = tmp_path / "MMQA_dev.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    errors: list = []
    kept = D.read_mmqa(path, errors=errors)
    assert 0 < len(kept) < 200 and [q.qid for q in kept] == [f"q{i}" for i in range(len(kept))]
    assert [e.guid for e in errors] == [f"line {len(kept) + 1}"]  # the line after the last one kept
    assert f"MMQA_dev.jsonl.gz line {len(kept) + 1}: the file ends early" in errors[0].message
    with pytest.raises(D.MMQAFormatError, match="ends early"):
        D.read_mmqa(path, strict=True)


# ------------------------------------------------------------------------------------------ viz / widgets
def test_plot_funnel_and_dataset_browser(built):
    import matplotlib

    matplotlib.use("Agg")
    from mmrag_lite.viz import plot_funnel
    from mmrag_lite.widgets import dataset_browser

    out, dd, report = built
    for source in (report, report.to_dict(), out):
        fig = plot_funnel(source)
        ax = fig.axes[0]
        assert len(ax.patches) == 2 * (len(report.steps) + 1)
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not [t.get_text() for t in ax.texts if t.get_window_extent(renderer).overlaps(legend)]  # counts readable
    assert fig.bbox.contains(legend.x1 - 1, legend.y1 - 1)  # and the legend is on the figure
    browser = dataset_browser(dd)
    assert len(browser.grid.children) == len(dd["train"][0]["candidates"])
    browser.split_picker.value = "test"
    assert dd["test"][0]["guid"] in browser.header.value
    from mmrag_lite.widgets import NO_PIXELS_HTML

    row = dd["test"][0]
    image = next(i for i, c in enumerate(row["candidates"]) if c["modality"] == "image")
    for broken in (None, {"bytes": _png_claiming(30_000, 30_000), "path": None}):  # no pixels; a decompression bomb
        row["candidates"][image]["image"] = broken
        cell = dataset_browser([row]).grid.children[image]
        assert [w.value for w in cell.children if getattr(w, "value", None) == NO_PIXELS_HTML] == [NO_PIXELS_HTML]


def test_mmqa_rows_keep_every_gold_document_when_trimmed():
    """``max_candidates`` trims distractors only (the shared-dev test checks sizes; CI has no ../shared)."""
    images = {f"i{n}": D.MMQADoc(id=f"i{n}", title=f"image {n}") for n in range(12)}
    qs = [D.MMQAQuestion(qid=f"q{j}", question="Which one?", answers=("x",), answer_modalities=("image",), qtype="ImageQ",
                         modalities=("image",), image_doc_ids=tuple(images), text_doc_ids=("t1",), table_id="",
                         supporting=((f"i{11 - j}", "image"), ("i3", "image")))
          for j in range(6)]
    for cap in (1, 3, 5):
        for q, row in zip(qs, D.mmqa_to_rows(qs, images, max_candidates=cap)):
            ids = {c["id"] for c in row["candidates"]}
            assert set(q.gold_doc_ids) <= ids and sorted(row["gold_ids"]) == sorted(q.gold_doc_ids)
            assert len(row["candidates"]) == max(cap, len(q.gold_doc_ids))
    full = D.mmqa_to_rows(qs[:1], images)[0]  # no passage texts: the passage is left out, not a blank candidate
    assert len(full["candidates"]) == 12 and all(c["modality"] == "image" and c["text"] for c in full["candidates"])
    texts = {"t1": D.MMQADoc(id="t1", title="Passage", text="A passage.")}
    with_text = D.mmqa_to_rows(qs[:1], images, texts)[0]
    assert len(with_text["candidates"]) == 13 and next(c for c in with_text["candidates"] if c["id"] == "t1")["text"]


def _mmqa_image_question(qid: str, image_ids: tuple[str, ...], gold: str) -> D.MMQAQuestion:
    return D.MMQAQuestion(qid=qid, question="What is on the flag?", answers=("a star",), answer_modalities=("image",),
                          qtype="ImageQ", modalities=("image",), image_doc_ids=image_ids, text_doc_ids=(), table_id="",
                          supporting=((gold, "image"),))


def test_attach_mmqa_images_reads_the_release_folder_and_counts_what_it_lacks(tmp_path):
    folder = tmp_path / D.MMQA_IMAGE_FOLDER
    folder.mkdir()
    Image.new("RGB", (600, 300), (10, 120, 200)).save(folder / "big.jpg", quality=90)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "clear.png")  # transparent: white, not black
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    images = {"a": D.MMQADoc(id="a", title="Flag", path="big.jpg"), "b": D.MMQADoc(id="b", title="Logo", path="clear.png"),
              "c": D.MMQADoc(id="c", title="Gone", path="gone.jpg"), "d": D.MMQADoc(id="d", title="Bad", path="broken.jpg")}
    rows = D.mmqa_to_rows([_mmqa_image_question("q1", tuple(images), "a")], images)
    attached, report = D.attach_mmqa_images(rows, images, folder, max_side=64)
    by_id = {c["id"]: c for c in attached[0]["candidates"]}
    assert by_id["a"]["image"].size == (64, 32) and by_id["a"]["image"].mode == "RGB"
    assert by_id["b"]["image"].getpixel((0, 0)) == (255, 255, 255)
    assert by_id["c"]["image"] is None and by_id["d"]["image"] is None  # shown as their titles, the question kept
    assert all(c["text"] == c["title"] for c in by_id.values())
    assert (report.attached, report.missing, report.unreadable) == (2, 1, 1)
    said = report.describe()
    assert "2 of 4" in said and f"image c: no file {folder / 'gone.jpg'}" in said and "image d:" in said
    assert all(c["image"] is None for c in rows[0]["candidates"])  # the input rows are left as they were
    assert attached[0]["gold_ids"] == ["a"] and attached[0]["answers"] == ["a star"]
    with pytest.raises(FileNotFoundError, match="final_dataset_images.zip"):
        D.attach_mmqa_images(rows, images, tmp_path / "nowhere")


def test_attach_mmqa_images_on_shared_dev_paths(shared_data, tmp_path):
    """The real metadata's ``path`` names the file in the release's image folder."""
    data = D.load_mmqa(shared_data / "mmqa-dev", "dev")
    rows = D.mmqa_to_rows(data.questions, data.images, data.texts, max_candidates=4)[:2]
    folder = tmp_path / D.MMQA_IMAGE_FOLDER
    folder.mkdir()
    first = rows[0]["candidates"][0]["id"]
    Image.new("RGB", (30, 30), (200, 0, 0)).save(folder / data.images[first].path)
    attached, report = D.attach_mmqa_images(rows, data.images, folder)
    assert attached[0]["candidates"][0]["image"].size == (30, 30)
    images_of_first = sum(c["id"] == first for r in rows for c in r["candidates"])  # questions share images
    assert report.attached == images_of_first and report.missing == sum(len(r["candidates"]) for r in rows) - images_of_first
    shared = [c["image"] for r in attached for c in r["candidates"] if c["id"] == first]
    assert all(im is shared[0] for im in shared)  # one decode per file, however many pools show it
    assert len(report.examples) == len(set(report.examples))


def test_filter_limits_are_inclusive():
    """Exactly the allowed keyword recall, and a fact exactly at the word limit, both pass (mutation run)."""
    half = record(guid="h", qcate="Others", kw="red square", a="It is red.")
    assert D.answer_mentions_keyword(half, 0.5) and not D.answer_mentions_keyword(half, 0.51)
    words = " ".join(["word"] * 12)
    at_limit = record(guid="l", img_pos=((30000000, "Ball", words),), img_neg=())
    assert D.overlong_ids(at_limit, 12) == ([], []) and D.overlong_ids(at_limit, 11) == (["30000000"], [])


def test_a_gpu_preset_says_loudly_when_it_builds_a_synthetic_mini_webqa(tmp_path, capsys):
    """On Colab a lost run folder (a wiped runtime, MMRAG_HOME set only from notebook 03) used to train for hours on
    drawn shapes without a word; the miniature's own course builds its world by design and stays quiet."""
    from mmrag_lite.config import get_preset

    small = {"data.world_questions": 300, "data.world_image_size": 56, "data.max_candidates": 8}
    D.ensure_mini_webqa(get_preset("colab-t4", **small), tmp_path / "gpu")
    note = capsys.readouterr().out
    assert "SYNTHETIC world" in note and str(tmp_path / "gpu") in note and "MMRAG_HOME" in note
    D.ensure_mini_webqa(get_preset("colab-t4", **small), tmp_path / "gpu")  # found and current: nothing to say
    assert "SYNTHETIC" not in capsys.readouterr().out
    D.ensure_mini_webqa(get_preset("cpu-tiny"), tmp_path / "tiny")
    assert "SYNTHETIC" not in capsys.readouterr().out


def test_a_thin_strip_is_too_small_whichever_side_is_short(tmp_path):
    """The size check reads the shorter side: a 4 x 64 strip is as unreadable as a 4 x 4 thumbnail."""
    strip = io.BytesIO()
    Image.new("RGB", (4, 64)).save(strip, format="PNG")
    with ImageStore(write_store(tmp_path, {30000000: strip.getvalue()})) as store:
        assert "too small" in store.check(30000000, min_side=8)


def test_a_wide_banner_is_judged_by_its_own_size_not_its_thumbnail(tmp_path):
    """2000 x 20 passes the store's size check; its 448 x 4 thumbnail must not fail the same check afterwards."""
    banner = io.BytesIO()
    Image.new("RGB", (2000, 20), (0, 0, 200)).save(banner, format="PNG")
    with ImageStore(write_store(tmp_path, {30000000: banner.getvalue(), 30000001: _png()})) as store:
        assert store.check(30000000, min_side=8) is None
        row = D.record_to_row(record(guid="b"), store, 8, MiniWebQAFilters())
        gold = next(c for c in row["candidates"] if c["is_gold"])
        width, height = Image.open(io.BytesIO(gold["image"]["bytes"])).size
        assert width == 448 and height < 8  # stored downscaled below min_image_side, and still kept


def test_sixteen_bit_greyscale_keeps_its_shades():
    """PIL opens a 16-bit PNG as I;16; a plain convert("RGB") clips everything above 255 to white."""
    ramp = np.tile(np.linspace(0, 65535, 64), (8, 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    pixels = np.asarray(D.load_image_bytes(buf.getvalue()))[..., 0]
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255 and len(np.unique(pixels)) == 64
    assert abs(int(pixels[0, 32]) - 130) <= 2  # the middle of the ramp is mid-grey, not white
    dark = np.full((4, 4), 100 * 256, dtype=np.uint16)
    dark[0, 0] = 0
    im = Image.fromarray(dark)
    im.info["transparency"] = 0  # one 16-bit value is transparent, not every value that shifts to 0
    assert D.to_rgb(im).getpixel((0, 0)) == (255, 255, 255) and D.to_rgb(im).getpixel((1, 1)) == (100, 100, 100)


def test_a_guid_with_a_colon_keeps_its_read_error_whole(tmp_path):
    path = tmp_path / "WebQA_train_val.json"
    bad = raw_record(guid="a: b")
    bad["Q"] = 5
    path.write_text(json.dumps({"a: b": bad, "ok": raw_record(guid="ok")}))
    errors: list = []
    assert [r.guid for r in D.iter_webqa(path, errors)] == ["ok"]
    assert errors[0].guid == "a: b" and errors[0].message == "record: 'Q' must be a string, got int"


def test_an_empty_webqa_val_test_split_says_its_questions_were_linked_to_train(tmp_path):
    from mmrag_lite.config import get_preset

    recs = {}
    for i in range(30):  # 6 val questions, each sharing its gold image with a train question
        rec = raw_record(guid=f"g{i}", img_pos=((30000000 + (i - 24 if i >= 24 else i), "Ball", "A ball."),), img_neg=())
        rec["split"] = "val" if i >= 24 else "train"
        recs[f"g{i}"] = rec
    preset = get_preset("cpu-tiny", **{"data.test_split": "webqa_val"})
    with pytest.raises(D.MiniWebQABuildError, match=r"has none; 6 val question\(s\) were removed as linked to a train question"):
        D.build_mini_webqa(write_webqa(tmp_path / "src", recs), tmp_path / "out", settings=preset,
                           filters=MiniWebQAFilters(check_images=False), progress=False)


def test_a_world_made_at_another_image_size_is_not_reused():
    """``--set data.world_image_size=112`` must draw a new world, not reuse the one drawn at the old size."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.data import world as W

    preset = get_preset("cpu-tiny")
    manifest = {"seed": preset.seed, "n_questions": preset.data.world_questions, "image_size": preset.data.world_image_size}
    manifest["drawing"] = W.DRAWING_VERSION
    assert mini._world_matches(manifest, preset)
    assert not mini._world_matches(manifest, preset.with_overrides(**{"data.world_image_size": 112}))


def test_a_world_drawn_by_older_drawing_code_is_redrawn(tmp_path):
    """A run's world from before the touching-shapes fix (its manifest has no ``drawing``) holds ambiguous "how many"
    pictures: the course redraws it, and the Mini-WebQA built on it, instead of reusing them silently."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.data import world as W

    preset = get_preset("cpu-tiny", **{"data.world_questions": 60})
    D.ensure_mini_webqa(preset, tmp_path)
    path = tmp_path / "world" / "world_manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["drawing"] == W.DRAWING_VERSION and D.mini_webqa_is_current(preset, tmp_path) is True
    del manifest["drawing"]
    path.write_text(json.dumps(manifest))
    assert D.mini_webqa_staleness(preset, tmp_path) == [
        "the run's synthetic world is missing or was made with other settings"]
    tsv = (tmp_path / "world" / "imgs.tsv").stat().st_mtime_ns
    D.ensure_mini_webqa(preset, tmp_path)
    assert json.loads(path.read_text())["drawing"] == W.DRAWING_VERSION
    assert (tmp_path / "world" / "imgs.tsv").stat().st_mtime_ns != tsv
    assert D.mini_webqa_is_current(preset, tmp_path) is True


def test_a_distractor_at_the_word_limit_is_kept():
    """The word limit is inclusive for distractors, as for gold: only a longer one is dropped."""
    limit = NO_IMAGES.max_candidate_words
    r = record(img_pos=((30000000, "Ball", "x"),), img_neg=((30000001, "Box", " ".join(["w"] * limit)),
                                                           (30000002, "Bag", " ".join(["w"] * (limit + 1)))))
    ids = [c["id"] for c in mini.record_to_row(r, None, 8, NO_IMAGES)["candidates"]]
    assert "30000001" in ids and "30000002" not in ids


# ------------------------------------------------------------------------- review findings (data layer)
def test_offline_mmqa_pools_hold_no_blank_passages():
    """Without MMQA_texts a passage is a bare id: as a blank candidate it padded ~45% of each pool, so retrieval came
    down to image titles anyway. Pools are now filled with image distractors; with texts they are as before."""
    images = {f"i{n}": D.MMQADoc(id=f"i{n}", title=f"Image title {n}") for n in range(12)}
    passages = tuple(f"t{n}" for n in range(10))
    image_q = D.MMQAQuestion(qid="q1", question="What is in it?", answers=("x",), answer_modalities=("image",),
                             qtype="ImageQ", modalities=("image",), image_doc_ids=tuple(images), text_doc_ids=passages,
                             table_id="", supporting=(("i4", "image"),))
    text_q = D.MMQAQuestion(qid="q2", question="Who wrote it?", answers=("y",), answer_modalities=("text",),
                            qtype="TextQ", modalities=("text",), image_doc_ids=tuple(images), text_doc_ids=passages,
                            table_id="", supporting=(("t3", "text"),))
    rows = D.mmqa_to_rows([image_q, text_q], images, qtypes=None, max_candidates=8)
    assert [r["guid"] for r in rows] == ["q1"]  # a gold passage of unknown text: nothing could retrieve it
    cands = rows[0]["candidates"]
    assert len(cands) == 8 and all(c["modality"] == "image" and c["title"] and c["text"] for c in cands)
    assert rows[0]["gold_ids"] == ["i4"]
    texts = {t: D.MMQADoc(id=t, title=f"Passage {t}", text=f"Text of {t}.") for t in passages}
    with_texts = D.mmqa_to_rows([image_q, text_q], images, texts, qtypes=None, max_candidates=8)
    assert [r["guid"] for r in with_texts] == ["q1", "q2"] and with_texts[1]["gold_ids"] == ["t3"]
    assert all(c["text"] for r in with_texts for c in r["candidates"])
    assert sum(len(r["candidates"]) for r in with_texts) == 16
    assert {c["modality"] for r in with_texts for c in r["candidates"]} == {"image", "text"}  # as before: mixed


def _val(r: D.WebQARecord) -> D.WebQARecord:
    from dataclasses import replace

    return replace(r, split="val")


def test_webqa_val_test_split_is_webqa_val_less_only_bad_and_linked_questions(tmp_path):
    """Category balance used to run on train + val before the hold-out, so it dropped val questions at random and
    the test split was no longer WebQA's val set. Now only the train questions are balanced; the test split loses
    only what the record-level checks and the link check remove, and the funnel still adds up."""
    from mmrag_lite.config import get_preset

    def text_q(guid: str, i: int) -> dict:
        return raw_record(guid=guid, q=f"What color is the ball {guid}?", qcate="text", kw=None, img_pos=(), img_neg=(),
                          txt_pos=((f"Ball {i} is red.", f"Ball {i}"),), a="The ball is red.")

    def number_q(guid: str, i: int) -> dict:
        return raw_record(guid=guid, q=f"How many balls {guid}?", qcate="number", kw="3", a="3 balls",
                          img_pos=((30000000 + i, "Ball", "Three balls."),))

    records: dict = {}
    n = 0
    for split, sizes in (("train", {"text": 20, "color": 8, "number": 8}), ("val", {"text": 10, "color": 4, "number": 4})):
        for qcate, count in sizes.items():
            for _ in range(count):
                n += 1
                guid = f"{split[0]}{n}"
                raw = (text_q(guid, n) if qcate == "text" else number_q(guid, n) if qcate == "number"
                       else raw_record(guid=guid, img_pos=((30000000 + n, "Ball", "A red ball."),)))
                records[guid] = {**raw, "split": split}
    records["vbad"] = {**raw_record(guid="vbad", a="Hard to say.", img_pos=((30000900, "Ball", "x"),)), "split": "val"}
    source = write_webqa(tmp_path / "webqa", records)
    settings = get_preset("cpu-tiny").with_overrides(**{"data.test_split": "webqa_val"})
    dd, report = D.build_mini_webqa(source, None, settings=settings, filters=NO_IMAGES, progress=False)
    val_guids = {g for g, r in records.items() if r["split"] == "val"}
    assert set(dd["test"]["guid"]) == val_guids - {"vbad"}  # every good val question, none lost to balancing
    steps = {s.name: s for s in report.steps}
    assert steps["category_balance"].removed > 0 and not set(steps["category_balance"].examples) & val_guids
    train = Counter(q for s in ("train", "validation") for q in dd[s]["qcate"])
    assert max(train.values()) <= 0.4 * sum(train.values())  # the train questions are balanced
    assert [s.name for s in report.steps][-2:] == ["linked_to_train", "category_balance"]
    for before, after in zip(report.steps, report.steps[1:]):  # the funnel adds up, step by step
        assert after.before == before.kept and after.kept == after.before - after.removed
    assert report.n_kept == sum(report.splits.values()) == sum(len(v) for v in dd.values())


def test_the_default_pooled_build_is_unchanged_by_the_webqa_val_fix(world):
    """test_split="pooled" balances before the split as it always did: same rows as balancing by hand."""
    dd, report = D.build_mini_webqa(world, None, settings="cpu-tiny", progress=False, workers=1)
    records = D.read_webqa(world / "WebQA_train_val.json").records
    with ImageStore(world) as store:
        kept = D.filter_records(records, MiniWebQAFilters(), store)
    expected = D.split_records(kept, MiniWebQAFilters().split_fractions)
    assert {s: list(dd[s]["guid"]) for s in D.SPLITS} == {s: [r.guid for r in rs] for s, rs in expected.items()}
    assert report.steps[-1].name == "category_balance" and "linked_to_train" not in {s.name for s in report.steps}


def test_a_fraction_cap_that_would_collapse_the_categories_is_refused():
    """828 YesNo, 2455 text and 1 shape at max_qcate_fraction=0.4 used to come out as 2, 2 and 1: the small
    category cannot make up the rest, so the cap falls to its size. A cap that removes more than half the questions
    is a setting to change; it is refused with the sizes and the setting named."""
    def recs(qcate: str, count: int) -> list[D.WebQARecord]:
        return [D.WebQARecord(f"{qcate}{i}", f"{qcate} question {i}?", ("a",), qcate, "", "train") for i in range(count)]

    skewed = recs("YesNo", 83) + recs("text", 245) + recs("shape", 1)
    report = FunnelReport("t")
    with pytest.raises(D.MiniWebQABuildError, match=r"would remove 324 of 329.*max_qcate_fraction=0.4.*'shape': 1.*"
                                                    r"'text': 245.*max_qcate_fraction=None") as err:
        D.balance_categories(skewed, MiniWebQAFilters(), report)
    assert err.value.report is report
    assert len(D.balance_categories(skewed, MiniWebQAFilters(max_qcate_fraction=None))) == 329
    assert len(D.balance_categories(skewed, MiniWebQAFilters(max_qcate_fraction=0.8))) == 329  # 245 <= 0.8 * 329
    even = recs("YesNo", 50) + recs("text", 90) + recs("shape", 40)  # an ordinary cap still applies
    assert Counter(r.qcate for r in D.balance_categories(even, MiniWebQAFilters())) == {"YesNo": 50, "text": 60,
                                                                                        "shape": 40}


def _png_with(mode: str, size: int = 8) -> bytes:
    """A fully transparent image whose colour under the alpha is black (what most encoders store)."""
    buf = io.BytesIO()
    if mode == "P":
        im = Image.new("P", (size, size), 0)
        im.putpalette([0, 0, 0] * 256)
        im.save(buf, format="PNG", transparency=0)
    else:
        Image.new(mode, (size, size), (0, 0, 0, 0) if mode == "RGBA" else (0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white_not_black(tmp_path, mode):
    """``convert("RGB")`` kept the black under transparent pixels: a logo on a transparent background became a black
    square. They are laid on white now, in the store, the tolerant decode and the stored (downscaled) bytes."""
    data = _png_with(mode, size=16)
    assert D.load_image_bytes(data).getpixel((3, 3)) == (255, 255, 255)
    with ImageStore(write_store(tmp_path, {30000000: data})) as store:
        assert store.get(30000000).getpixel((0, 0)) == (255, 255, 255)
    payload, size, _ = mini._image_payload(data, 8, 30000000)  # downscaled: re-encoded from the RGB image
    assert size == (8, 8) and Image.open(io.BytesIO(payload)).convert("RGB").getpixel((1, 1)) == (255, 255, 255)
    half = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert D.to_rgb(half).getpixel((0, 0)) == (255, 127, 127)  # half-transparent red on white: pink
    opaque = Image.new("RGB", (2, 2), (10, 20, 30))
    assert D.to_rgb(opaque).getpixel((0, 0)) == (10, 20, 30) and D.to_rgb(opaque) is not opaque


def test_negative_answers_without_no_are_verdicts():
    """"not" / "n't" state a "no": "It is not." answers a yes/no text question, "The portraits were not always
    there." a YesNo one. A negation about something else ("That is not mentioned anywhere.") is still no answer."""
    romanesco = (("Romanesco is an Italo-Romance dialect, not a Uralic language.", "Romanesco dialect"),)
    q = "Is the Romanesco dialect part of Uralic languages?"
    for answer in ("It is not.", "It isn't.", "They aren't."):
        assert D.answer_mentions_keyword(record(q=q, a=answer, qcate="text", kw=None, img_pos=(), txt_pos=romanesco)), answer
    portraits = "Were the portraits outside Bundesarchiv building always there?"
    assert D.answer_mentions_keyword(record(q=portraits, a="The portraits were not always there.", qcate="YesNo", kw=None))
    for non_answer in ("That is not mentioned anywhere.", "I do not know the painter."):
        assert not D.answer_mentions_keyword(record(q=portraits, a=non_answer, qcate="YesNo", kw=None)), non_answer
        assert not D.answer_mentions_keyword(record(q=q, a=non_answer, qcate="text", kw=None, img_pos=(), txt_pos=romanesco))


def test_a_corrupt_lineidx_names_the_file_and_the_line(tmp_path):
    folder = write_store(tmp_path, {30000000 + i: _png() for i in range(3)})
    lineidx = folder / "imgs.lineidx"
    offsets = lineidx.read_text().split()
    for bad in ("12abc", "-5", "9" * 30):
        lineidx.write_text(f"{offsets[0]}\n{offsets[1]}\n{bad}\n")
        with pytest.raises(D.ImageStoreFormatError, match=rf"imgs.lineidx line 3: '{bad[:20]}.*not a byte offset"):
            D.read_lineidx(lineidx)
        with pytest.raises(ValueError, match="imgs.lineidx line 3"):  # still a ValueError, as before
            ImageStore(folder)


def test_a_store_whose_lineidx_does_not_index_its_tsv_is_refused_when_opened(tmp_path):
    """CRLF line endings (a Windows copy) or another copy's lineidx misplace every image: each look-up used to fail
    on its own and the build then blamed the source. Opening the store now probes a few offsets and says so once."""
    images = {30000000 + i: _png((i, 0, 0), size=8 + i) for i in range(20)}
    crlf = write_store(tmp_path / "crlf", images)
    (crlf / "imgs.tsv").write_bytes((crlf / "imgs.tsv").read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(D.ImageStoreFormatError, match=r"imgs.tsv and .*imgs.lineidx do not match.*CRLF"):
        ImageStore(crlf)
    other = write_store(tmp_path / "other", images)
    write_store(tmp_path / "copy", {i: _png((0, i % 250, 0), size=6) for i in images})  # shorter lines
    (other / "imgs.lineidx").write_bytes((tmp_path / "copy" / "imgs.lineidx").read_bytes())
    with pytest.raises(D.ImageStoreFormatError, match="do not match.*same copy") as err:
        ImageStore(other)
    assert "CRLF" not in str(err.value)
    write_webqa(other, questions(10))
    with pytest.raises(D.MiniWebQABuildError, match=r"cannot build Mini-WebQA from .*other.*do not match"):
        D.build_mini_webqa(other, None, progress=False)
    with ImageStore(write_store(tmp_path / "good", images)) as store:  # a matching pair opens as before
        assert store.get(30000019).size == (27, 27)


def test_a_cut_question_file_is_named_plainly_in_the_funnel(tmp_path):
    """A truncated WebQA_train_val.json built silently, its funnel saying only "unreadable removed 1". The records
    before the cut are still kept, and the funnel (and funnel.json) now says where the file ends."""
    text = json.dumps(questions(40))
    source = tmp_path / "webqa"
    source.mkdir()
    (source / "WebQA_train_val.json").write_text(text[: int(len(text) * 0.9)])
    with pytest.warns(UserWarning, match="keeping the records before it"):
        dd, report = D.build_mini_webqa(source, tmp_path / "out", filters=NO_IMAGES, progress=False)
    n = report.steps[0].kept
    assert 30 <= n < 40 and sum(len(v) for v in dd.values()) == report.n_kept
    assert report.steps[0].before == n and report.steps[0].removed == 0  # the break is no record in the counts
    assert len(report.warnings) == 1
    assert re.match(rf"WebQA_train_val.json: the file ends mid-record after {n} records \(the last whole one: g{n}\)",
                    report.warnings[0])
    assert f"WARNING: {report.warnings[0]}" in str(report).splitlines()[1]
    assert FunnelReport.load(tmp_path / "out").warnings == report.warnings
    broken = text.replace('"g20": {', '"g20": {::', 1)  # a syntax error, not a cut: named as such
    (source / "WebQA_train_val.json").write_text(broken)
    with pytest.warns(UserWarning, match="breaks off"):
        _, report = D.build_mini_webqa(source, None, filters=NO_IMAGES, progress=False)
    assert "breaks off (invalid JSON) after 19 records" in report.warnings[0]
    _, whole = D.build_mini_webqa(write_webqa(tmp_path / "whole", questions(10)), None, filters=NO_IMAGES, progress=False)
    assert whole.warnings == [] and "WARNING" not in str(whole)


def test_bytes_that_are_not_utf8_break_the_file_like_broken_json(tmp_path):
    """Real WebQA holds raw non-ASCII text ("Grądy-Woniecko"): a download cut inside a multi-byte character, or one
    corrupt byte, raised a bare UnicodeDecodeError that named neither file nor record and lost every record."""
    records = {f"g{i}": raw_record(guid=f"g{i}", img_pos=((30000000 + i, "Grądy", "A red ball."),)) for i in range(1, 41)}
    raw = json.dumps(records, ensure_ascii=False).encode("utf-8")
    cut_at = raw.index("Grądy".encode(), len(raw) // 2) + 3  # inside the two bytes of "ą"
    corrupt = raw[:cut_at] + b"\xff" + raw[cut_at + 1:]
    for name, content, what in [("cut", raw[:cut_at], "ends mid-record"), ("corrupt", corrupt, "breaks off")]:
        source = tmp_path / name
        source.mkdir()
        (source / "WebQA_train_val.json").write_bytes(content)
        errors: list = []
        with pytest.warns(UserWarning, match="not UTF-8"):
            kept = list(D.iter_webqa(source / "WebQA_train_val.json", errors))
        assert 15 <= len(kept) < 40 and kept[0].guid == "g1"
        assert errors[-1].file_break and what in errors[-1].message and f"last whole one: {kept[-1].guid}" in errors[-1].message
        with pytest.raises(D.WebQAFormatError, match=r"WebQA_train_val.json: bytes that are not UTF-8 .*in record"):
            list(D.iter_webqa(source / "WebQA_train_val.json", strict=True))
    # a bad byte right after a whole record (in place of its comma) loses no record before it, whatever the reads
    after_g9 = raw.index(b', "g10"')
    broken = tmp_path / "after_g9.json"
    broken.write_bytes(raw[:after_g9] + b"\xff" + raw[after_g9 + 1:])
    for chunk in (7, 1 << 20):
        got = []
        with pytest.raises(D.WebQAFormatError, match="not UTF-8 .*after record 'g9'"):
            for guid, _ in D.iter_raw_records(broken, chunk_chars=chunk):
                got.append(guid)
        assert got == [f"g{i}" for i in range(1, 10)], chunk
    whole = tmp_path / "whole.json"
    whole.write_bytes(raw)  # reads of a few bytes split "ą" between two of them: still decoded whole
    assert [v for _, v in D.iter_raw_records(whole, chunk_chars=7)] == list(records.values())


def test_a_mostly_missing_truncated_image_is_refused():
    """PIL's tolerance decoded a file cut to a few percent as a picture that is mostly fill; the gold-image check
    passed it. Less than a tenth of the rows decoded is now unreadable, and so is less than a quarter that is nearly
    all blank (a real render cut to 2% of its bytes decoded only its white top margin); a file cut near its end still
    reads."""
    import random

    rng = random.Random(0)
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(rng.getrandbits(8) for _ in range(64 * 64 * 3))).save(buf, "PNG")
    png = buf.getvalue()
    with pytest.raises(ImageDecodeError, match=r"image 7: truncated: only about \d+% of its rows decoded"):
        D.load_image_bytes(png[: len(png) // 30], 7)
    assert D.load_image_bytes(png[: len(png) * 9 // 10], 7).size == (64, 64)
    assert D.decoded_share(D.load_image_bytes(png)) == 1.0
    margin = Image.new("RGB", (64, 64), (255, 255, 255))  # a blank top margin, then the picture
    margin.paste(Image.frombytes("RGB", (64, 52), bytes(rng.getrandbits(8) for _ in range(64 * 52 * 3))), (0, 12))
    buf = io.BytesIO()
    margin.save(buf, "PNG")
    png = buf.getvalue()
    with pytest.raises(ImageDecodeError, match=r"about 2\d% of its rows decoded, nearly all of them blank"):
        D.load_image_bytes(png[: png.index(b"IDAT") + 400], 7)  # the margin and a row of the picture


def test_a_source_without_images_is_refused_before_the_run_folder_exists(tmp_path):
    """ensure_mini_webqa checks the source before it makes the run folder or takes its lock: nothing is left behind."""
    without_images = write_webqa(tmp_path / "text_only", questions(12))
    with pytest.raises(FileNotFoundError, match="has no imgs.tsv.*check_images=False"):
        D.ensure_mini_webqa("cpu-tiny", tmp_path / "run2", webqa_dir=without_images)
    assert not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------------------ review fixes (data layer)
def _noisy_png(size: int = 64, seed: int = 0) -> bytes:
    """A PNG of noise: its bytes spread evenly over its rows, so a file cut to 60% of its bytes decodes ~60% of them."""
    import random

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))).save(buf, "PNG")
    return buf.getvalue()


def _strictly_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def big_world(tmp_path_factory) -> Path:
    """1,200 questions: enough for a few truncated gold images and a test split of over 100 val questions."""
    return D.make_world(tmp_path_factory.mktemp("bw") / "world", n_questions=1200, seed=0, progress=False)


def test_a_cut_gold_image_must_show_nearly_all_its_rows(tmp_path, big_world):
    """A gold image cut to 60% of its rows passed the broken-image rule (meant for distractors: a tenth of the rows)
    and was stored with PIL's black fill as picture: a counting question then showed fewer objects than its answer.
    A gold image now needs min_gold_decoded_share (0.9) of its rows; a cut distractor is still kept; a kept cut image
    is stored cut to the rows that decoded, without the fill."""
    png = _noisy_png()
    folder = write_store(tmp_path, {30000000: png, 30000001: png[: len(png) * 6 // 10],
                                    30000002: png[: len(png) * 97 // 100]})
    recs = [record(guid="whole"), record(guid="cut60", img_pos=((30000001, "Ball", "x"),), img_neg=()),
            record(guid="cut97", img_pos=((30000002, "Ball", "x"),), img_neg=())]
    with ImageStore(folder) as store:
        assert store.check(30000001) is None  # as any image (a distractor, the viewer): readable
        assert re.search(r"truncated: only about 59% of its rows decoded \(at least 90% needed\)",
                         store.check(30000001, min_decoded_share=0.9))
        report = FunnelReport("t")
        kept = D.filter_records(recs, MiniWebQAFilters(max_qcate_fraction=None), store, report)
        assert [r.guid for r in kept] == ["whole", "cut97"]
        assert {s.name: s.examples for s in report.steps}["broken_gold_image"] == ["cut60"]
        # the row builder applies the same rule to gold images when the check is off, not to distractors
        with pytest.raises(ImageDecodeError, match="at least 90% needed"):
            D.record_to_row(recs[1], store, 8, NO_IMAGES)
        def stored(rec: D.WebQARecord, image_id: str) -> Image.Image:
            row = D.record_to_row(rec, store, 8, MiniWebQAFilters())
            return Image.open(io.BytesIO(next(c for c in row["candidates"] if c["id"] == image_id)["image"]["bytes"]))

        distractor = stored(record(guid="x", img_neg=((30000001, "Box", "x"),)), "30000001")
        gold = stored(recs[2], "30000002")
    assert distractor.size == (64, 38) and gold.size == (64, 62)  # the decoded rows (59% and 97% of 64), no fill
    assert D.decoded_share(distractor) == D.decoded_share(gold) == 1.0
    # the world cuts its truncated images to 60% of their bytes: each question with such a gold image is removed
    with ImageStore(big_world) as store:
        records = D.read_webqa(big_world / "WebQA_train_val.json").records
        kept = D.filter_records(records, MiniWebQAFilters(max_qcate_fraction=None), store)

        def cut_gold(r: D.WebQARecord) -> bool:
            data = [store.get_bytes(f.image_id) for f in r.img_pos if store.check(f.image_id) is None]
            return any(not _strictly_decodes(b) for b in data)  # readable as a distractor, but cut

        assert sum(map(cut_gold, records)) >= 2 and not any(map(cut_gold, kept))


def test_a_lineidx_for_another_tsv_is_refused_not_read_as_missing_images(tmp_path):
    """An imgs.lineidx shifted by one line (or made for another tsv) passed the open-time probe, which only checked
    that each offset starts a line: every look-up then failed, and the build came out text-only without a warning.
    The probed lines must now hold the ids of their rows; an empty index of a non-empty tsv is refused; and a build
    whose gold images are mostly not in the store stops and says why."""
    images = {30000000 + i: _png((i, 0, 0), size=8 + i) for i in range(20)}
    folder = write_store(tmp_path / "shifted", images)
    lineidx = folder / "imgs.lineidx"
    lineidx.write_text("".join(lineidx.read_text().splitlines(keepends=True)[1:]))  # tail -n +2
    with pytest.raises(D.ImageStoreFormatError, match=r"row 0 of imgs.lineidx points at the line of image 30000001.*"
                                                      r"shifted by 1 line"):
        ImageStore(folder)
    write_webqa(folder, questions(12))
    with pytest.raises(D.MiniWebQABuildError, match="cannot build Mini-WebQA.*do not match"):
        D.build_mini_webqa(folder, None, progress=False)
    lineidx.write_text("")
    with pytest.raises(D.ImageStoreFormatError, match=r"imgs.lineidx is empty, but imgs.tsv holds \d"):
        ImageStore(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "imgs.tsv").write_bytes(b"")
    (empty / "imgs.lineidx").write_text("")
    with ImageStore(empty) as store:  # an empty store is consistent: it just holds nothing
        assert len(store) == 0 and 30000000 not in store
    # a minority of rows holding another id (a gap in the ids) is let through: row 5 of 20 is one probe of 8
    gap = dict(images)
    del gap[30000005]
    gap = {**{k: v for k, v in gap.items() if k < 30000005}, 30000099: _png(), **{k: v for k, v in gap.items() if k > 30000005}}
    with ImageStore(write_store(tmp_path / "gap", gap)) as store:
        assert store.get(30000019).size == (27, 27) and 30000005 not in store
    # ids that match their rows but are not the question file's (another dataset's store): the probe cannot tell,
    # the build can: nearly every gold image is "not in the store", which is no text-only Mini-WebQA
    other = write_webqa(write_store(tmp_path / "other", {40000000 + i: _png() for i in range(20)}), questions(12))
    for filters in (MiniWebQAFilters(), NO_IMAGES):
        with pytest.raises(D.MiniWebQABuildError, match=r"12 of the 12 gold images are not in the image store .*"
                                                        r"image 300000\d+: the line at offset \d+ holds id b.400000.*made for another imgs.tsv"):
            D.build_mini_webqa(other, tmp_path / "out", filters=filters, progress=False)
    assert not (tmp_path / "out").exists()
    cut = write_webqa(write_store(tmp_path / "cut", {30000000 + i: _png() for i in range(4)}), questions(12))
    with pytest.raises(D.MiniWebQABuildError, match=r"imgs.lineidx is cut short: it has 4 lines"):
        D.build_mini_webqa(cut, None, progress=False)


FORK_READS = 20_000  # per child: enough that, sharing one file position, the children collide every run
_FORKED: dict = {}  # what forked children inherit: passing the store to them would pickle it (and reopen the file)


def _read_in_child(seed: int) -> int:
    import random

    store, expected = _FORKED["store"], _FORKED["expected"]
    rng = random.Random(seed)
    ids = sorted(expected)
    wrong = 0
    for _ in range(FORK_READS):
        image_id = rng.choice(ids)
        try:
            wrong += store.get_bytes(image_id) != expected[image_id]
        except D.ImageStoreError:
            wrong += 1
    return wrong


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="no fork here")
def test_an_image_store_reads_right_in_forked_processes(world):
    """DataLoader workers are forked: they share the parent's open tsv and so its file position, and a seek in one
    moved the others' reads (164 of 12,000 reads failed in four forked workers after the parent read one image).
    Lines are now read with os.pread, which uses no shared position."""
    import multiprocessing

    with ImageStore(world) as store:
        ids = [30000000 + i for i in range(0, len(store), 3)]
        expected = {}
        for image_id in ids:
            try:
                expected[image_id] = store.get_bytes(image_id)  # the parent opens the file before the fork
            except D.ImageStoreError:
                continue
        _FORKED.update(store=store, expected=expected)
        try:
            with multiprocessing.get_context("fork").Pool(4) as pool:
                wrong = pool.map(_read_in_child, range(4))
        finally:
            _FORKED.clear()
        assert wrong == [0, 0, 0, 0]
        assert all(store.get_bytes(i) == expected[i] for i in list(expected)[:50])  # the parent reads right too


def test_world_titles_hold_no_colour_shape_or_number_word(world):
    """"Golden", "Green", "Silver" and "Square" were title words: a colour question's reference answer about "the
    Golden Museum of Rosa" names two colours and scored 0.667 QA-Acc against its own keyword (~11% of colour and ~2%
    of shape questions). No title word may be in the metric's vocabularies, and every colour / shape / number
    reference answer of the world scores 1.0 against its keyword."""
    from mmrag_lite import metrics
    from mmrag_lite.data import world as W

    vocab = metrics.COLOR_SET | metrics.SHAPE_SET | metrics.YESNO_SET | mini._COLOR_WORDS | mini._SHAPE_WORDS
    words = [w for group in (W.ADJECTIVES, W.PLACES, W.NAMES) for w in group]
    assert not [w for w in words if w.lower() in vocab or metrics.normalize_webqa_text(w) in vocab]

    def is_number(word: str) -> bool:
        try:
            metrics.word_to_num(word.lower())
            return True
        except ValueError:
            return False

    assert not [w for w in words if is_number(w) or w.lower() in mini._NUMBER_WORDS]
    recs = [r for r in D.read_webqa(world / "WebQA_train_val.json").records
            if r.qcate in ("color", "shape", "number") and r.keywords and D.answer_mentions_keyword(r)]
    assert Counter(r.qcate for r in recs).keys() == {"color", "shape", "number"}
    scores = metrics.webqa_accuracy_batch([r.answer for r in recs], [r.keywords for r in recs], [r.qcate for r in recs])
    assert [(r.question, r.answer, s) for r, s in zip(recs, scores) if s < 0.999] == []  # 1 up to the F1 epsilon


def test_a_rewording_of_a_question_about_the_same_gold_is_dropped(world, built):
    """The duplicate step matched exact text only: 79 planted rewordings ("In the Sunny Museum of Rosa, what color
    are the squares?" beside "What color are the squares in the Sunny Museum of Rosa?", one pool, one answer) were
    kept next to their originals. Step reworded_duplicate drops a later question with the same near-duplicate key
    and the same gold sources; a rewording about another gold source is another question and stays."""
    recs = [record(guid="a", q="What color are the squares in the Sunny Museum of Rosa?"),
            record(guid="b", q="In the Sunny Museum of Rosa, what color are the squares?"),  # same gold: dropped
            record(guid="c", q="In the Sunny Museum of Rosa, the squares are what color?",
                   img_pos=((30000005, "Museum", "x"),)),  # another gold image: kept
            record(guid="d", q="Who founded the Museum?", qcate="text", kw=None, img_pos=(),
                   a="Rosa founded it.", txt_pos=(("The Museum was founded by Rosa.", "Museum"),)),
            record(guid="e", q="The Museum: who founded it?", qcate="text", kw=None, img_pos=(),  # same fact, new id
                   a="Rosa founded it.", txt_pos=(("The Museum was founded by Rosa.", "Museum"),))]
    kept, removed = _run(recs)
    assert kept == ["a", "c", "d"] and removed["reworded_duplicate"] == 2 and removed["duplicate_question"] == 0
    assert list(removed).index("reworded_duplicate") == list(removed).index("duplicate_question") + 1
    assert "same gold sources" in D.FILTER_REASONS["reworded_duplicate"]
    assert _run(recs, drop_duplicates=False)[0] == ["a", "b", "c", "d", "e"]
    # the world's planted rewordings: none survives beside its original
    _, dd, report = built
    copies = D.read_world_manifest(world)["copies"]
    guids = {g for s in dd for g in dd[s]["guid"]}
    both = [c for c, info in copies.items() if info["kind"] == "near_duplicate" and c in guids and info["of"] in guids]
    assert both == [] and {s.name: s.removed for s in report.steps}["reworded_duplicate"] > 0


def test_rebuilding_a_mini_webqa_keeps_the_users_other_files(tmp_path):
    """A folder holding dataset_dict.json and funnel.json was replaced whole, with whatever else the user had put
    in it; now such files are named and the rebuild refused. A file browser's .DS_Store does not count."""
    source = write_webqa(tmp_path / "webqa", questions(10))
    out = tmp_path / "mini"
    D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)
    (out / ".DS_Store").write_text("")
    D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)  # only what the builder wrote: replaced
    (out / "my_analysis.ipynb").write_text("{}")
    (out / "plots").mkdir()
    with pytest.raises(FileExistsError, match=r"holds a Mini-WebQA and also files it did not write "
                                              r"\('my_analysis.ipynb', 'plots'\).*would delete them"):
        D.build_mini_webqa(source, out, filters=NO_IMAGES, progress=False)
    assert (out / "my_analysis.ipynb").read_text() == "{}" and (out / "plots").is_dir()
    assert _names(out) == sorted(["dataset_dict.json", "funnel.json", "my_analysis.ipynb", "plots", "test", "train",
                                  "validation"])  # (the .DS_Store went with the replaced folder)


def test_the_webqa_val_test_split_comes_in_a_seeded_order(big_world):
    """The held-out val questions came out grouped by near-duplicate key, and evaluation reads the first
    evaluation.questions of the test split: a GPU preset's 300 questions were all number questions on real val.
    They are now shuffled with the build's seed, so any first N is a fair sample of the categories."""
    from mmrag_lite.config import get_preset

    preset = get_preset("cpu-tiny").with_overrides(**{"data.test_split": "webqa_val"})
    dd, _ = D.build_mini_webqa(big_world, None, settings=preset, filters=NO_IMAGES, progress=False)
    test = dd["test"]
    keys = [D.near_dup_key(q) for q in test["question"]]
    assert len(keys) >= 100 and keys != sorted(keys) and keys != sorted(keys, reverse=True)
    whole = Counter(test["qcate"])
    for n in (len(test) // 4, len(test) // 2):
        prefix = Counter(test["qcate"][:n])
        gap = sum(abs(prefix[c] / n - whole[c] / len(test)) for c in whole) / 2  # total variation distance
        assert gap < 0.15, (n, prefix, whole)
    again, _ = D.build_mini_webqa(big_world, None, settings=preset, filters=NO_IMAGES, progress=False)
    assert again["test"]["guid"] == test["guid"]  # seeded: the same order every build


# ------------------------------------------------------------------ mutation run on mini.py (filters, funnel, splits)
def _sized_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (0, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_each_quality_filter_obeys_its_own_switch_and_threshold():
    """require_answer_keyword=False keeps an answer without its keyword (and the step leaves the funnel);
    min_keyword_recall is the share the filter applies, not a fixed 0.5."""
    recs = [record(guid="ok"), record(guid="miss", a="Hard to say."),
            record(guid="half", qcate="Others", kw="red square", a="It is red.")]
    kept, removed = _run(recs)
    assert kept == ["ok", "half"] and removed["answer_misses_keyword"] == 1
    kept, removed = _run(recs, require_answer_keyword=False)
    assert kept == ["ok", "miss", "half"] and "answer_misses_keyword" not in removed
    kept, removed = _run(recs, min_keyword_recall=0.6)
    assert kept == ["ok"] and removed["answer_misses_keyword"] == 2


def test_the_funnel_lists_every_enabled_step_in_order_even_when_it_removes_nothing():
    """A step that removes nothing is still a row of the funnel (a reader must see that it ran); the counts chain."""
    report = FunnelReport("t")
    kept = D.filter_records([record(guid="a"), record(guid="b", q="What color is the box?")],
                            MiniWebQAFilters(check_images=False, max_qcate_fraction=None), report=report)
    assert [r.guid for r in kept] == ["a", "b"]
    assert [(s.name, s.before, s.removed, s.kept) for s in report.steps] == [
        (name, 2, 0, 2) for name in ("no_gold_source", "answer_misses_keyword", "overlong_gold", "duplicate_question",
                                     "reworded_duplicate", "category_balance")]


def test_a_gold_image_is_judged_by_its_shorter_side_and_min_image_side_is_inclusive(tmp_path):
    """An 8 x 8 gold image passes min_image_side=8 (the limit is inclusive), a 7-px strip fails whichever side is
    short, and a larger min_image_side is the one applied."""
    folder = write_store(tmp_path, {30000000: _sized_png(8, 8), 30000001: _sized_png(7, 64),
                                    30000002: _sized_png(64, 7)})
    recs = [record(guid=f"g{i}", img_pos=((30000000 + i, "Ball", "x"),), img_neg=()) for i in range(3)]
    with ImageStore(folder) as store:
        report = FunnelReport("t")
        kept = D.filter_records(recs, MiniWebQAFilters(max_qcate_fraction=None), store, report)
        assert [r.guid for r in kept] == ["g0"]
        assert {s.name: s.examples for s in report.steps}["broken_gold_image"] == ["g1", "g2"]
        assert D.filter_records(recs, MiniWebQAFilters(max_qcate_fraction=None, min_image_side=9), store) == []


def test_a_thin_distractor_image_is_dropped_from_the_pool_and_counted(tmp_path):
    """A 4 x 64 distractor is too small on its short side: skipped and counted, the rest of the pool kept."""
    folder = write_store(tmp_path, {30000000: _png(), 30000001: _sized_png(4, 64), 30000002: _png(size=12)})
    rec = record(guid="x", img_neg=((30000001, "Strip", "x"), (30000002, "Box", "y")))
    counts: Counter = Counter()
    with ImageStore(folder) as store:
        row = D.record_to_row(rec, store, 8, MiniWebQAFilters(), counts=counts)
    assert sorted(c["id"] for c in row["candidates"]) == ["30000000", "30000002", "x_10"]
    assert counts["broken_distractor_image"] == 1 and row["gold_ids"] == ["30000000"]


def test_a_gold_candidate_is_never_dropped_from_its_pool_for_length():
    """The pool builder drops overlong distractors only: an overlong gold candidate stays (the overlong_gold step is
    what removes such questions, and a row without its gold would have nothing to retrieve)."""
    long_text = " ".join(["word"] * 20)
    rec = record(guid="g", img_pos=((30000000, "Ball", long_text),),
                 img_neg=((30000001, "Box", long_text), (30000002, "Cup", "A cup.")))
    counts: Counter = Counter()
    row = D.record_to_row(rec, None, 8, MiniWebQAFilters(check_images=False, max_candidate_words=10), counts=counts)
    assert row["gold_ids"] == ["30000000"] and "30000001" not in [c["id"] for c in row["candidates"]]
    assert counts["overlong_distractor"] == 1


def test_gold_less_rewordings_are_not_reworded_duplicates():
    """With require_gold=False a question without gold sources has none to share: its rewording stays (only an
    exact duplicate goes); with gold sources the same pair is one sample twice."""
    q1, q2 = "What color are the squares in the Museum?", "In the Museum, what color are the squares?"
    gold_less = [record(guid="a", q=q1, img_pos=()), record(guid="b", q=q2, img_pos=()),
                 record(guid="c", q=q1 + " ", img_pos=())]
    kept, removed = _run(gold_less, require_gold=False)
    assert kept == ["a", "b"] and removed["duplicate_question"] == 1 and removed["reworded_duplicate"] == 0
    kept, removed = _run([record(guid="a", q=q1), record(guid="b", q=q2)])
    assert kept == ["a"] and removed["reworded_duplicate"] == 1


def test_category_balance_is_a_seeded_sample_not_the_first_questions():
    """Which questions stay is drawn with the seed: the same seed keeps the same ones, other seeds others, and not
    simply the first ``cap`` of the file."""
    recs = [record(guid=f"c{i}", q=f"What color is ball{i}?") for i in range(10)] + [
        record(guid=f"n{i}", q=f"How many balls{i}?", qcate="number", kw="3", a="3 balls") for i in range(3)]
    filters = MiniWebQAFilters(check_images=False, max_qcate_fraction=None, max_per_qcate=3)

    def kept(seed: int) -> tuple[str, ...]:
        return tuple(r.guid for r in D.balance_categories(recs, filters, seed=seed))

    draws = {seed: kept(seed) for seed in range(6)}
    assert all(sum(g.startswith("c") for g in k) == 3 and sum(g.startswith("n") for g in k) == 3
               for k in draws.values())
    assert kept(2) == draws[2] and len(set(draws.values())) > 1
    assert any(k[:3] != ("c0", "c1", "c2") for k in draws.values())


def test_a_fraction_cap_removing_just_over_half_is_refused_and_exactly_half_is_applied():
    """MAX_BALANCE_LOSS is a share of the questions: 6 of 12 removed (8 text, 2 YesNo, 2 shape at 0.4) is applied,
    6 of 11 (8, 2, 1) is refused."""
    def recs(sizes: dict[str, int]) -> list[D.WebQARecord]:
        return [D.WebQARecord(f"{q}{i}", f"{q} question {i}?", ("a",), q, "", "train")
                for q, n in sizes.items() for i in range(n)]

    half = D.balance_categories(recs({"text": 8, "YesNo": 2, "shape": 2}), MiniWebQAFilters())
    assert Counter(r.qcate for r in half) == {"text": 2, "YesNo": 2, "shape": 2}
    with pytest.raises(D.MiniWebQABuildError, match="would remove 6 of 11"):
        D.balance_categories(recs({"text": 8, "YesNo": 2, "shape": 1}), MiniWebQAFilters())


def test_splits_are_seeded_and_do_not_depend_on_record_order():
    """Another seed deals the groups differently; the same records in another order (pairs linked by a gold image
    among them) give the same splits."""
    recs = [record(guid=f"q{i}", q=f"What color is ball{i}?", img_pos=((31000000 + i // 2, "t", "c"),))
            for i in range(40)]

    def assignment(rs, seed):
        return {r.guid: name for name, part in D.split_records(rs, (0.8, 0.1, 0.1), seed=seed).items() for r in part}

    by_seed = [assignment(recs, seed) for seed in range(4)]
    assert len({tuple(sorted(a.items())) for a in by_seed}) == 4
    assert all(assignment(list(reversed(recs)), seed) == by_seed[seed] for seed in range(4))


def test_a_category_of_three_questions_reaches_every_split():
    """Dealt by each split's share of its target still missing, three questions of a category go one to each split
    (by the absolute shortfall all three went to train, whose target 2.4 dwarfs 0.3)."""
    recs = [record(guid=f"c{i}", q=f"What color is ball{i}?", img_pos=((31000000 + i, "t", "c"),)) for i in range(40)]
    recs += [record(guid=f"s{i}", q=f"What shape is kite{i}?", qcate="shape", kw="round", a="It is round.",
                    img_pos=((32000000 + i, "t", "c"),)) for i in range(3)]
    for seed in range(4):
        parts = D.split_records(recs, (0.8, 0.1, 0.1), seed=seed)
        assert {k: sum(r.qcate == "shape" for r in v) for k, v in parts.items()} == {
            "train": 1, "validation": 1, "test": 1}, seed


def test_split_proportions_count_questions_not_groups():
    """Linked groups of ten and single questions: each split holds its fraction of the questions (within a group)."""
    recs = [record(guid=f"g{g}x{j}", q=f"What color is ball{g}x{j}?", img_pos=((31000000 + g, "t", "c"),))
            for g in range(8) for j in range(10)]
    recs += [record(guid=f"s{i}", q=f"What color is kite{i}?", img_pos=((32000000 + i, "t", "c"),)) for i in range(20)]
    for seed in range(4):
        sizes = {k: len(v) for k, v in D.split_records(recs, (0.8, 0.1, 0.1), seed=seed).items()}
        assert sum(sizes.values()) == 100
        assert abs(sizes["validation"] - 10) <= 5 and abs(sizes["test"] - 10) <= 5, (seed, sizes)


def test_a_mixed_group_counts_in_its_majority_category():
    """A group of 20 colour questions and 1 shape question (one gold image) is dealt as colour: the 10 other shape
    questions keep the shape share of each split, and validation / test each hold about a tenth of the colour ones."""
    recs = [record(guid=f"c{i}", q=f"What color is ball{i}?", img_pos=((33000000 + i, "t", "c"),)) for i in range(100)]
    recs += [record(guid=f"m{i}", q=f"What color is mixed{i}?", img_pos=((34000000, "t", "c"),)) for i in range(20)]
    recs += [record(guid="ms", q="What shape is the mixed one?", qcate="shape", img_pos=((34000000, "t", "c"),))]
    recs += [record(guid=f"sh{i}", q=f"What shape is kite{i}?", qcate="shape", kw="round", a="It is round.",
                    img_pos=((35000000 + i, "t", "c"),)) for i in range(10)]
    for seed in range(6):
        parts = D.split_records(recs, (0.8, 0.1, 0.1), seed=seed)
        shapes = {k: sum(r.qcate == "shape" for r in v) for k, v in parts.items()}
        assert shapes["validation"] <= 2 and shapes["test"] <= 2, (seed, shapes)


def test_the_build_seed_reaches_balancing_splitting_and_pools(tmp_path):
    """One seed, one Mini-WebQA; another seed balances, splits and shuffles pools differently."""
    def raw(guid: str, qcate: str) -> dict:
        extra = {"number": {"kw": "3", "a": "3 balls"}, "shape": {"kw": "round", "a": "It is round."}}.get(qcate, {})
        n = int(guid[1:])
        return raw_record(guid=guid, q=f"What {qcate} is ball{guid}?", qcate=qcate,
                          img_pos=((30000000 + n, "Ball", "A ball."),),
                          img_neg=tuple((31000000 + 10 * n + k, f"Box {k}", "A box.") for k in range(4)), **extra)

    source = write_webqa(tmp_path / "webqa", {g: raw(g, q) for q, size, start in
                                             (("color", 24, 0), ("number", 8, 100), ("shape", 8, 200))
                                             for g in (f"q{start + i}" for i in range(size))})

    def build(seed: int, **filters):
        dd, _ = D.build_mini_webqa(source, None, filters=MiniWebQAFilters(check_images=False, **filters), seed=seed,
                                   progress=False)
        return {s: {r["guid"]: [c["id"] for c in r["candidates"]] for r in dd[s]} for s in D.SPLITS}

    unbalanced = {seed: build(seed, max_qcate_fraction=None) for seed in (0, 1)}
    assert build(0, max_qcate_fraction=None) == unbalanced[0]
    assert {s: set(p) for s, p in unbalanced[0].items()} != {s: set(p) for s, p in unbalanced[1].items()}
    pools = [{g: ids for p in unbalanced[seed].values() for g, ids in p.items()} for seed in (0, 1)]
    assert pools[0].keys() == pools[1].keys() and pools[0] != pools[1]
    assert all(sorted(pools[0][g]) == sorted(pools[1][g]) for g in pools[0])  # same candidates, another order
    balanced = [{g for p in build(seed).values() for g in p} for seed in (0, 1)]
    assert len(balanced[0]) == len(balanced[1]) < 40 and balanced[0] != balanced[1]


def test_each_pool_is_shuffled_by_its_own_question():
    """Pools of one shape under one seed are not all dealt the same permutation: the gold candidate's slot varies."""
    rows = [D.record_to_row(record(guid=f"p{i}", img_neg=tuple((31000000 + 10 * i + k, "Box", "x") for k in range(4)),
                                   txt_neg=()), None, 8, NO_IMAGES, seed=0) for i in range(12)]
    slots = [next(n for n, c in enumerate(r["candidates"]) if c["is_gold"]) for r in rows]
    assert len(set(slots)) > 1


def test_a_store_missing_exactly_half_the_gold_images_is_not_refused(tmp_path):
    """The wrong-store refusal is for more than MAX_GOLD_NOT_IN_STORE of the gold images: at exactly half the
    questions with a missing gold image are removed and the build goes on."""
    folder = write_store(tmp_path, {30000000: _png(), 30000001: _png()})
    recs = [record(guid="ok", img_neg=()), record(guid="gone", img_pos=((30000009, "Ball", "x"),), img_neg=())]
    with ImageStore(folder) as store:
        assert [r.guid for r in D.filter_records(recs, MiniWebQAFilters(max_qcate_fraction=None), store)] == ["ok"]
        more = recs + [record(guid="gone2", img_pos=((30000008, "Ball", "x"),), img_neg=())]
        with pytest.raises(D.MiniWebQABuildError, match="2 of the 3 gold images are not in the image store"):
            D.filter_records(more, MiniWebQAFilters(max_qcate_fraction=None), store)


def test_answer_filter_edges_restating_half_a_question_titles_and_empty_answers():
    """A yes/no sentence restating exactly half the question's content words is a verdict; a text answer may name
    what only a gold snippet's title says; an empty answer states nothing, whatever the category."""
    recs = [
        record(guid="yn_half", qcate="YesNo", kw=None, q="Does the Mill of Ada have a red roof?",
               a="The mill has a red door."),
        record(guid="yn_quarter", qcate="YesNo", kw=None, q="Does the Mill of Ada have a red roof?",
               a="The mill has a blue door."),
        record(guid="txt_title", qcate="text", kw=None, q="Who wrote the Song of Ada?", a="Lina Berg.", img_pos=(),
               txt_pos=(("The Song of Ada is a poem from 1850.", "Lina Berg"),)),
        record(guid="others_empty", qcate="Others", kw=None, a="  "),
    ]
    kept, removed = _run(recs, drop_duplicates=False)
    assert kept == ["yn_half", "txt_title"] and removed["answer_misses_keyword"] == 2


# ------------------------------------------------------------------ reader edges (found by a mutation run)
def test_strip_quotes_takes_one_wrapping_pair_and_the_spaces_inside_it():
    assert D.strip_quotes('  " What is it? "  ') == "What is it?"
    assert D.strip_quotes('"') == '"'  # a lone quote wraps nothing
    assert D.strip_quotes('"Ada" is a mill') == '"Ada" is a mill'  # quoted at one end only: not wrapped
    assert D.strip_quotes('a "mill"') == 'a "mill"'
    assert D.strip_quotes('""') == ""


def test_each_record_level_schema_rule_is_an_error_naming_its_guid(tmp_path):
    """Every rule of ``parse_record`` refuses its own record, and only it: the good record beside it is kept."""
    def broken(change):
        raw = raw_record(guid="bad")
        change(raw)
        return raw

    cases = {
        "Guid field 'other' differs": lambda r: r.update(Guid="other"),
        "unknown Qcate 'colour'": lambda r: r.update(Qcate="colour"),
        "image_id must be a non-negative integer, got -1": lambda r: r["img_negFacts"][0].update(image_id=-1),
        "image_id must be a non-negative integer, got True": lambda r: r["img_posFacts"][0].update(image_id=True),
        "missing key 'snippet_id'": lambda r: r["txt_negFacts"][0].pop("snippet_id"),
        "missing key 'fact'": lambda r: r["txt_negFacts"][0].pop("fact"),
        "'fact' must be a string, got NoneType": lambda r: r["txt_negFacts"][0].update(fact=None),
        "'Q' must be a string, got NoneType": lambda r: r.update(Q=None),
    }
    for message, change in cases.items():
        path = tmp_path / "WebQA_train_val.json"
        path.write_text(json.dumps({"bad": broken(change), "ok": raw_record(guid="ok")}))
        result = D.read_webqa(path)
        assert [r.guid for r in result] == ["ok"], message
        assert [e.guid for e in result.errors] == ["bad"] and message in result.errors[0].message, message


def test_a_bare_string_answer_and_null_fact_lists_read_as_released(tmp_path):
    raw = raw_record(guid="g1", a="ignored")
    raw["A"] = '"Yes, it is."'  # one answer, not a list
    raw["txt_posFacts"] = None
    r = D.parse_record("g1", raw)
    assert r.answers == ("Yes, it is.",) and r.txt_pos == ()
    # the "Guid" field itself is optional; when present it must match its key
    del raw["Guid"]
    assert D.parse_record("g1", raw).guid == "g1"


def test_gold_ids_list_gold_snippets_after_gold_images():
    r = record(guid="g1", img_pos=((30000005, "Ball", "A ball."),), txt_pos=(("Fact one.", "T1"), ("Fact two.", "T2")))
    assert r.gold_ids == ["30000005", "g1_0", "g1_1"]
    assert [f.id for f, gold in r.facts() if gold] == r.gold_ids


def test_find_webqa_json_prefers_the_train_val_file(tmp_path):
    write_webqa(tmp_path, questions(1))
    (tmp_path / "WebQA_test.json").write_text("{}")
    assert D.find_webqa_json(tmp_path) == tmp_path / "WebQA_train_val.json"
    (tmp_path / "WebQA_train_val.json").unlink()
    assert D.find_webqa_json(tmp_path) == tmp_path / "WebQA_test.json"
    with pytest.raises(FileNotFoundError, match="WebQA_train_val.json"):
        D.find_webqa_json(tmp_path / "empty_dir_that_is_not_there")


def test_a_top_level_number_cut_by_the_buffer_is_read_whole(tmp_path):
    """A number at the very end of the buffer may go on in the next chunk (a record that is a bare number is still
    a bad record, but the stream must read it whole, not as ``12`` followed by junk)."""
    path = tmp_path / "WebQA_train_val.json"
    whole = {"n": 1234567890, "g1": raw_record(guid="g1")}
    path.write_text(json.dumps(whole))
    for chunk in range(2, 24):
        assert dict(D.iter_raw_records(path, chunk_chars=chunk)) == whole, chunk


def test_a_syntax_error_stops_the_reader_within_max_record_chars(tmp_path, monkeypatch):
    """A record that never parses is a syntax error after ``max_record_chars`` more characters: the reader never
    reads the rest of a broken (real: 1 GB) file into memory."""
    from mmrag_lite.data import webqa as webqa_module

    text = json.dumps({f"g{i}": raw_record(guid=f"g{i}") for i in range(300)})
    at = text.index('"g2"') + len('"g2": {"Guid"')
    path = tmp_path / "WebQA_train_val.json"
    path.write_text(text[:at] + "::" + text[at:])
    read = []

    class Counting(io.BufferedReader):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(webqa_module, "open", lambda p, mode: Counting(io.FileIO(p, mode)), raising=False)
    with pytest.raises(WebQAFormatError, match="record 'g2'"):
        list(D.iter_raw_records(path, chunk_chars=512, max_record_chars=4096))
    assert read and sum(read) < 8192 < len(text)  # read through the counting file, and only a little of it


def test_a_tsv_cut_exactly_at_a_line_start_and_a_last_line_without_newline(tmp_path):
    """Cut at a line boundary, the offset equal to the file size is past the end too (not "holds id b''"); a last
    line without its newline is whole."""
    folder = write_store(tmp_path, {30000000 + i: _png(size=8 + i) for i in range(4)})
    offsets = [int(x) for x in (folder / "imgs.lineidx").read_text().split()]
    tsv = folder / "imgs.tsv"
    full = tsv.read_bytes()
    tsv.write_bytes(full[: offsets[2]])
    with pytest.warns(UserWarning, match="before the offsets of 2 of 4 images"):
        store = ImageStore(tsv)
    with store:
        assert store.get(30000001).size == (9, 9)
        with pytest.raises(ImageNotFoundError, match="30000002: imgs.tsv ends at byte"):
            store.get(30000002)
    tsv.write_bytes(full.rstrip(b"\n"))
    with ImageStore(tsv) as store:
        assert store.get(30000003).size == (11, 11) and 30000003 in store


def test_a_lineidx_pointing_one_byte_into_each_line_is_refused_when_opened(tmp_path):
    """Offsets one byte late read ``0000001\\t...``, a number whose row matches: only the newline before each offset
    tells that they are not line starts (else every look-up fails as "holds id ...")."""
    folder = write_store(tmp_path, {30000000 + i: _png() for i in range(8)})
    lineidx = folder / "imgs.lineidx"
    lineidx.write_text("".join(f"{int(o) + 1}\n" for o in lineidx.read_text().split()))
    with pytest.raises(D.ImageStoreFormatError, match="not the start of an image line"):
        ImageStore(folder)


def test_a_store_with_exactly_half_its_probed_rows_on_other_ids_opens(tmp_path):
    """A minority (here: exactly half) of probed rows holding another row's id is let through; a majority is not."""
    half = {**{30000000 + i: _png() for i in range(4)}, **{40000010 + i: _png() for i in range(4)}}
    with ImageStore(write_store(tmp_path / "half", half)) as store:
        assert len(store) == 8 and store.get(30000003).size == (16, 16)
    most = {**{30000000 + i: _png() for i in range(3)}, **{40000010 + i: _png() for i in range(5)}}
    with pytest.raises(D.ImageStoreFormatError, match="5 of 8 probed rows"):
        ImageStore(write_store(tmp_path / "most", most))


def test_store_errors_read_plainly_and_base64_is_checked_strictly(tmp_path):
    png = base64.b64encode(_png()).decode()
    folder = write_store(tmp_path, {30000000: _png(), 30000001: png[:20] + "*" + png[20:]})
    with ImageStore(folder) as store:
        assert store.check(30000099) == "image 30000099: no line in imgs.lineidx (row 99 >= 2)"  # not repr'd
        assert str(ImageNotFoundError(5, "gone")) == "image 5: gone"
        with pytest.raises(ImageDecodeError, match="30000001: invalid base64"):  # a stray byte is corruption
            store.get_bytes(30000001)


def test_an_open_image_store_pickles_and_reads_after_unpickling(tmp_path):
    import pickle

    folder = write_store(tmp_path, {30000000 + i: _png(size=8 + i) for i in range(3)})
    with ImageStore(folder) as store:
        assert store.get(30000001).size == (9, 9)  # the file is open now
        copy = pickle.loads(pickle.dumps(store))
        with copy:
            assert copy.get(30000002).size == (10, 10) and len(copy) == 3
        assert store.get(30000000).size == (8, 8)  # the original keeps its own handle


def test_an_image_store_reads_a_lineidx_of_another_name(tmp_path):
    folder = write_store(tmp_path, {30000000 + i: _png(size=8 + i) for i in range(3)})
    moved = folder / "imgs.copy.lineidx"
    (folder / "imgs.lineidx").rename(moved)
    with ImageStore(folder / "imgs.tsv", moved) as store:
        assert store.lineidx_path == moved and store.get(30000002).size == (10, 10)
    with pytest.raises(FileNotFoundError, match="imgs.lineidx"):
        ImageStore(folder)


def test_a_whole_image_decodes_all_its_rows():
    from mmrag_lite.data.images import decode_image, decoded_rows

    im, share = decode_image(_png(size=20), 7)
    assert share == 1.0 and decoded_rows(im, share) is im and im.size == (20, 20)


def test_mmqa_rows_keep_the_first_answer_passage_text_and_each_gold_once(tmp_path):
    images = {f"i{n}": D.MMQADoc(id=f"i{n}", title=f"image {n}") for n in range(3)}
    texts = {"t1": D.MMQADoc(id="t1", title="Passage", text="A passage about flags.")}
    q = D.MMQAQuestion(qid="q1", question="Which?", answers=("first", "second"), answer_modalities=("image", "text"),
                       qtype="ImageQ", modalities=("image", "text"), image_doc_ids=tuple(images), text_doc_ids=("t1",),
                       table_id="", supporting=(("i2", "image"), ("t1", "text"), ("i2", "image"), ("x9", "image")))
    assert q.gold_doc_ids == ("i2", "t1")  # once each, in order, only those in the pool
    (row,) = D.mmqa_to_rows([q], images, texts)
    assert row["answer"] == "first" and row["answers"] == ["first", "second"]
    assert sorted(row["gold_ids"]) == ["i2", "t1"]
    assert next(c for c in row["candidates"] if c["id"] == "t1")["text"] == "A passage about flags."


def test_attach_mmqa_images_downscales_by_the_longer_side(tmp_path):
    folder = tmp_path / D.MMQA_IMAGE_FOLDER
    folder.mkdir()
    Image.new("RGB", (300, 40), (10, 120, 200)).save(folder / "banner.png")
    images = {"a": D.MMQADoc(id="a", title="Banner", path="banner.png")}
    rows = D.mmqa_to_rows([_mmqa_image_question("q1", ("a",), "a")], images)
    attached, _ = D.attach_mmqa_images(rows, images, folder, max_side=64)
    assert attached[0]["candidates"][0]["image"].width == 64


# ------------------------------------------------------------ mutation audit of world.py and data/__init__.py
def _scenes_by_pixels(size: int = 56, variants: int = 4) -> dict[bytes, tuple[str, str, int]]:
    """Every scene the world can draw, keyed by its pixels: an image read back names its (shape, colour, count)."""
    from mmrag_lite.data import world as W

    return {W.draw_scene(s, c, n, size, v).tobytes(): (s, c, n) for s in W.SHAPES for c in W.COLORS
            for n in range(1, 6) for v in range(variants)}


def _scene_reader(store: ImageStore):
    scenes = _scenes_by_pixels()

    def scene(fact) -> tuple[str, str, int] | None:
        """The scene an image shows; None for a planted broken or truncated one."""
        try:
            return scenes.get(store.get(fact.image_id).tobytes())
        except D.ImageStoreError:
            return None

    return scene


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else shape + "s"


def test_world_gold_images_show_the_keyword_answer_in_every_image_category(world):
    """The answer is learnable from pixels: each image question's gold picture is the scene its keyword names (the
    colour, the shape, the count or the sum of two counts, yes only for the colour shown, the title with more
    shapes, the whole "three red circles"), and a caption that describes its picture describes that one."""
    from mmrag_lite.data import world as W

    checked, drawn = Counter(), set()
    with ImageStore(world) as store:
        scene = _scene_reader(store)
        for r in D.read_webqa(world / "WebQA_train_val.json"):
            gold = [scene(f) for f in r.img_pos]
            if not gold or None in gold:  # no gold planted, or a planted broken gold image
                continue
            (shape, colour, count), kw, q = gold[0], r.keywords, r.question
            if r.qcate == "color":
                assert kw == colour and f"color are the {_plural(shape)}" in q, (q, gold)
            elif r.qcate == "shape":
                assert kw == shape and f"the {colour} objects" in q, (q, gold)
            elif r.qcate == "number":
                assert kw == str(sum(n for _, _, n in gold)) and {s for s, _, _ in gold} == {shape}, (q, kw, gold)
            elif r.qcate == "YesNo":
                assert kw == ("yes" if q.rstrip("?").split()[-1] == colour else "no"), (q, kw, gold)
            elif r.qcate == "choose" and len(gold) == 2:
                (_, _, n1), (_, _, n2) = gold
                assert n1 != n2 and kw == r.img_pos[0 if n1 > n2 else 1].title, (q, kw, gold)
            elif r.qcate == "choose":
                assert kw == colour and (f" {colour} or " in q or f" or {colour}?" in q), (q, gold)
            else:
                assert r.qcate == "Others" and kw == f"{W.COUNT_WORDS[count]} {colour} {_plural(shape, count)}", (q, kw)
            checked[r.qcate] += 1
            drawn.add(count)  # the (first) gold scene's count
            for fact, (s, c, n) in zip(r.img_pos, gold):
                if fact.caption != f"A picture of the {fact.title}.":
                    assert fact.caption == f"{fact.title}. {W.COUNT_WORDS[n].capitalize()} {c} {_plural(s, n)} on a plain background."
                    checked["caption"] += 1
    assert set(checked) == set(D.IMAGE_QCATES) | {"caption"} and min(checked.values()) >= 20, checked
    assert drawn == {1, 2, 3, 4, 5}  # every count is shown


def test_world_hard_distractors_show_the_same_scene_with_another_answer(world):
    """A hard distractor is what makes stage 1 learn the title and stage 2 look: its title shares the gold's place
    noun (other adjective, other name), and its picture is the gold's scene with only the asked-for part changed."""
    changed = {"color": 1, "shape": 0, "number": 2, "YesNo": 1, "choose": 1}  # the (shape, colour, count) index
    checked = Counter()

    def related(title: str, gold: str) -> bool:
        (adj, place), (gold_adj, gold_place) = title.split(" of ")[0].split(), gold.split(" of ")[0].split()
        return place == gold_place and adj != gold_adj and title.split(" of ")[1] != gold.split(" of ")[1]

    with ImageStore(world) as store:
        scene = _scene_reader(store)
        for r in D.read_webqa(world / "WebQA_train_val.json"):
            if r.qcate == "text" and r.txt_pos:
                assert all(related(f.title, r.txt_pos[0].title) for f in r.txt_neg[:3]), r.guid
                checked["text"] += 1
            if r.qcate not in changed or not r.img_pos:
                continue
            gold, hards = scene(r.img_pos[0]), [scene(f) for f in r.img_neg[:3]]
            if None in (gold, *hards):  # a planted broken or truncated image
                continue
            i = changed[r.qcate]
            for fact, hard in zip(r.img_neg[:3], hards):
                assert related(fact.title, r.img_pos[0].title), (fact.title, r.img_pos[0].title)
                assert hard[i] != gold[i] and hard[:i] + hard[i + 1:] == gold[:i] + gold[i + 1:], (r.qcate, gold, hard)
            checked[r.qcate] += 1
    assert set(checked) == set(changed) | {"text"} and min(checked.values()) >= 20, checked


def test_world_text_answers_are_stated_by_their_gold_snippets(world):
    """A text question is answerable from its gold snippets: every name and number of the reference answer is in them."""
    import re

    from mmrag_lite.data import world as W

    checked = 0
    for r in D.read_webqa(world / "WebQA_train_val.json"):
        if r.qcate != "text" or not r.txt_pos or r.answer in W._MISSED_ANSWERS:
            continue
        facts = " ".join(f.fact for f in r.txt_pos)
        named = re.findall(r"\b(?:[A-Z]\w*|\d+)\b", r.answer)
        assert named and [w for w in named if not re.search(rf"\b{w}\b", facts)] == [], (r.answer, facts)
        checked += 1
    assert checked >= 50


def _defects_in_files(world: Path) -> tuple[dict[str, int], Counter]:
    """Each planted defect as counted in the files themselves (once per planting: copies are left out), and which
    kinds of candidate (caption, fact) the overlong ones are."""
    from mmrag_lite.data import world as W

    copies = D.read_world_manifest(world)["copies"]
    lines = (world / "imgs.tsv").read_bytes().splitlines()

    def state(payload: bytes) -> str:
        data = base64.b64decode(payload)
        if not data.startswith(b"\x89PNG"):
            return "broken"  # garbage or empty
        try:
            Image.open(io.BytesIO(data)).load()
        except OSError:
            return "truncated"
        return "ok"

    images = {int(image_id): state(payload) for image_id, payload in (line.split(b"\t") for line in lines)}
    fresh = [r for guid, r in json.loads((world / "WebQA_train_val.json").read_text()).items() if guid not in copies]
    limit = MiniWebQAFilters().max_candidate_words
    long_kinds = Counter()

    def overlong(r: dict) -> bool:
        facts = [f for key in ("img_posFacts", "img_negFacts", "txt_posFacts", "txt_negFacts") if isinstance(r[key], list)
                 for f in r[key]]
        long = [f for f in facts if len(f.get("caption", f.get("fact", "")).split()) > limit]
        long_kinds.update("caption" if "caption" in f else "fact" for f in long)
        return bool(long)

    found = {
        "no_gold": sum(not r["img_posFacts"] and not r["txt_posFacts"] for r in fresh),
        "answer_misses": sum(D.strip_quotes(r["A"][0]) in W._MISSED_ANSWERS for r in fresh),
        "broken_gold_image": sum(images[r["img_posFacts"][0]["image_id"]] == "broken" for r in fresh if r["img_posFacts"]),
        "broken_distractor_image": sum(images[f["image_id"]] == "broken" for r in fresh for f in r["img_negFacts"]
                                       if f["image_id"] in images),
        "truncated_image": Counter(images.values())["truncated"],
        "duplicate": Counter(c["kind"] for c in copies.values())["duplicate"],
        "near_duplicate": Counter(c["kind"] for c in copies.values())["near_duplicate"],
        "overlong": sum(overlong(r) for r in fresh),
        "bad_record": len(D.read_webqa(world / "WebQA_train_val.json").errors),
    }
    assert Counter(images.values())["broken"] == found["broken_gold_image"] + found["broken_distractor_image"]
    return found, long_kinds


def test_world_plants_each_defect_in_the_counts_its_manifest_gives(world, tmp_path):
    """The manifest is the ground truth the funnel is checked against: each planted defect is in the files exactly
    as often as it says, also where one question carries several (a noisier world), and n_images is the store's
    size."""
    manifest = D.read_world_manifest(world)
    assert manifest["n_images"] == len((world / "imgs.tsv").read_bytes().splitlines()) == len(
        D.read_lineidx(world / "imgs.lineidx"))
    found, long_kinds = _defects_in_files(world)
    assert found == manifest["planted"] and min(found.values()) > 0
    assert long_kinds.keys() == {"caption", "fact"}  # the overlong filter meets both kinds of candidate
    noisy = D.make_world(tmp_path / "noisy", n_questions=60, seed=1, progress=False, noise=D.WorldNoise(
        no_gold=0.3, answer_misses=0.3, broken_gold_image=0.5, broken_distractor_image=0.2, truncated_image=0.3,
        duplicate=0.1, near_duplicate=0.1, overlong=0.3, bad_record=0.0))  # a broken record may hide a long fact
    assert _defects_in_files(noisy)[0] == D.read_world_manifest(noisy)["planted"]


def test_each_noise_rate_plants_its_own_defect_and_all_zero_is_clean(tmp_path):
    """``WorldNoise`` is how a course run asks for a harder or a clean world: each rate plants its own kind only."""
    from dataclasses import fields

    zero = {f.name: 0.0 for f in fields(D.WorldNoise)}
    for name in zero:
        world = D.make_world(tmp_path / name, n_questions=40, seed=3, noise=D.WorldNoise(**dict(zero, **{name: 0.3})),
                             progress=False)
        planted = D.read_world_manifest(world)["planted"]
        assert planted[name] > 0 and [k for k, v in planted.items() if v and k != name] == [], (name, planted)
        assert len(D.read_webqa(world / "WebQA_train_val.json").errors) == planted["bad_record"]  # each one reported
    clean = D.make_world(tmp_path / "clean", n_questions=40, seed=3, noise=D.WorldNoise(**zero), progress=False)
    manifest = D.read_world_manifest(clean)
    assert set(manifest["planted"].values()) == {0} and manifest["copies"] == {}
    result = D.read_webqa(clean / "WebQA_train_val.json")
    assert not result.errors and all(r.gold_ids for r in result)
    assert all(D.answer_mentions_keyword(r) for r in result if r.keywords)
    with ImageStore(clean) as store:
        assert [i for i in range(manifest["n_images"]) if store.check(30_000_000 + i, min_decoded_share=1.0)] == []


def _blobs(im: Image.Image, background: tuple[int, int, int]) -> int:
    """Shapes as a student counts them: 8-connected regions off the background (shapes touching at a corner are one)."""
    import numpy as np

    mask = (np.asarray(im) != np.array(background)).any(-1)
    seen, n = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        n, stack = n + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
    return n


def test_draw_scene_draws_count_shapes_in_one_colour_and_refuses_other_scenes():
    """"How many" is answerable from the pixels: ``count`` shapes, each shape its own outline, one colour on the
    background, in every scene the world can draw (the jitter once let two shapes touch in 16 of the 700 at 56 px,
    9 of them two circles). An unknown shape, colour or count is an error, not a square or a crash."""
    from mmrag_lite.data import world as W

    for shape in W.SHAPES:
        for color in W.COLORS:
            for count in range(1, 6):
                for variant in range(4):
                    im = W.draw_scene(shape, color, count, variant=variant)
                    assert _blobs(im, W.BACKGROUND) == count, (shape, color, count, variant)
                    assert {c for _, c in im.getcolors()} == {W.BACKGROUND, W.COLORS[color]}
    pictures = {W.draw_scene(shape, "red", 1).tobytes() for shape in W.SHAPES}
    assert len(pictures) == len(W.SHAPES)  # five outlines, not a square drawn for two of them
    assert W.draw_scene("star", "red", 3, variant=1).tobytes() == W.draw_scene("star", "red", 3, variant=1).tobytes()
    assert W.draw_scene("star", "red", 3, variant=1).tobytes() != W.draw_scene("star", "red", 3, variant=2).tobytes()
    for bad in (("hexagon", "red", 1), ("circle", "teal", 1), ("circle", "red", 0), ("circle", "red", 6)):
        with pytest.raises(ValueError, match="unknown scene"):
            W.draw_scene(*bad)


def test_the_touch_check_moves_only_scenes_whose_shapes_touched(monkeypatch):
    """The check redraws a touching jitter and keeps every other one: a scene that never touched is the picture it
    was before the check (worlds, figures and the miniature move for the few ambiguous scenes only), and at a size
    where every layout is clear (300 px) nothing moves at all."""
    from mmrag_lite.data import world as W

    scenes = [(s, c, n, v) for s in W.SHAPES for c in W.COLORS for n in range(1, 6) for v in range(4)]
    for size, moved_at_most in ((56, 30), (300, 0)):
        checked = {key: W.draw_scene(*key[:3], size=size, variant=key[3]) for key in scenes}
        with monkeypatch.context() as m:
            m.setattr(W, "_apart", lambda *a: True)  # the first jitter, unchecked
            unchecked = {key: W.draw_scene(*key[:3], size=size, variant=key[3]) for key in scenes}
        moved = [key for key in scenes if checked[key].tobytes() != unchecked[key].tobytes()]
        assert all(_blobs(unchecked[key], W.BACKGROUND) < key[2] for key in moved), size  # only touching ones
        assert len(moved) <= moved_at_most, (size, len(moved))
        if size == 56:
            assert moved  # the check does run at the course's size: there were touching scenes to move
    assert W._apart("circle", [(10.0, 10.0), (20.0, 10.0)], 4.0, 32)  # a 2 px gap
    assert not W._apart("circle", [(10.0, 10.0), (18.0, 10.0)], 4.0, 32)  # edge to edge
    assert not W._apart("square", [(10.0, 10.0), (18.0, 18.0)], 4.0, 32)  # corner to corner, diagonally


def test_world_images_are_drawn_at_the_size_and_in_the_format_asked_for(tmp_path):
    """A preset's ``world_image_size`` reaches the pixels, and ``image_format`` the stored bytes."""
    from dataclasses import fields

    clean = D.WorldNoise(**{f.name: 0.0 for f in fields(D.WorldNoise)})  # no broken bytes among the images
    world = D.make_world(tmp_path / "w", n_questions=6, image_size=32, image_format="jpg", noise=clean, progress=False)
    with ImageStore(world) as store:
        for i in range(D.read_world_manifest(world)["n_images"]):
            raw = store.get_bytes(30_000_000 + i)
            assert raw[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(raw)).size == (32, 32), i


def test_world_spreads_each_scene_over_its_jitter_variants(tmp_path):
    """``variants`` jittered drawings per scene: a world of 1 variant reuses one picture per scene, of 4 more."""
    def pictures(variants: int) -> int:
        world = D.make_world(tmp_path / str(variants), n_questions=40, variants=variants, progress=False)
        return len({line.split(b"\t")[1] for line in (world / "imgs.tsv").read_bytes().splitlines()})

    assert pictures(4) > pictures(1)


def test_world_titles_stay_unique_past_one_round():
    """Titles run out after 24 x 32 x 64 = 49,152 (a WebQA-size world takes more): the next round carries "II"."""
    import random

    from mmrag_lite.data import world as W

    titles = W._Titles(random.Random(0))
    taken = [W._Titles.compose(*titles.take()) for _ in range(titles.n + 3)]
    assert len(set(taken)) == len(taken)
    assert all(t.endswith(" II") for t in taken[titles.n:])
    assert [W._Titles.compose("Quiet", "Garden", "Lina", rnd) for rnd in range(4)] == [
        "Quiet Garden of Lina", "Quiet Garden of Lina II", "Quiet Garden of Lina III", "Quiet Garden of Lina 4"]


def test_another_seed_is_another_world(tmp_path):
    """Two seeds never share a Guid (their records could not be pooled) and ask about other subjects."""
    def gold_titles_and_guids(seed: int) -> tuple[list[str], set[str]]:
        result = D.read_webqa(D.make_world(tmp_path / str(seed), n_questions=30, seed=seed, progress=False) /
                              "WebQA_train_val.json")
        return [f.title for r in result for f, gold in r.facts() if gold], {r.guid for r in result}

    (titles0, guids0), (titles1, guids1) = gold_titles_and_guids(0), gold_titles_and_guids(1)
    assert not guids0 & guids1
    assert len(set(titles0) & set(titles1)) < len(set(titles0)) // 2


def test_every_world_record_is_laid_out_like_a_webqa_record(world):
    """Not only the first: each record (planted copies too) is keyed by its own 32-hex-digit Guid, its snippet ids
    are ``<that Guid>_<n>``, unique within it, its topic is its subject's kind, its pool as large as documented and
    about 12% of the questions are val. A copy points at one of the last 64 clean questions before it and shares
    its pool."""
    import re

    from mmrag_lite.data import world as W

    raw = json.loads((world / "WebQA_train_val.json").read_text())
    copies = D.read_world_manifest(world)["copies"]
    low, high = W.IMAGES_PER_QUESTION
    for guid, r in raw.items():
        if not isinstance(r.get("txt_negFacts"), list):  # a planted malformed record
            continue
        assert re.fullmatch("[0-9a-f]{32}", guid) and r["Guid"] == guid
        ids = [s["snippet_id"] for key in ("txt_posFacts", "txt_negFacts") for s in r[key]]
        assert len(set(ids)) == len(ids) and all(re.fullmatch(f"{guid}_\\d+", i) for i in ids), (guid, ids)
        assert r["topic"] in {p.lower() for p in W.PLACES}
        if "Q" in r:
            assert r["topic"] in D.strip_quotes(r["Q"]).lower(), (r["topic"], r["Q"])
        if r["img_posFacts"] or r["txt_posFacts"]:
            assert low <= len(r["img_posFacts"]) + len(r["img_negFacts"]) <= high, guid
    assert 0.06 < sum(r["split"] == "val" for r in raw.values()) / len(raw) < 0.2
    clean = [g for g, r in raw.items() if g not in copies and "Q" in r and isinstance(r["txt_negFacts"], list)
             and all(isinstance(f["image_id"], int) for f in r["img_negFacts"])]
    position = {guid: i for i, guid in enumerate(raw)}
    for guid, copy in copies.items():
        original = raw[copy["of"]]
        before = [g for g in clean if position[g] < position[guid]]
        assert copy["of"] in before[-W.DUPLICATE_SOURCE_WINDOW:], guid
        q, q0 = json.loads(raw[guid]["Q"]), json.loads(original["Q"])  # the text inside the quotes, spaces kept
        assert q != q0 and [f["image_id"] for f in raw[guid]["img_negFacts"]] == [f["image_id"] for f in original["img_negFacts"]]
        if copy["kind"] == "duplicate":  # the text up to case and spacing
            assert D.question_key(q) == D.question_key(q0), (q, q0)
        else:  # reworded: other words in another order, the same content words
            assert D.question_key(q) != D.question_key(q0) and D.near_dup_key(q) == D.near_dup_key(q0), (q, q0)
    assert {c["kind"] for c in copies.values()} == {"duplicate", "near_duplicate"}


def test_make_world_refuses_more_images_than_id_modulo_can_index(tmp_path, monkeypatch):
    """Image ids are looked up by ``id % 10_000_000``: the image that would wrap around is refused, the last that
    fits is not (a smaller modulus stands in for ten million)."""
    from mmrag_lite.data import world as W

    n_images = D.read_world_manifest(D.make_world(tmp_path / "w", n_questions=3, progress=False))["n_images"]
    monkeypatch.setattr(W, "ID_MODULUS", n_images)
    D.make_world(tmp_path / "w", n_questions=3, progress=False)
    monkeypatch.setattr(W, "ID_MODULUS", n_images - 1)
    with pytest.raises(ValueError, match="cannot be indexed"):
        D.make_world(tmp_path / "w", n_questions=3, progress=False)


def test_easy_distractors_avoid_the_gold_titles_of_both_modalities():
    """An easy distractor snippet titled like a gold image's subject or a gold snippet's would be a mislabelled
    negative: both kinds of gold title are avoided (all titles but one adjective's are gold here)."""
    import random

    from mmrag_lite.data import world as W

    titles = [f"{a} {p} of {n}" for a in W.ADJECTIVES[1:] for p in W.PLACES for n in W.NAMES]
    half = len(titles) // 2
    qd = {"gold_imgs": [W._Img(("circle", "red", 1), t, "") for t in titles[:half]],
          "gold_txt": [(t, "a fact") for t in titles[half:]], "hard_imgs": [], "hard_txt": []}
    _, txt_neg = W._distractors(random.Random(0), qd)
    assert txt_neg and all(t.startswith(W.ADJECTIVES[0] + " ") for t, _ in txt_neg)


def test_data_all_lists_exactly_what_the_package_re_exports():
    """``from mmrag_lite.data import *`` binds every listed name (one listed but not imported breaks it) and leaves
    none of the re-exported ones out."""
    import types

    exported = {n for n in dir(D) if not n.startswith("_") and not isinstance(getattr(D, n), types.ModuleType)}
    assert sorted(exported) == sorted(D.__all__) and len(set(D.__all__)) == len(D.__all__)
