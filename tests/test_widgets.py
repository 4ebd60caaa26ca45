"""The notebook widgets driven as a student drives them: set a control's value (its observers fire) and read what the
widget then shows. Synthetic Mini-WebQA rows and hand-built pipeline results: no model, no front end."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

pytest.importorskip("ipywidgets")

from mmrag_lite import data
from mmrag_lite.pipeline import PipelineResult
from mmrag_lite.prompts import stage1_target, stage2_target
from mmrag_lite.rewards import score_completion
from mmrag_lite.widgets import NO_PIXELS_HTML, dataset_browser, reasoning_viewer, result_html, reward_playground

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
SCRIPT = "<script>alert('x')</script>"


def make_rows(n: int = 3, pool: int = 4, prefix: str = "q") -> list[dict]:
    """Mini-WebQA-shaped rows (as tests/test_pipeline.py's): images and snippets alternate; the gold moves per row."""
    rows = []
    for q in range(n):
        colour = list(COLOURS)[q % 3]
        cands = []
        for j in range(pool):
            gold = j == (q % pool)
            cid = f"{prefix}{q}_{j}"
            if j % 2 == 0:
                cands.append({"id": cid, "modality": "image", "title": f"{colour} square {j}", "text": f"a {colour} square",
                              "image": Image.new("RGB", (40, 30), COLOURS[colour]), "is_gold": gold})
            else:
                cands.append({"id": cid, "modality": "text", "title": f"fact {j}", "text": f"snippet {cid}", "image": None,
                              "is_gold": gold})
        rows.append({"guid": f"{prefix}{q}", "question": f"What colour is square {prefix}{q}?", "answer": f"It is {colour}.",
                     "keywords": colour, "qcate": "color", "topic": "synthetic", "candidates": cands,
                     "gold_ids": [c["id"] for c in cands if c["is_gold"]]})
    return rows


def cell_texts(browser) -> list[str]:
    """Each grid cell's caption HTML (the last child of a cell), in candidate order."""
    return [cell.children[-1].value for cell in browser.grid.children]


# ----------------------------------------------------------------------------------------- dataset browser
@pytest.fixture(scope="module")
def mini():
    """A DatasetDict as notebook 01 passes it (``data.rows_to_dataset``: the real features, images stored as bytes)."""
    from datasets import DatasetDict

    return DatasetDict({"train": data.rows_to_dataset(make_rows(3, prefix="tr")),
                        "test": data.rows_to_dataset(make_rows(2, prefix="te")),
                        "val": data.rows_to_dataset([])})


def test_browser_shows_the_picked_question_and_marks_its_gold(mini):
    browser = dataset_browser(mini)
    assert list(browser.split_picker.options) == ["train", "test", "val"] and browser.index_slider.max == 2

    def shows(row):
        assert row["question"] in browser.header.value and f"guid {row['guid']}" in browser.header.value
        texts = cell_texts(browser)
        assert len(texts) == len(row["candidates"])
        for text, cand in zip(texts, row["candidates"]):
            assert f"<b>{cand['id']}</b>" in text
            assert ("★ gold" in text) == cand["is_gold"], (cand["id"], text)
        for cell, cand in zip(browser.grid.children, row["candidates"]):  # images get a thumbnail, snippets do not
            kinds = [type(w).__name__ for w in cell.children]
            assert kinds == (["Image", "HTML"] if cand["modality"] == "image" else ["HTML"])
            if cand["modality"] == "image":
                assert cell.children[0].value[:4] == b"\x89PNG"

    train, test = mini["train"], mini["test"]
    shows(train[0])
    browser.index_slider.value = 2
    shows(train[2])
    assert train[0]["question"] not in browser.header.value
    browser.split_picker.value = "test"  # the slider was at 2; test has 2 rows: back to its first, never out of range
    assert (browser.index_slider.value, browser.index_slider.max) == (0, 1)
    shows(test[0])
    browser.index_slider.value = 1
    shows(test[1])
    browser.split_picker.value = "val"  # an empty split: a message, no cells
    assert "empty split" in browser.header.value and browser.grid.children == ()
    browser.split_picker.value = "train"
    shows(train[0])


def test_browser_starts_on_the_split_asked_for_and_refuses_one_it_lacks(mini):
    assert mini["test"][0]["question"] in dataset_browser(mini, split="test").header.value
    for wrong in ("validation", "Test"):  # never train's rows shown under the name asked for
        with pytest.raises(ValueError, match=rf"no split '{wrong}'.*\['train', 'test', 'val'\]"):
            dataset_browser(mini, split=wrong)
    with pytest.raises(ValueError, match="at least one split"):
        dataset_browser({})
    with pytest.raises(ValueError, match="got None"):
        dataset_browser(None)


def test_browser_takes_a_list_a_dataset_or_one_row():
    rows = make_rows(3)
    for source in (rows, data.rows_to_dataset(rows)):
        browser = dataset_browser(source)
        browser.index_slider.value = 1
        assert rows[1]["question"] in browser.header.value and rows[0]["question"] not in browser.header.value
    one = dataset_browser(rows[2])  # ds["train"][2]: one row, not a dict of splits named "guid", "question", ...
    assert rows[2]["question"] in one.header.value and len(one.grid.children) == len(rows[2]["candidates"])
    empty = dataset_browser([])
    assert "empty split" in empty.header.value and empty.grid.children == ()
    assert "empty split" in dataset_browser(data.rows_to_dataset([])).header.value


def test_browser_rows_without_candidates_or_pixels_still_render():
    row = make_rows(1)[0]
    no_pool = {k: v for k, v in row.items() if k != "candidates"}
    for bare in (dict(row, candidates=[]), no_pool):
        browser = dataset_browser([bare])
        assert row["question"] in browser.header.value and "no candidates" in browser.header.value
        assert browser.grid.children == ()
    broken = [None, {"bytes": b"not an image", "path": None}, {"bytes": None, "path": "gone.png"}, b"junk bytes",
              "some/path.png", Image.new("RGB", (0, 0)), Image.new("RGB", (5, 0))]
    images = [i for i, c in enumerate(row["candidates"]) if c["modality"] == "image"]
    for image in broken:
        cands = [dict(c, image=image) if i == images[0] else c for i, c in enumerate(row["candidates"])]
        browser = dataset_browser([dict(row, candidates=cands)])
        cell = browser.grid.children[images[0]]
        assert [w.value for w in cell.children[:1]] == [NO_PIXELS_HTML], image  # a label, not a crash
        assert f"<b>{cands[images[0]]['id']}</b>" in cell.children[-1].value
        assert type(browser.grid.children[images[1]].children[0]).__name__ == "Image"  # the good one still drawn
    png = Image.new("RGB", (8, 8), (1, 2, 3))
    import io

    buf = io.BytesIO()
    png.save(buf, format="PNG")
    cands = [dict(c, image=buf.getvalue()) if i == images[0] else c for i, c in enumerate(row["candidates"])]
    cell = dataset_browser([dict(row, candidates=cands)]).grid.children[images[0]]  # raw bytes are pixels too
    assert type(cell.children[0]).__name__ == "Image"


def test_browser_escapes_html_in_the_row():
    row = make_rows(1)[0]
    row = dict(row, question=f"Is {SCRIPT} & <b>bold</b> here?", answer=SCRIPT, keywords="<i>kw</i>", topic="<u>t</u>",
               candidates=[dict(c, id=f"<x{i}>", title=SCRIPT, text=f"{SCRIPT} snippet") for i, c in enumerate(row["candidates"])])
    browser = dataset_browser([row])
    page = browser.header.value + "".join(cell_texts(browser))
    assert "<script" not in page and "<b>bold</b>" not in page and "<i>kw</i>" not in page and "<x0>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in browser.header.value
    assert "&lt;x0&gt;" in cell_texts(browser)[0]


# ----------------------------------------------------------------------------------------- reward playground
def shown(out: str) -> dict[str, str]:
    """The playground's table as ``{component: '+0.500', 'total': '+1.200'}``."""
    table = dict(re.findall(r"<tr><td>(\w+)</td><td>([+-]\d+\.\d{3})</td>", out))
    total = re.search(r"<td><b>total</b></td><td></td><td></td><td><b>([+-]\d+\.\d{3})</b></td>", out)
    assert total, out
    return {**table, "total": total.group(1)}


def expected(completion: str, row: dict, stage: int, weights: dict, **options) -> dict[str, str]:
    return {k: f"{v:+.3f}" for k, v in score_completion(completion, row, stage=stage, weights=weights, **options).items()}


ROW2 = {"candidate_ids": ["D1", "D2", "D3", "D4"], "gold_ids": ["D2", "D4"], "answer": "The car is red.",
        "keywords": "red", "qcate": "color", "question": "What colour is the car?"}
W2 = {"format": 0.2, "ranking": 0.5, "answer": 1.0}


def test_playground_numbers_follow_every_typed_completion():
    pg = reward_playground(2, row=ROW2, weights=W2, reasoning=True, completion="")
    completions = [
        "",  # empty
        stage2_target(["D2", "D4"], "red", reasoning=True, think="the car in D2 is red"),
        stage2_target(["D4"], "red", reasoning=True, think="only one"),
        stage2_target(["D1"], "blue", reasoning=False),  # no <think> while reasoning is asked for
        stage2_target(["D2"], "красный 赤い 🚗 red", reasoning=True, think="ünïcödé ☃"),
        stage2_target(["D2"], "red " * 50_000, reasoning=True, think="long"),  # a huge answer
        "<think>" + "word " * 100_000 + "</think><sources>D2</sources><answer>red</answer>",
        f"<think>{SCRIPT}</think><sources>D2</sources><answer>{SCRIPT}</answer>",
    ]
    seen = set()
    for completion in completions:
        pg.textarea.value = completion
        want = expected(completion, ROW2, 2, W2, reasoning=True)
        assert shown(pg.output.value) == want, completion[:80]
        assert "<script" not in pg.output.value
        seen.add(want["total"])
    assert len(seen) >= 4  # the table really changed with the text
    pg.textarea.value = completions[1]
    full = shown(pg.output.value)["total"]
    pg.children[1].value = False  # untick reasoning: the <think> block is now a format error
    assert shown(pg.output.value) == expected(completions[1], ROW2, 2, W2, reasoning=False) and shown(pg.output.value)["total"] != full


def test_playground_row_fields_rescore_as_score_completion_does():
    completion = stage2_target(["D2", "D4"], "red", reasoning=False)
    pg = reward_playground(2, row=ROW2, weights=W2, reasoning=False, completion=completion)
    assert shown(pg.output.value) == expected(completion, ROW2, 2, W2, reasoning=False)
    pg.fields["gold_ids"].value = "D1, D3"
    row = dict(ROW2, gold_ids=["D1", "D3"])
    assert shown(pg.output.value) == expected(completion, row, 2, W2, reasoning=False)
    assert shown(pg.output.value)["ranking"] == "+0.000"
    pg.fields["keywords"].value = "blue"
    row["keywords"] = "blue"
    assert shown(pg.output.value) == expected(completion, row, 2, W2, reasoning=False)
    pg.textarea.value = completion = stage2_target(["D2", "D4"], "it is blue and red", reasoning=False)
    answers = set()
    for qcate in ("shape", "color", "choose"):  # the category decides how the answer is read: 0, 2/3, 1 here
        pg.fields["qcate"].value = row["qcate"] = qcate
        assert shown(pg.output.value) == expected(completion, row, 2, W2, reasoning=False), qcate
        answers.add(shown(pg.output.value)["answer"])
    assert answers == {"+0.000", "+0.667", "+1.000"}
    pg.fields["candidate_ids"].value = "D2"
    assert "gold ids not among the candidates, so no completion can cite them: D1, D3" in pg.output.value

    s1 = reward_playground(1, row={"label": "yes"}, reasoning=False, completion=stage1_target("yes"))
    w1 = {"format": 0.2, "relevance": 1.0}
    assert shown(s1.output.value) == expected(stage1_target("yes"), {"label": "yes"}, 1, w1, reasoning=False)
    s1.fields["label"].value = "no"
    assert shown(s1.output.value) == expected(stage1_target("yes"), {"label": "no"}, 1, w1, reasoning=False)
    assert shown(s1.output.value)["relevance"] == "+0.000"


def test_playground_missing_keywords_score_as_the_reward_does():
    """A row without keywords (None, as a hand-typed row has it) falls back to the answer in the reward; the field
    must not turn it into the keyword "None"."""
    row = dict(ROW2, keywords=None, answer="red")
    completion = stage2_target(["D2"], "red", reasoning=False)
    pg = reward_playground(2, row=row, weights=W2, reasoning=False, completion=completion)
    assert pg.fields["keywords"].value == ""
    want = expected(completion, row, 2, W2, reasoning=False)
    assert want["answer"] == "+1.000" and shown(pg.output.value) == want
    assert reward_playground(2, row=dict(ROW2, answer=None)).fields["answer"].value == ""


def test_playground_reads_id_columns_typed_as_one_string():
    row = dict(ROW2, candidate_ids="D1, D2, D3", gold_ids="D2")
    pg = reward_playground(2, row=row, weights=W2, reasoning=False)
    assert pg.fields["candidate_ids"].value == "D1, D2, D3" and pg.fields["gold_ids"].value == "D2"
    assert "<sources>D2</sources>" in pg.textarea.value  # the default completion cites the gold, not "D, 2"
    listed = dict(ROW2, candidate_ids=["D1", "D2", "D3"], gold_ids=["D2"])
    assert shown(pg.output.value) == expected(pg.textarea.value, listed, 2, W2, reasoning=False)
    assert "not among the candidates" not in pg.output.value


def test_playground_refuses_a_stage_it_has_no_rewards_for():
    for bad in (0, 3, "2"):
        with pytest.raises(ValueError, match="stage must be 1 or 2"):
            reward_playground(bad)
    pg = reward_playground(2, weights={"bogus": 1.0})  # a broken weight: said in the output, not raised in a callback
    assert "unknown reward component" in pg.output.value
    pg.textarea.value = "<answer>x</answer>"
    assert "unknown reward component" in pg.output.value


# ----------------------------------------------------------------------------------------- reasoning viewer
VIEW_ROWS = make_rows(3)


def result(row: dict, system: str, *, reasoning: str | None = None, kept: int = 2, **kw) -> PipelineResult:
    """What the pipeline returns for ``row``: scores for every candidate, the top ``kept`` kept, the first cited."""
    ids = [c["id"] for c in row["candidates"]]
    scores = {cid: round(0.9 - 0.2 * i, 3) for i, cid in enumerate(ids)}
    fields = {"guid": row["guid"], "question": row["question"], "system": system, "scores": scores,
              "kept_ids": tuple(ids[:kept]), "sources": tuple(ids[:1]), "completion": f"raw {system} {row['guid']}",
              "reasoning": f"{system} reasons about {row['guid']}" if reasoning is None else reasoning,
              "answer": f"{system} says {row['guid']}"}
    return PipelineResult(**{**fields, **kw})


def table_row(page: str, cid: str) -> str:
    hits = [tr for tr in page.split("<tr")[1:] if f"<code>{cid}</code>" in tr]
    assert len(hits) == 1, (cid, hits)
    return hits[0]


def test_viewer_shows_the_picked_question_for_the_picked_system():
    preds = {"full": [result(r, "full") for r in VIEW_ROWS], "base": [result(r, "base", kept=3) for r in VIEW_ROWS[::-1]]}
    viewer = reasoning_viewer(preds, VIEW_ROWS)
    assert [g for _, g in viewer.question_picker.options] == [r["guid"] for r in VIEW_ROWS]

    def shows(row, system):
        page = viewer.output.value
        mine = next(p for p in preds[system] if p.guid == row["guid"])
        assert f"[{system}]" in page and row["question"] in page and mine.reasoning in page and mine.answer in page
        assert f"<td>{row['answer']}</td>" in page  # the gold answer beside the model's
        others = [r for r in VIEW_ROWS if r is not row]
        assert not any(f"reasons about {o['guid']}" in page or o["question"] in page for o in others)
        for i, cand in enumerate(row["candidates"]):
            tr = table_row(page, cand["id"])
            assert ("★ gold" in tr) == cand["is_gold"] and (cand["id"] in row["gold_ids"]) == cand["is_gold"]
            assert f"<td>{mine.scores[cand['id']]:.3f}</td>" in tr
            kept = cand["id"] in mine.kept_ids
            assert ("<td>kept</td>" in tr) == kept
            assert (f"<b>D{mine.kept_ids.index(cand['id']) + 1}</b>" in tr) if kept else "<td><b></b></td>" in tr
            assert ("<td>cited</td>" in tr) == (cand["id"] in mine.sources)
            assert ("data:image/png;base64," in tr) == (cand["modality"] == "image")

    shows(VIEW_ROWS[0], "full")
    viewer.question_picker.value = VIEW_ROWS[2]["guid"]
    shows(VIEW_ROWS[2], "full")
    viewer.system_picker.value = "base"  # same question, other system (whose list is in another order)
    shows(VIEW_ROWS[2], "base")
    viewer.question_picker.value = VIEW_ROWS[1]["guid"]
    shows(VIEW_ROWS[1], "base")

    as_dicts = reasoning_viewer({"full": [p.to_dict() for p in preds["full"]]}, data.rows_to_dataset(VIEW_ROWS))
    as_dicts.question_picker.value = VIEW_ROWS[1]["guid"]
    assert VIEW_ROWS[1]["question"] in as_dicts.output.value and "full reasons about q1" in as_dicts.output.value


def test_viewer_without_reasoning_scores_or_with_nan_says_so():
    row = VIEW_ROWS[0]
    ids = [c["id"] for c in row["candidates"]]
    bare = result(row, "zs", reasoning="", scores={ids[0]: float("nan")}, kept=len(ids))
    viewer = reasoning_viewer([bare.to_dict()], VIEW_ROWS)  # NaN became a JSON null
    assert "no &lt;think&gt; block" in viewer.output.value
    assert "<td>—</td>" in table_row(viewer.output.value, ids[0]) and "<td>—</td>" in table_row(viewer.output.value, ids[1])
    nulls = dict(bare.to_dict(), kept_ids=None, sources=None, scores=None, problems=None)
    page = reasoning_viewer([nulls], VIEW_ROWS).output.value  # JSON nulls: nothing kept / cited, not a TypeError
    assert row["question"] in page and "<td>kept</td>" not in page and "<td>cited</td>" not in page


def test_viewer_with_no_predictions_or_an_unknown_guid():
    for nothing in ({}, [], {"full": []}, iter([])):
        viewer = reasoning_viewer(nothing, VIEW_ROWS)
        assert viewer.output.value == "<i>no predictions</i>" and viewer.question_picker.value is None
    stray = result(make_rows(1, prefix="other")[0], "full")  # made on another split's rows
    viewer = reasoning_viewer({"full": [result(VIEW_ROWS[0], "full"), stray]}, VIEW_ROWS)
    viewer.question_picker.value = stray.guid
    page = viewer.output.value
    assert stray.question in page and stray.reasoning in page and VIEW_ROWS[0]["question"] not in page
    assert f"guid {stray.guid} is not among the 3 rows given to the viewer" in page
    viewer.question_picker.value = VIEW_ROWS[0]["guid"]
    assert "is not among" not in viewer.output.value and VIEW_ROWS[0]["question"] in viewer.output.value
    row = {k: v for k, v in VIEW_ROWS[0].items() if k != "candidates"}  # a row without its pool: kept ids still listed
    page = reasoning_viewer([result(VIEW_ROWS[0], "full")], [row]).output.value
    assert all(f"<code>{cid}</code>" in page for cid in result(VIEW_ROWS[0], "full").kept_ids)


def test_viewer_refuses_inputs_of_the_wrong_shape_by_name():
    from datasets import DatasetDict

    one = result(VIEW_ROWS[0], "full")
    for bad, says in ((one, "one result: pass \\[result\\]"), (one.to_dict(), "one result"), (None, "got NoneType"),
                      ({"full": one}, "system 'full' should hold a list"), ({"full": ["q0"]}, "system 'full' holds a str"),
                      ({"full": [1]}, "holds a int")):
        with pytest.raises(TypeError, match=says):
            reasoning_viewer(bad, VIEW_ROWS)
    with pytest.raises(TypeError, match=r"rows of one split .*ds\['test'\]"):
        reasoning_viewer([one], DatasetDict({"test": data.rows_to_dataset(VIEW_ROWS)}))
    with pytest.raises(TypeError, match="row 0 has no 'guid'"):
        reasoning_viewer([one], [{"question": "?"}])


def test_viewer_escapes_html_everywhere():
    row = dict(VIEW_ROWS[0], question=SCRIPT, answer=f"{SCRIPT} gold",
               candidates=[dict(c, text=f"{SCRIPT} {c['id']}", modality=c["modality"]) for c in VIEW_ROWS[0]["candidates"]])
    evil = result(row, SCRIPT, reasoning=f"think {SCRIPT} & <b>", answer=SCRIPT, completion=SCRIPT,
                  problems=(SCRIPT,), sources=(SCRIPT,))
    viewer = reasoning_viewer({SCRIPT: [evil], "other": []}, [row])
    assert "<script" not in viewer.output.value and "&lt;script&gt;" in viewer.output.value
    assert "think &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in viewer.output.value
    viewer.system_picker.value = "other"
    assert "<script" not in viewer.output.value and "other has no prediction for this question" in viewer.output.value
    assert "<script" not in result_html(evil.to_dict(), row)


# ------------------------------------------------------------------------------------------ mutation audit
def png_size(cell) -> tuple[int, int]:
    return Image.open(io.BytesIO(cell.children[0].value)).size


def test_browser_thumbnails_fit_the_thumb_size_and_show_transparency_on_white():
    """Small synthetic images are enlarged crisply up to ``thumb``, large ones shrunk to it (never past it, whichever
    side is longer), transparent pixels are white as the model sees them, and a PIL image whose file was cut short
    is labelled like any other image without pixels."""
    row = make_rows(1)[0]
    images = [i for i, c in enumerate(row["candidates"]) if c["modality"] == "image"]
    sized = {images[0]: Image.new("RGB", (40, 30), (1, 2, 3)), images[1]: Image.new("RGB", (300, 400), (1, 2, 3))}
    cands = [dict(c, image=sized[i]) if i in sized else c for i, c in enumerate(row["candidates"])]
    for thumb, small, large in ((96, (80, 60), (72, 96)), (64, (40, 30), (48, 64))):
        browser = dataset_browser([dict(row, candidates=cands)], thumb=thumb)
        assert (png_size(browser.grid.children[images[0]]), png_size(browser.grid.children[images[1]])) == (small, large)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    cell = dataset_browser([dict(row, candidates=[dict(cands[images[0]], image=clear)])]).grid.children[0]
    assert Image.open(io.BytesIO(cell.children[0].value)).convert("RGB").getcolors() == [(96 * 96, (255, 255, 255))]
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    cut = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # opened lazily: fails only when drawn
    cell = dataset_browser([dict(row, candidates=[dict(cands[images[0]], image=cut)])]).grid.children[0]
    assert [w.value for w in cell.children[:1]] == [NO_PIXELS_HTML]  # a label, not an OSError in the notebook


def test_browser_header_lists_every_gold_id_and_keywords_only_when_there_are_some():
    """A question with two gold sources names both; a text question (no keyword) shows no "keywords: None"."""
    row = make_rows(1)[0]
    golds = [row["candidates"][1]["id"], row["candidates"][3]["id"]]
    header = dataset_browser([dict(row, gold_ids=golds, keywords=None, qcate="text")]).header.value
    assert f"gold: {', '.join(golds)}" in header and "keywords" not in header and "None" not in header
    assert "<b>keywords</b>: blue" in dataset_browser([dict(row, keywords="blue")]).header.value


def test_browser_cells_show_each_candidates_title_and_text_cut_only_past_the_limit():
    """Each cell is its own candidate's title and caption / snippet, whole up to ``max_chars``."""
    from mmrag_lite.widgets import candidate_html

    row = make_rows(1)[0]
    cells = cell_texts(dataset_browser([row]))
    assert all(f"<i>{c['title']}</i><br>{c['text']}</div>" in cell for c, cell in zip(row["candidates"], cells))
    cand = row["candidates"][1]
    assert candidate_html(dict(cand, text="x" * 160)).endswith("<br>" + "x" * 160 + "</div>")  # at the limit: whole
    assert candidate_html(dict(cand, text="x" * 161)).endswith("<br>" + "x" * 159 + "…</div>")  # past it: 160 chars


def test_playground_table_lists_each_weighted_component_once():
    """Each component's row holds its reward, its weight and their product; the total has its own row only."""
    completion = stage2_target(["D2"], "red", reasoning=False)
    weights = {"format": 0.2, "ranking": 0.5, "answer": 2.0}
    out = reward_playground(2, row=ROW2, weights=weights, reasoning=False, completion=completion).output.value
    scores = score_completion(completion, ROW2, stage=2, weights=weights, reasoning=False)
    rows = re.findall(r"<tr><td>(\w+)</td><td>([+-][\d.]+)</td><td>([\d.]+)</td><td>([+-][\d.]+)</td></tr>", out)
    assert rows == [(n, f"{scores[n]:+.3f}", f"{weights[n]:g}", f"{weights[n] * scores[n]:+.3f}") for n in weights]
    assert scores["answer"] != 0 and weights["answer"] != 1  # the weighted column really differs from the reward


def test_playground_says_when_the_think_block_is_too_short_to_pay_the_format_reward():
    """Otherwise a well-formed completion whose format reward is 0 would look like a bug in the reward."""
    completion = stage1_target("yes", reasoning=True, think="too short")
    pg = reward_playground(1, row={"label": "yes"}, reasoning=True, completion=completion, min_think_words=3)
    assert "the &lt;think&gt; holds 2 word(s); this format reward asks for at least 3 (min_think_words)" in pg.output.value
    pg.textarea.value = stage1_target("yes", reasoning=True, think="long enough this time")
    assert "min_think_words" not in pg.output.value
    assert reward_playground(1, completion="").textarea.value == ""  # an empty completion is scored as typed


def test_viewer_lists_kept_candidates_in_d_order_then_the_rest_by_score():
    """The table reads as the pipeline ran: kept candidates as D1, D2, ..., then the others from the filter's best
    score down (unscored last); gold rows shaded; captions shown whole up to 120 characters; no score is a dash."""
    row = make_rows(1, pool=6, prefix="o")[0]
    row["candidates"][0]["text"] = "t" * 120
    ids = [c["id"] for c in row["candidates"]]
    scores = {ids[0]: 0.2, ids[1]: 0.9, ids[2]: 0.5, ids[4]: 0.6, ids[5]: 0.4}  # ids[3] unscored
    res = result(row, "full", scores=scores, kept_ids=(ids[2], ids[1]))
    page = reasoning_viewer([res], [row]).output.value
    order = re.findall(r"<code>([^<]+)</code>", page)
    assert order == [ids[2], ids[1], ids[4], ids[5], ids[0], ids[3]]
    for cid in ids:
        assert table_row(page, cid).startswith(" style='background:#e8f5e9'") == (cid in row["gold_ids"])
    assert "t" * 120 + "</td>" in table_row(page, ids[0]) and f"snippet {ids[1]}</td>" in table_row(page, ids[1])
    nan = reasoning_viewer([result(row, "full", scores=dict(scores, **{ids[0]: float("nan")}))], [row]).output.value
    assert "<td>—</td>" in table_row(nan, ids[0]) and "<td>nan</td>" not in nan  # NaN in the result object itself
