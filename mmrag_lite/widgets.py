"""ipywidgets viewers for the notebooks. Each viewer returns a widget; ``display()`` it in a notebook.

Headless runs (papermill, tests) can build the widgets without a front end; nothing here needs a browser.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .data.images import ImageStoreError, load_image_bytes, to_rgb
from .data.webqa import QCATES as QCATE_OPTIONS

if TYPE_CHECKING:
    from ipywidgets import VBox

# ----------------------------------------------------------------------------------------- dataset browser
NO_PIXELS_HTML = "<small style='color:#888'>(image candidate without pixels)</small>"


def _png_bytes(image: Any, size: int = 96) -> bytes | None:
    """Thumbnail bytes for an ``ipywidgets.Image`` from a PIL image or a ``{"bytes": ...}`` dict.

    ``None`` when there is nothing to draw (no pixels, or bytes PIL cannot decode): a viewer shows
    ``NO_PIXELS_HTML`` instead of failing on one bad image.
    """
    if image is None:
        return None
    from PIL import Image

    try:  # stored bytes decode as everywhere else (load_image_bytes: its errors, its truncation rule), RGB on white
        if isinstance(image, Mapping):
            im = load_image_bytes(image["bytes"]) if image.get("bytes") else None
        elif isinstance(image, (bytes, bytearray)):
            im = load_image_bytes(bytes(image)) if image else None
        elif isinstance(image, Image.Image):
            im = to_rgb(image)  # transparent pixels on white, as the model sees them
        else:  # a path string or anything else: no pixels here to draw
            im = None
    except (ImageStoreError, OSError, ValueError):
        return None
    if im is None or min(im.size) < 1:  # a 0-pixel-wide image has nothing to draw (and would divide by zero below)
        return None
    scale = max(1, size // max(im.size))  # small synthetic images: enlarge crisply
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    else:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def example_html(row: Mapping[str, Any]) -> str:
    """The question block of one Mini-WebQA row as HTML (question, answer, keywords, category, gold ids)."""
    esc = html.escape
    return (
        f"<div style='font-family:sans-serif'>"
        f"<b>Q</b> ({esc(str(row.get('qcate', '')))}, topic {esc(str(row.get('topic', '')))}): "
        f"{esc(str(row.get('question', '')))}<br>"
        f"<b>A</b>: {esc(str(row.get('answer', '')))}"
        + (f" &nbsp; <b>keywords</b>: {esc(str(row['keywords']))}" if row.get("keywords") else "")
        + f"<br><small>guid {esc(str(row.get('guid', '')))} · gold: {esc(', '.join(map(str, row.get('gold_ids', []))))}</small>"
        f"</div>"
    )


def candidate_html(candidate: Mapping[str, Any], max_chars: int = 160) -> str:
    """One candidate's caption / snippet as HTML; gold candidates are marked ★ and boxed in green."""
    esc = html.escape
    text = str(candidate.get("text", ""))
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    gold = bool(candidate.get("is_gold"))
    colour = "#2ca02c" if gold else "#bbbbbb"
    mark = "★ gold" if gold else "distractor"
    return (
        f"<div style='border:2px solid {colour};padding:4px;font-size:11px;font-family:sans-serif;"
        f"width:210px;min-height:60px'><b>{esc(str(candidate.get('id', '')))}</b> [{esc(str(candidate.get('modality', '')))}]"
        f" <span style='color:{colour}'>{mark}</span><br><i>{esc(str(candidate.get('title', '')))}</i><br>{esc(text)}</div>"
    )


def dataset_browser(dataset: Any, split: str | None = None, thumb: int = 96, columns: int = 4) -> VBox:
    """Browse Mini-WebQA: pick a split and a question; see the answer and every candidate (gold marked ★).

    ``dataset`` is a ``DatasetDict`` (a split picker is shown), a ``Dataset``, a list of row dicts or one row dict.
    A ``split`` the ``DatasetDict`` lacks is a ``ValueError`` naming the ones it has.
    """
    import ipywidgets as W

    if dataset is None:
        raise ValueError("dataset_browser needs a DatasetDict with at least one split, a Dataset or a list of rows, got None")
    if isinstance(dataset, Mapping) and "guid" in dataset and "question" in dataset:
        dataset = [dataset]  # one row (e.g. ds["train"][0]), not a dict of splits named "guid", "question", ...
    splits = {}
    if hasattr(dataset, "keys") and not isinstance(dataset, (list, tuple)) and not hasattr(dataset, "features"):
        splits = {k: dataset[k] for k in list(dataset)}
    else:
        splits = {split or "rows": dataset}
    names = list(splits)
    if not names:
        raise ValueError("dataset_browser needs a DatasetDict with at least one split, a Dataset or a list of rows")
    if split is not None and split not in splits:  # never another split's rows under the name asked for
        raise ValueError(f"dataset_browser: no split {split!r} in this dataset; its splits are {names}")
    split_pick = W.Dropdown(options=names, value=split if split in splits else names[0], description="split")
    index = W.IntSlider(min=0, max=max(0, len(splits[split_pick.value]) - 1), value=0, description="question",
                        continuous_update=False)
    header = W.HTML()
    grid = W.GridBox(layout=W.Layout(grid_template_columns=f"repeat({columns}, 220px)", grid_gap="6px"))

    def render(*_: Any) -> None:
        rows = splits[split_pick.value]
        if len(rows) == 0:
            header.value, grid.children = "<i>empty split</i>", ()
            return
        row = rows[int(index.value)]
        header.value = example_html(row)
        cells = []
        candidates = row.get("candidates") or ()
        if not candidates:
            header.value += "<i>this row has no candidates</i>"
        for cand in candidates:
            parts = []
            png = _png_bytes(cand.get("image"), thumb) if cand.get("modality") == "image" else None
            if png is not None:
                parts.append(W.Image(value=png, format="png", layout=W.Layout(width=f"{thumb}px")))
            elif cand.get("modality") == "image":
                parts.append(W.HTML(NO_PIXELS_HTML))
            parts.append(W.HTML(candidate_html(cand)))
            cells.append(W.VBox(parts))
        grid.children = tuple(cells)

    def on_split(*_: Any) -> None:
        index.max = max(0, len(splits[split_pick.value]) - 1)
        index.value = 0
        render()

    split_pick.observe(on_split, names="value")
    index.observe(render, names="value")
    render()
    controls = W.HBox([split_pick, index] if len(names) > 1 else [index])
    box = W.VBox([controls, header, grid])
    box.render = render  # handy for tests and for re-drawing after a change
    box.split_picker, box.index_slider, box.header, box.grid = split_pick, index, header, grid
    return box


# ----------------------------------------------------------------------------------------- reward playground
def reward_table_html(scores: Mapping[str, float], weights: Mapping[str, float], problems: Any = (),
                      row_notes: Sequence[str] = ()) -> str:
    """Every reward component, its weight and contribution, the weighted total, what the parser complained about,
    and ``row_notes`` about the row itself (e.g. gold ids no completion can cite)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{value:+.3f}</td><td>{weights.get(name, 0.0):g}</td>"
        f"<td>{weights.get(name, 0.0) * value:+.3f}</td></tr>"
        for name, value in scores.items() if name != "total"
    )
    issues = "".join(f"<li><code>{esc(p.code)}</code> {esc(p.message)}</li>" for p in problems) or "<li>none: well formed</li>"
    issues += "".join(f"<li><b>row</b>: {esc(note)}</li>" for note in row_notes)
    return (
        "<table style='font-family:monospace;border-collapse:collapse' border=1 cellpadding=3>"
        "<tr><th>component</th><th>reward</th><th>weight</th><th>weighted</th></tr>"
        f"{rows}<tr><td><b>total</b></td><td></td><td></td><td><b>{scores.get('total', 0.0):+.3f}</b></td></tr></table>"
        f"<div style='font-family:sans-serif;font-size:12px'><b>parser problems</b><ul>{issues}</ul></div>"
    )


def _id_list(ids: Any) -> list[str]:
    """An id column as a list of strings: ``["D1", "D2"]`` from a list, or from ``"D1, D2"`` typed as one string."""
    if ids is None:
        return []
    if isinstance(ids, str):
        return [s.strip() for s in ids.split(",") if s.strip()]
    return [str(i) for i in ids]


def _text(value: Any) -> str:
    """A row's text column as a text field's value: a missing one (``None``) is empty, never the word ``None``."""
    return "" if value is None else str(value)


def _ids_text(ids: Any) -> str:
    """An id column as the playground's text field: ``"D1, D2"``."""
    return ", ".join(_id_list(ids))


def reward_playground(
    stage: int = 2,
    *,
    completion: str | None = None,
    row: Mapping[str, Any] | None = None,
    weights: Mapping[str, float] | None = None,
    reasoning: bool = True,
    **reward_options: Any,
) -> VBox:
    """Type a completion, see every reward component and the weighted total update live (``rewards.score_completion``).

    ``row`` holds the dataset columns the rewards read (stage 1: ``label``; stage 2: ``candidate_ids``, ``gold_ids``,
    ``answer``, ``keywords``, ``qcate``); the text fields let you change them. Builds without a front end.
    """
    import ipywidgets as W

    from mmrag_lite import rewards
    from mmrag_lite.prompts import stage1_target, stage2_target

    if stage == 1:
        row = dict(row or {"label": "yes"})
        weights = dict(weights or {"format": 0.2, "relevance": 1.0})
        completion = completion if completion is not None else stage1_target(str(row.get("label", "yes")), reasoning=reasoning, think="...")
        fields = {"label": W.Text(value=_text(row.get("label")), description="label")}
    elif stage != 2:
        raise ValueError(f"reward_playground: stage must be 1 or 2, got {stage!r}")
    else:
        row = dict(row or {"candidate_ids": ["D1", "D2", "D3", "D4"], "gold_ids": ["D2"], "answer": "The car is red.",
                           "keywords": "red", "qcate": "color"})
        weights = dict(weights or {"format": 0.2, "ranking": 0.5, "answer": 1.0})
        completion = completion if completion is not None else stage2_target(_id_list(row.get("gold_ids")), "red",
                                                                              reasoning=reasoning, think="...")
        fields = {
            "candidate_ids": W.Text(value=_ids_text(row.get("candidate_ids")), description="candidates"),
            "gold_ids": W.Text(value=_ids_text(row.get("gold_ids")), description="gold ids"),
            "answer": W.Text(value=_text(row.get("answer")), description="answer"),
            "keywords": W.Text(value=_text(row.get("keywords")), description="keywords"),  # None: no keyword, not "None"
            "qcate": W.Dropdown(options=list(dict.fromkeys([*QCATE_OPTIONS, str(row.get("qcate") or "text")])),
                                value=str(row.get("qcate") or "text"), description="qcate"),
        }
    text = W.Textarea(value=completion, description="completion", layout=W.Layout(width="95%", height="110px"))
    think = W.Checkbox(value=reasoning, description="reasoning (<think> required)")
    out = W.HTML()

    def current_row() -> dict[str, Any]:
        values: dict[str, Any] = dict(row)  # columns without a text field (e.g. the question the guard reads) stay
        for name, widget in fields.items():
            v = widget.value
            values[name] = _id_list(v) if name in ("candidate_ids", "gold_ids") else v
        return values

    def render(*_: Any) -> None:
        r = current_row()
        try:
            scores = rewards.score_completion(text.value, r, stage=stage, weights=weights, reasoning=think.value, **reward_options)
            parsed = rewards.explain(text.value, stage=stage, reasoning=think.value, candidate_ids=r.get("candidate_ids"))
            unseen = [g for g in r.get("gold_ids", []) if g not in r.get("candidate_ids", [])]
            row_notes = [f"gold ids not among the candidates, so no completion can cite them: {', '.join(unseen)}"] if unseen else []
            floor = reward_options.get("min_think_words", 0)
            if parsed.ok and rewards.too_few_think_words(parsed, reasoning=think.value, min_think_words=floor):
                row_notes.append(f"the <think> holds {len((parsed.think or '').split())} word(s); this format reward "
                                 f"asks for at least {floor} (min_think_words), so it pays nothing")
            out.value = reward_table_html(scores, weights, parsed.problems, row_notes)
        except ValueError as exc:  # a broken row typed by hand: say so instead of raising in a callback
            out.value = f"<pre>{html.escape(str(exc))}</pre>"

    for widget in (text, think, *fields.values()):
        widget.observe(render, names="value")
    render()
    box = W.VBox([text, think, W.HBox(list(fields.values())[:3]), W.HBox(list(fields.values())[3:]), out])
    box.render, box.textarea, box.output, box.fields = render, text, out, fields
    return box


# ----------------------------------------------------------------------------------------- reasoning viewer
def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def result_html(result: Any, row: Mapping[str, Any] | None = None, *, thumb: int = 64) -> str:
    """One question through the pipeline, as HTML: every candidate with its stage-1 score, whether it was kept
    (and as which ``D``-id), cited and gold; then the model's reasoning, sources and answer beside the gold ones.

    ``result`` is a ``pipeline.PipelineResult`` or its ``to_dict()``; ``row`` the Mini-WebQA row (for captions,
    images and the gold answer). Pure: returns a string, so it works headless and in tests.
    """
    import base64
    import math

    from mmrag_lite.metrics import top_k_ids

    esc = html.escape
    scores = dict(_field(result, "scores", {}) or {})
    kept = [str(i) for i in _field(result, "kept_ids", ()) or ()]  # a JSON null is "none kept", not a TypeError
    sources = [str(i) for i in _field(result, "sources", ()) or ()]
    short = {cid: f"D{i + 1}" for i, cid in enumerate(kept)}
    cands = list(row.get("candidates") or ()) if row else []
    known = {str(c["id"]) for c in cands}
    missing = "(not in this row's pool)" if row else ""  # e.g. an injected trap viewed against the clean row
    cands += [{"id": cid, "text": missing} for cid in kept if cid not in known]
    gold = {str(g) for g in (row.get("gold_ids", []) if row else [])}
    # kept ones in D-order, then the rest as the stage-1 filter ranks them (NaN and unscored last)
    ranked = {cid: i for i, cid in enumerate(top_k_ids(scores, len(cands), [str(c["id"]) for c in cands]))}
    order = sorted(cands, key=lambda c: (0, kept.index(str(c["id"]))) if str(c["id"]) in short else (1, ranked[str(c["id"])]))
    lines = []
    for c in order:
        cid = str(c["id"])
        png = _png_bytes(c.get("image"), thumb) if c.get("modality") == "image" else None
        img = (f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' width={thumb}>" if png
               else NO_PIXELS_HTML if c.get("modality") == "image" else "")
        s = scores.get(cid)
        s_txt = "—" if s is None or math.isnan(s) else f"{s:.3f}"
        text = str(c.get("text", ""))
        text = text if len(text) <= 120 else text[:119] + "…"
        style = "background:#e8f5e9" if cid in gold else ""
        lines.append(
            f"<tr style='{style}'><td>{img}</td><td><b>{short.get(cid, '')}</b></td><td><code>{esc(cid)}</code></td>"
            f"<td>{esc(str(c.get('modality', '')))}</td><td>{esc(text)}</td><td>{s_txt}</td>"
            f"<td>{'kept' if cid in short else ''}</td><td>{'cited' if cid in sources else ''}</td>"
            f"<td>{'★ gold' if cid in gold else ''}</td></tr>")
    think = str(_field(result, "reasoning", "") or "")
    think_html = (f"<pre style='white-space:pre-wrap'>{esc(think)}</pre>" if think else
                  "<i>no &lt;think&gt; block (this system was asked to answer without reasoning, or did not write one)</i>")
    problems = list(_field(result, "problems", ()) or ())
    gold_answer = esc(str(row.get("answer", ""))) if row else "?"
    return (
        "<div style='font-family:sans-serif;font-size:12px'>"
        f"<b>[{esc(str(_field(result, 'system', '')))}]</b> <b>Q</b>: {esc(str(_field(result, 'question', '')))}<br>"
        "<table border=1 cellpadding=3 style='border-collapse:collapse;margin:6px 0'>"
        "<tr><th></th><th>shown as</th><th>id</th><th>modality</th><th>caption / snippet</th><th>filter's P(yes)</th>"
        "<th>kept</th><th>cited</th><th>gold</th></tr>" + "".join(lines) + "</table>"
        f"<b>reasoning</b> (the explanation): {think_html}"
        "<table border=1 cellpadding=3 style='border-collapse:collapse;margin-top:6px'>"
        "<tr><th></th><th>model</th><th>gold</th></tr>"
        f"<tr><td>sources</td><td>{esc(', '.join(sources)) or '—'}</td><td>{esc(', '.join(sorted(gold))) or '?'}</td></tr>"
        f"<tr><td>answer</td><td>{esc(str(_field(result, 'answer', '') or '')) or '—'}</td><td>{gold_answer}</td></tr></table>"
        f"<details><summary>raw completion</summary><pre style='white-space:pre-wrap'>{esc(str(_field(result, 'completion', '')))}</pre></details>"
        + (f"<small>parser / pipeline notes: {esc('; '.join(map(str, problems)))}</small>" if problems else "")
        + "</div>"
    )


def _is_result(obj: Any) -> bool:
    return hasattr(obj, "guid") or (isinstance(obj, Mapping) and "guid" in obj)


def _predictions_by_system(predictions: Any) -> dict[str, list[Any]]:
    """``{system: [result, ...]}`` from that mapping or from one list; a clear error for anything else."""
    if predictions is None or isinstance(predictions, (str, bytes)) or _is_result(predictions):
        raise TypeError("reasoning_viewer needs {system: [PipelineResult, ...]} or a list of results, got "
                        f"{type(predictions).__name__}" + (" (one result: pass [result])" if predictions is not None
                                                           and _is_result(predictions) else ""))
    preds = ({str(k): v for k, v in predictions.items()} if isinstance(predictions, Mapping)
             else {"predictions": predictions})
    out = {}
    for name, results in preds.items():
        if results is None or isinstance(results, (str, bytes, Mapping)) or _is_result(results):
            raise TypeError(f"reasoning_viewer: system {name!r} should hold a list of results, got {type(results).__name__}")
        results = list(results)
        bad = next((r for r in results if not _is_result(r)), None)
        if bad is not None:
            raise TypeError(f"reasoning_viewer: system {name!r} holds a {type(bad).__name__}, not a result with a guid")
        out[name] = results
    return out


def _rows_by_guid(rows: Any) -> dict[str, Mapping[str, Any]]:
    """The rows of one split by guid; a clear error for a whole DatasetDict or rows without a guid."""
    if rows is None:
        return {}
    if isinstance(rows, Mapping) or (hasattr(rows, "keys") and not hasattr(rows, "features")):
        raise TypeError("reasoning_viewer needs the rows of one split (e.g. ds['test'] or a list of row dicts), got "
                        f"{type(rows).__name__} with keys {list(rows.keys())[:5]}")
    by_guid = {}
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or "guid" not in r:
            raise TypeError(f"reasoning_viewer: row {i} has no 'guid' (got {type(r).__name__})")
        by_guid[str(r["guid"])] = r
    return by_guid


def reasoning_viewer(predictions: Any, rows: Any, *, thumb: int = 64) -> VBox:
    """Pick a system and a question; see candidates, stage-1 scores, kept ids, the reasoning, sources and answer
    next to the gold ones. ``predictions``: ``{system: [PipelineResult, ...]}`` or one list. Builds headless.
    """
    import ipywidgets as W

    preds = _predictions_by_system(predictions)
    preds = preds or {"predictions": []}  # no system yet: the viewer says "no predictions" rather than failing
    by_guid = _rows_by_guid(rows)
    names = list(preds)
    system = W.Dropdown(options=names, value=names[0], description="system")
    # every question any system answered, in first-seen order: systems may cover different questions
    questions: dict[str, str] = {}
    for results in preds.values():
        for r in results:
            questions.setdefault(str(_field(r, "guid")), str(_field(r, "question", "") or ""))
    guids = list(questions)
    question = W.Dropdown(options=[(f"{i}: {questions[g][:60]}", g) for i, g in enumerate(guids)],
                          value=guids[0] if guids else None, description="question", layout=W.Layout(width="70%"))
    out = W.HTML()

    def render(*_: Any) -> None:
        if question.value is None:
            out.value = "<i>no predictions</i>"
            return
        match = next((r for r in preds[system.value] if str(_field(r, "guid")) == question.value), None)
        if match is None:  # never another question's result in its place
            out.value = (f"<i>{html.escape(str(system.value))} has no prediction for this question: "
                         f"{html.escape(questions[question.value])}</i>")
            return
        row = by_guid.get(question.value)
        note = "" if row is not None or rows is None else (  # a result for another split's rows: say why gold is "?"
            f"<p><i>guid {html.escape(question.value)} is not among the {len(by_guid)} rows given to the viewer: "
            "no captions, images or gold to show beside it (were these predictions made on another split?)</i></p>")
        out.value = note + result_html(match, row, thumb=thumb)

    system.observe(render, names="value")
    question.observe(render, names="value")
    render()
    box = W.VBox([W.HBox([system, question]), out])
    box.render, box.output, box.system_picker, box.question_picker = render, out, system, question
    return box
