"""Two-stage inference: pure pieces, then the whole pipeline on a few synthetic questions with the tiny model."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmrag_lite import pipeline as P
from mmrag_lite.config import get_preset

PRESET = get_preset("cpu-tiny")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def synthetic_rows(n: int = 3, pool: int = 6) -> list[dict]:
    """Questions in the Mini-WebQA shape: images with numeric ids, snippets with ``<guid>_<n>`` ids, 2 gold each."""
    rows = []
    for q in range(n):
        cands = []
        for j in range(pool):
            colour = list(COLOURS)[(q + j) % 3]
            if j % 2 == 0:
                cands.append({"id": str(3000 + 10 * q + j), "modality": "image", "title": f"{colour} square",
                              "text": f"a {colour} square", "image": Image.new("RGB", (40, 30), COLOURS[colour]),
                              "is_gold": j == 0})
            else:
                cands.append({"id": f"q{q}_{j}", "modality": "text", "title": f"fact {j}",
                              "text": f"the square is {colour}", "image": None, "is_gold": j == 1})
        rows.append({"guid": f"q{q}", "question": f"What colour is square number {q}?", "answer": "red", "keywords": "red",
                     "qcate": "color", "topic": "synthetic", "candidates": cands,
                     "gold_ids": [c["id"] for c in cands if c["is_gold"]]})
    return rows


ROWS = synthetic_rows()


# ------------------------------------------------------------------------------------------ pure pieces
def test_top_k_ids_ties_keep_pool_order_and_nan_ranks_last():
    scores = {"a": 0.5, "b": 0.9, "c": 0.5, "d": float("nan")}
    assert P.top_k_ids(scores, 3, ["a", "b", "c", "d"]) == ["b", "a", "c"]
    assert P.top_k_ids(scores, 10, ["d", "a", "b", "c"])[-1] == "d"


def test_select_candidates_per_filter():
    row = ROWS[0]
    ids = [c["id"] for c in row["candidates"]]
    assert [c["id"] for c in P.select_candidates(row, P.SystemSpec("z", "all", "base"), None, 2)] == ids
    oracle = P.select_candidates(row, P.SystemSpec("o", "oracle", "base"), None, 2)
    assert {c["id"] for c in oracle} == set(row["gold_ids"])
    scores = {cid: i / 10 for i, cid in enumerate(ids)}
    top = P.select_candidates(row, P.SystemSpec("s", "stage1", "base"), scores, 2)
    assert [c["id"] for c in top] == ids[::-1][:2]
    with pytest.raises(ValueError):
        P.select_candidates(row, P.SystemSpec("s", "stage1", "base"), None, 2)
    twice = {**row, "candidates": row["candidates"] + [dict(row["candidates"][2], title="another document")]}
    with pytest.raises(ValueError, match=r"unique, repeated: \['3002'\]"):  # one would be shown twice, one lost
        P.select_candidates(twice, P.SystemSpec("s", "stage1", "base"), scores, 2)
    with pytest.raises(ValueError, match=f"none were given for question {row['guid']!r}"):
        P.select_candidates(row, P.SystemSpec("s", "stage1", "base"), {}, 2)  # not the pool's first two, unscored
    with pytest.raises(ValueError, match="none were given"):
        P.select_candidates(row, P.SystemSpec("s", "base", "base"), {"another question's id": 0.9}, 2)


@pytest.mark.parametrize(("fields", "message"), [
    (("stage-1", "stage2"), "filter 'stage-1' is not one of all, base, stage1, oracle"),
    (("stage1", "stage_2"), "answerer 'stage_2' is not one of base, stage1, stage2"),
    (("stage1", "stage2", 0), "k must be at least 1"),
])
def test_a_mistyped_system_is_refused_where_it_is_written(fields, message):
    """A typo used to skip scoring and answer over the pool's first k: numbers that mean nothing, no warning."""
    with pytest.raises(ValueError, match=message):
        P.SystemSpec("mine", *fields)


def test_oracle_filter_keeps_every_gold_padded_to_k_in_score_order():
    """The oracle is a perfect stage 1: all gold in the top-k, the best distractors fill it to k (the list length
    stage 2 trained on), and the order is the stage-1 score order, as on the normal path."""
    row = ROWS[0]
    ids = [c["id"] for c in row["candidates"]]
    gold = set(row["gold_ids"])
    scores = {cid: (0.05 if cid in gold else 0.1 * (i + 1)) for i, cid in enumerate(ids)}  # the judge ranks gold last
    for k in (3, 4):
        kept = P.oracle_ids(row, scores, k)
        assert gold <= set(kept) and len(kept) == k
        best_distractors = [i for i in P.top_k_ids(scores, len(ids), ids) if i not in gold][: k - len(gold)]
        assert set(kept) - gold == set(best_distractors)
        assert kept == [i for i in P.top_k_ids(scores, len(ids), ids) if i in kept]  # stage-1 score order
        shown = P.select_candidates(row, P.SystemSpec("o", "oracle", "stage2"), scores, k)
        assert [c["id"] for c in shown] == kept
    # by hand: distractors 3002 .3, q0_3 .4, 3004 .5, q0_5 .6; gold 3000 and q0_1 tie at .05 (pool order)
    assert P.oracle_ids(row, scores, 3) == ["q0_5", "3000", "q0_1"]
    assert P.oracle_ids(row, scores, 4) == ["q0_5", "3004", "3000", "q0_1"]
    assert set(P.oracle_ids(row, scores, 1)) == gold  # more gold than k: the guarantee wins
    with pytest.raises(ValueError, match="scores"):
        P.oracle_ids(row, None, 4)  # padding needs the judge's ranking
    absent = {**row, "gold_ids": [*row["gold_ids"], "not_in_the_pool"]}  # gold the pool lacks cannot be shown
    assert P.oracle_ids(absent, scores, 3) == P.oracle_ids(row, scores, 3)  # and does not shorten the list
    assert P.ORACLE_SYSTEM in [s.name for s in P.standard_systems(PRESET)]
    assert next(s for s in P.standard_systems(PRESET) if s.filter == "oracle").name == P.ORACLE_SYSTEM


def test_request_and_short_id_mapping():
    req = P.build_request(ROWS[0], ROWS[0]["candidates"][:3], reasoning=False)
    assert req.short_ids == ("D1", "D2", "D3") and len(req.images) == 2
    assert P.map_short_ids(["D3", "D1", "D9", "D3"], req) == (req.source_ids[2], req.source_ids[0])
    _think, short, sources, answer, problems = P.parse_completion(
        "<sources>D2, D7</sources><answer> red </answer>", req, reasoning=False)
    assert short == ("D2", "D7") and sources == (req.source_ids[1],) and answer == "red"
    assert any(p.startswith("unknown_id") for p in problems)


def test_result_round_trip_and_submission(tmp_path):
    r = P.PipelineResult(guid="g", question="q?", system="s", scores={"30174997": 0.7, "g_1": float("nan")},
                         kept_ids=("30174997", "g_1"), reasoning="because", completion="<...>",
                         sources=("30174997", "g_1"), answer="red", problems=("x: y",))
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and d["scores"]["g_1"] is None
    back = P.PipelineResult.from_dict(d)
    assert back.sources == r.sources and math.isnan(back.scores["g_1"])
    sub = P.submission_from_results([r])
    assert sub == {"g": {"sources": [30174997, "g_1"], "answer": "red"}}  # image ids are ints, as in WebQA
    odd = P.PipelineResult(**{**r.__dict__, "sources": ("0123", "²", "١٢٣"), "scores": {"a": np.float32("nan")}})
    assert P.submission_from_results([odd])["g"]["sources"] == ["0123", "²", "١٢٣"]  # only plain numbers become ints
    assert odd.to_dict()["scores"] == {"a": None}  # a numpy NaN too
    numpy_ids = P.PipelineResult(**{**r.__dict__, "kept_ids": (np.int64(30174997), "g_1"), "sources": (np.int64(30174997),)})
    d = json.loads(json.dumps(numpy_ids.to_dict()))  # plain JSON, as the docstring says
    assert d["kept_ids"] == ["30174997", "g_1"] and d["sources"] == ["30174997"]
    assert P.PipelineResult.from_dict({**d, "kept_ids": [30174997, "g_1"]}).kept_ids == ("30174997", "g_1")
    path = P.write_submission([r], tmp_path / "eval" / "sub.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(sub))
    assert [p.name for p in path.parent.iterdir()] == ["sub.json"]  # atomic: no temp file left


def test_saved_scores_are_reused_only_for_the_adapter_that_wrote_them(tmp_path):
    from mmrag_lite import scoring

    adapter = _fake_adapter(tmp_path / "stage1" / "adapter", P.preset_base_model(PRESET))
    P.save_stage1_scores({"g": [("a", 0.2), ("b", 0.9)]}, PRESET, tmp_path, "test", adapter)
    own = P.ModelBank(PRESET, tmp_path, verbose=False)
    assert P.reusable_scores(own, "test") == {"g": {"a": 0.2, "b": 0.9}}
    assert P.reusable_scores(own, "train") == {}  # never saved
    other = _fake_adapter(tmp_path / "other-adapter", P.preset_base_model(PRESET))
    assert P.reusable_scores(P.ModelBank(PRESET, tmp_path, adapters={"stage1": other}, verbose=False), "test") == {}
    scoring.save_scores({"g": [("a", 0.2)]}, scoring.scores_path(tmp_path, "test"))  # no judge recorded
    assert P.reusable_scores(own, "test") == {} and any("unrecorded" in n for n in own.notes)
    scoring.scores_path(tmp_path, "test").write_text(json.dumps({"g": {"a": 0.2}}))  # an older layout
    assert P.reusable_scores(own, "test") == {}  # recomputed, not read with a guess and not an error


def test_saved_scores_stay_strict_json_with_a_nan_score(tmp_path):
    from mmrag_lite import scoring

    path = scoring.save_scores({"g": [("a", float("nan")), ("b", 0.9)]}, scoring.scores_path(tmp_path, "test"))
    json.loads(path.read_text(), parse_constant=_no_constant)  # a bare NaN would raise here
    back = P.load_cached_scores(tmp_path, "test")["g"]
    assert math.isnan(back["a"]) and back["b"] == 0.9
    assert P.top_k_ids(back, 1, ["a", "b"]) == ["b"]  # the overflowed candidate ranks last, as before saving
    path.write_text(json.dumps({"g": {"a": 0.2}}))  # an older layout: nothing readable, score again
    assert P.load_cached_scores(tmp_path, "test") == {}


# ------------------------------------------------------------------------------------------ with the tiny model
@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pipe")
    b = P.ModelBank(PRESET, wd, verbose=False)
    b.get("base")
    return b


def test_stage2_generation_ignores_a_checkpoints_repetition_penalty(bank):
    model, processor = bank.get("base")
    requests = [P.build_request(row, row["candidates"][:3], reasoning=False) for row in ROWS[:2]]
    plain = P.generate(model, processor, requests, max_new_tokens=12, progress=False)
    model.generation_config.repetition_penalty = 50.0  # a hub config's value must not reach evaluation's decoding
    try:
        assert P.generate(model, processor, requests, max_new_tokens=12, progress=False) == plain
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_token_batches_cap_a_calls_padded_tokens():
    assert P.token_batches([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]  # no cap: by count alone
    # padded size = prompts x the longest: 10+10 fits 20, a 15 makes 2 x 15 = 30 > 20, so it starts a call
    assert P.token_batches([10, 10, 15, 5, 5], 8, 20) == [[0, 1], [2], [3, 4]]
    assert P.token_batches([30, 4, 4, 4, 4, 4, 4], 4, 20) == [[0], [1, 2, 3, 4], [5, 6]]  # over the cap: alone
    assert P.token_batches([], 4, 20) == []
    with pytest.raises(ValueError, match="no cap"):
        P.token_batches([1], 0)


def test_generate_splits_calls_at_the_token_cap_and_keeps_order(bank):
    model, processor = bank.get("base")
    requests = [P.fit_prompt(row, row["candidates"], processor, reasoning=False, max_tokens=10_000) for row in ROWS]
    lengths = [r.prompt_tokens for r in requests]
    assert lengths == [P.prompt_length(processor, r) for r in requests]  # fit_prompt measured what generate reads
    seen: list[int] = []
    inner = model.generate

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return inner(*args, **kwargs)

    model.generate = counting
    try:
        together = P.generate(model, processor, requests, max_new_tokens=6, batch_size=8, progress=False)
        assert seen == [3]
        seen.clear()
        capped = P.generate(model, processor, requests, max_new_tokens=6, batch_size=8,
                            max_batch_tokens=2 * max(lengths), progress=False)
    finally:
        del model.generate  # the view's own method again (the fixture is shared by the module)
    assert seen == [2, 1]  # two prompts per call at most, in order
    assert capped == together  # greedy answers do not depend on the company a prompt keeps


def test_run_pipeline_reads_the_presets_token_cap(bank, monkeypatch):
    calls: list[dict] = []
    real = P.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "generate", spy)
    capped = PRESET.with_overrides(**{"evaluation.generation_max_batch_tokens": 1234})
    P.run_pipeline(ROWS[:1], capped, system=P.SystemSpec("z", "all", "base"), bank=bank, max_new_tokens=2, progress=False)
    assert calls[-1]["max_batch_tokens"] == 1234 and calls[-1]["max_new_tokens"] == 2  # the call's own budget wins
    assert calls[-1]["batch_size"] == P.generation_kwargs(capped)["batch_size"] == 64
    assert P.generation_kwargs(get_preset("colab-t4")) == {"max_new_tokens": 256, "batch_size": 32, "max_batch_tokens": 20_480}


def test_answering_shows_every_candidate_within_evaluations_prompt_cap_not_stage2s(bank):
    """A pool over stage 2's training cap loses candidates, unless evaluation.max_prompt_tokens makes room."""
    _, processor = bank.get("base")
    row = ROWS[0]
    n_full = P.prompt_length(processor, P.build_request(row, row["candidates"], reasoning=PRESET.stage2.reasoning,
                                                        image_fn=P.image_fn(PRESET)))
    tight = PRESET.with_overrides(**{"stage2.max_prompt_tokens": n_full - 1})
    roomy = tight.with_overrides(**{"evaluation.max_prompt_tokens": n_full})
    every = P.SystemSpec("z", "all", "base")
    (cut,) = P.run_pipeline([row], tight, system=every, bank=bank, max_new_tokens=2, progress=False)
    (whole,) = P.run_pipeline([row], roomy, system=every, bank=bank, max_new_tokens=2, progress=False)
    assert len(cut.kept_ids) < len(row["candidates"]) == len(whole.kept_ids)
    assert tight.answer_prompt_tokens == n_full - 1 and roomy.answer_prompt_tokens == n_full


def test_standard_systems_end_to_end_give_a_valid_submission(bank, tmp_path):
    from mmrag_lite import metrics

    refs = {r["guid"]: {"gold_ids": r["gold_ids"], "answer": r["answer"], "keywords": r["keywords"], "qcate": r["qcate"]}
            for r in ROWS}
    for spec in P.standard_systems(PRESET):
        results = P.run_pipeline(ROWS, PRESET, system=spec, bank=bank, progress=False)
        assert [r.guid for r in results] == [r["guid"] for r in ROWS]
        for res, row in zip(results, ROWS):
            pool = {c["id"] for c in row["candidates"]}
            assert set(res.kept_ids) <= pool and set(res.sources) <= set(res.kept_ids)
            assert isinstance(res.completion, str) and res.system == spec.name
            json.dumps(res.to_dict())
            if spec.filter == "oracle":  # a perfect stage-1 filter: every gold kept, padded to k by score
                assert set(row["gold_ids"]) <= set(res.kept_ids) and len(res.kept_ids) == PRESET.stage1.k
                assert set(res.scores) == pool
                assert list(res.kept_ids) == [i for i in P.top_k_ids(res.scores, len(pool), list(pool)) if i in res.kept_ids]
            elif spec.filter in ("base", "stage1"):
                assert len(res.kept_ids) == PRESET.stage1.k and set(res.scores) == pool
                ranked = sorted(res.scores, key=lambda i: -res.scores[i])
                assert set(res.kept_ids) == set(ranked[: PRESET.stage1.k])
            else:
                assert res.kept_ids == tuple(c["id"] for c in row["candidates"]) and res.scores == {}
        path = P.write_submission(results, tmp_path / f"{spec.name}.json")
        report = metrics.evaluate_webqa_submission(json.loads(path.read_text()), refs)
        overall = report.overall
        assert overall["n"] == len(ROWS) and 0.0 <= overall["retrieval_f1"] <= 1.0 and 0.0 <= overall["acc"] <= 1.0
        # the file round trip (image ids written as ints) keeps every cited id matching its gold id
        direct = sum(metrics.webqa_retrieval_f1(r.sources, row["gold_ids"]) for r, row in zip(results, ROWS)) / len(ROWS)
        assert overall["retrieval_f1"] == pytest.approx(direct)
        assert not any("no prediction" in n for n in report.notes)
    assert any("stage2" in n for n in bank.notes)  # the missing adapter was said out loud, not hidden


def test_mmqa_pools_with_some_pixels_run_through_both_stages(bank, tmp_path):
    """MMQA rows from ``attach_mmqa_images``: hex ids, image candidates with pixels and without (a file missing)."""
    from mmrag_lite import data, evaluation

    images = {f"{n:032x}": data.MMQADoc(id=f"{n:032x}", title=f"flag {n}", path=f"{n:032x}.jpg") for n in range(5)}
    folder = tmp_path / data.MMQA_IMAGE_FOLDER
    folder.mkdir()
    for i, doc_id in enumerate(list(images)[:3]):
        Image.new("RGB", (80 + 20 * i, 50), list(COLOURS.values())[i]).save(folder / images[doc_id].path)
    qs = [data.MMQAQuestion(qid=f"m{j}", question="Which flag is red?", answers=("red",), answer_modalities=("image",),
                            qtype="ImageQ", modalities=("image",), image_doc_ids=tuple(images), text_doc_ids=(),
                            table_id="", supporting=((list(images)[j], "image"),)) for j in range(2)]
    rows, report = data.attach_mmqa_images(data.mmqa_to_rows(qs, images), images, folder)
    assert report.attached == 6 and report.missing == 4
    request = P.build_request(rows[0], rows[0]["candidates"], reasoning=False)
    assert len(request.images) == 3  # the pixels reach the prompt; the two without a file are their titles
    for spec in P.standard_systems(PRESET)[:3]:  # zero-shot on the whole pool, the base top-k, stage 1
        results = P.run_pipeline(rows, PRESET, system=spec, bank=bank, progress=False)
        assert [r.guid for r in results] == ["m0", "m1"]
        assert all(set(r.sources) <= set(r.kept_ids) <= set(images) for r in results)
        scored = evaluation.score_mmqa(results, rows)
        assert scored["n_mmqa"] == 2 and 0.0 <= scored["MMQA F1"] <= 100.0


def test_given_scores_decide_the_top_k(bank):
    row = ROWS[1]
    ids = [c["id"] for c in row["candidates"]]
    scores = {row["guid"]: {cid: (1.0 if cid in (ids[4], ids[5]) else 0.0) for cid in ids}}
    res = P.run_pipeline([row], PRESET, system=P.SystemSpec("s", "stage1", "base", k=2), bank=bank, scores=scores, progress=False)[0]
    assert res.kept_ids == (ids[4], ids[5])


def test_long_prompts_lose_whole_candidates_never_image_tokens(bank):
    model, processor = bank.get("base")
    row = ROWS[0]
    full = P.build_request(row, row["candidates"], reasoning=False)
    n_full = P.prompt_length(processor, full)
    fitted = P.fit_prompt(row, row["candidates"], processor, reasoning=False, max_tokens=n_full - 1)
    assert 1 <= len(fitted.source_ids) < len(row["candidates"])
    assert fitted.source_ids == full.source_ids[: len(fitted.source_ids)]  # the lowest-ranked went first
    assert fitted.notes and "dropped" in fitted.notes[0]
    enc = P._encode(processor, [fitted])
    image_token = model.config.image_token_id
    per_image = int(enc["image_grid_thw"][0].prod()) // processor.image_processor.merge_size ** 2
    assert int((enc["input_ids"] == image_token).sum()) == per_image * len(fitted.images)
    one = P.fit_prompt(row, row["candidates"], processor, reasoning=False, max_tokens=5)
    assert len(one.source_ids) == 1 and "never truncated" in one.notes[0]
    dropped = [c["id"] for c in row["candidates"][1:]]
    assert f"dropped {len(dropped)} lowest-ranked candidate(s) {dropped}" in one.notes[0]  # and says which


def test_image_fn_resizes_like_run_pipeline():
    """The public ``image_fn`` is what ``run_pipeline`` hands ``fit_prompt``: every image at the preset's square size."""
    resize = P.image_fn(PRESET)
    assert resize is not None
    size = PRESET.model.image_size
    assert resize(Image.new("RGB", (40, 30))).size == (size, size)
    req = P.build_request(ROWS[0], ROWS[0]["candidates"], reasoning=False, image_fn=resize)
    assert req.images and all(img.size == (size, size) for img in req.images)


def test_adapters_are_loaded_when_present(tmp_path):
    from peft import PeftModel, get_peft_model

    from mmrag_lite import modeling

    model, _ = modeling.load_model_and_processor(PRESET, for_training=False)
    peft_model = get_peft_model(model, modeling.lora_config(PRESET))
    peft_model.save_pretrained(str(tmp_path / "stage1" / "adapter"))
    b = P.ModelBank(PRESET, tmp_path, verbose=False)
    assert b.resolved("stage1") == "stage1" and b.resolved("stage2") == "base (stage2 adapter missing)"
    stage1, base = b.get("stage1")[0], b.get("base")[0]
    assert stage1.adapter == "stage1" and base.adapter is None and isinstance(stage1.model, PeftModel)
    assert stage1.model is base.model  # one shared base (test_bank_shares_one_base_and_switches_adapters_per_call)
    res = P.answer_question(ROWS[2], PRESET, system=P.SystemSpec("s1", "stage1", "stage1"), bank=b)
    assert len(res.kept_ids) == PRESET.stage1.k and not b.notes


def _random_adapter(folder, seed: int):
    """A LoRA adapter with random A *and* B (the default initialisation makes B zero: an adapter that changes nothing)."""
    import torch
    from peft import get_peft_model

    from mmrag_lite import modeling

    model, _ = modeling.load_model_and_processor(PRESET, for_training=False)
    config = modeling.lora_config(PRESET)
    config.init_lora_weights = False
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(str(folder))


def test_bank_shares_one_base_and_switches_adapters_per_call(tmp_path, monkeypatch):
    """The three weight sets notebook 05 needs are one base model with two named adapters, and each view answers
    exactly as its own separately loaded model does, however the calls interleave."""
    import torch

    from mmrag_lite import modeling

    _random_adapter(tmp_path / "stage1" / "adapter", seed=1)
    _random_adapter(tmp_path / "stage2" / "adapter", seed=2)
    loads = []
    real_loader = P._default_loader
    monkeypatch.setattr(P, "_default_loader", lambda *a, **kw: loads.append(kw) or real_loader(*a, **kw))
    bank = P.ModelBank(PRESET, tmp_path, verbose=False)
    views = {w: bank.get(w)[0] for w in ("stage2", "base", "stage1")}
    assert len(loads) == 1 and loads[0]["adapter_path"] is None  # one base load; the adapters go into it
    processor = bank.get("base")[1]
    requests = [P.build_request(row, row["candidates"][:3], reasoning=False, image_fn=P.image_fn(PRESET)) for row in ROWS[:2]]
    enc = P._encode(processor, requests)

    def logits(model):
        with torch.no_grad():
            return model(**enc).logits[:, -1].float()

    own = {w: modeling.load_model_and_processor(PRESET, for_training=False,
                                                adapter_path=None if w == "base" else tmp_path / w / "adapter")[0]
           for w in views}
    expected = {w: logits(m) for w, m in own.items()}
    assert not torch.allclose(expected["stage1"], expected["stage2"]) and not torch.allclose(expected["base"], expected["stage1"])
    for w in ("stage1", "base", "stage2", "stage1", "stage2", "base"):  # interleaved: each call switches first
        torch.testing.assert_close(logits(views[w]), expected[w], rtol=1e-4, atol=1e-4)
    shared = views["base"].model
    assert not any(p.requires_grad for p in shared.parameters())  # switching adapters never re-enables gradients
    answers = {w: P.generate(v, processor, requests, max_new_tokens=6, progress=False) for w, v in views.items()}
    assert answers == {w: P.generate(m, processor, requests, max_new_tokens=6, progress=False) for w, m in own.items()}


def test_unload_frees_the_banks_model_and_the_next_get_loads_again(tmp_path, monkeypatch):
    """Notebook 04 trains stage 2 between two uses of its bank: the bank's copy must leave memory for the trainer's."""
    import weakref

    loads = []
    real_loader = P._default_loader
    monkeypatch.setattr(P, "_default_loader", lambda *a, **kw: loads.append(kw) or real_loader(*a, **kw))
    bank = P.ModelBank(PRESET, tmp_path, verbose=False)
    view, _ = bank.get("base")
    gone = weakref.ref(view.model)
    del view
    assert gone() is not None  # the bank still holds it
    bank.unload()
    assert gone() is None
    _random_adapter(tmp_path / "stage2" / "adapter", seed=2)  # trained meanwhile
    assert bank.resolved("stage2") == "stage2" and bank.get("stage2")[0].model is not None and len(loads) == 2


def test_reasoning_viewer_builds_headless(bank):
    from mmrag_lite.widgets import reasoning_viewer, result_html

    results = P.run_pipeline(ROWS, PRESET, system=P.SystemSpec("s", "stage1", "base"), bank=bank, progress=False)
    html_text = result_html(results[0].to_dict(), ROWS[0])
    assert "filter's P(yes)" in html_text and "★ gold" in html_text and "data:image/png;base64," in html_text
    assert html_text.count("<tr") >= len(ROWS[0]["candidates"]) + 3
    viewer = reasoning_viewer({"s": results, "copy": results[::-1]}, ROWS)
    viewer.system_picker.value = "copy"  # same question, other system: matched by guid
    assert ROWS[0]["question"].split()[0] in viewer.output.value
    assert len({r["question"] for r in ROWS}) == len(ROWS)  # distinct questions, so the check below can tell them apart
    assert ROWS[0]["question"] in viewer.output.value and ROWS[-1]["question"] not in viewer.output.value


def test_evaluate_writes_the_eval_folder(bank, tmp_path, monkeypatch):
    from mmrag_lite import evaluation as E

    # One-step, small-batch retrainings: the retrained ablation's plumbing, not its numbers.
    fast = PRESET.with_overrides(**{"stage2.grpo.max_steps": 1, "stage2.grpo.per_device_train_batch_size": 4,
                                    "stage2.grpo.max_completion_length": 8, "stage2.max_examples": 8})
    assert fast.evaluation.retrain_ablations
    small = P.ModelBank(fast, tmp_path, loader=lambda preset, adapter_path: bank.get("base"), verbose=False)
    attack_seeds = []
    real_check = E.robustness_check

    def spy(*args, **kwargs):  # another seed would warm another miniature (its cache key holds the seed): minutes
        attack_seeds.append(kwargs.get("seed", "not passed: robustness_check's own default"))
        return real_check(*args, **kwargs)

    monkeypatch.setattr(E, "robustness_check", spy)
    report = E.evaluate(fast, tmp_path, n_questions=4, mmqa=False, robustness=True, ks=[1, 2], bank=small,
                        fluency_scorer=None, progress=False)
    # no adapter was trained here: the rows that would use one say they ran the base model
    names = [s.name for s in P.standard_systems(PRESET)[:2]] + [
        "stage 1 only (no stage1 adapter: base model)", "stage 1 + stage 2 (no stage1 or stage2 adapter: base model)",
        "oracle filter (gold in top-k) (no stage1 or stage2 adapter: base model)"]
    assert [r["system"] for r in report.table] == names
    assert report.table[0]["QA-FL"] == E.UNAVAILABLE and all(0 <= r["Retr-F1"] <= 1 for r in report.table)
    assert [r["k"] for r in report.ablations["k (stage-1 top-k, inference only)"]] == [1, 2]
    retrained = report.ablations[E.RETRAINED_ABLATION_TITLE]
    variants = E.stage2_ablation_variants(fast)
    assert [r["stage 2 variant"] for r in retrained] == ["as the preset (main run)", *variants]
    for name, overrides in variants.items():
        folder = tmp_path / "ablations" / E.slug(name)
        assert json.loads((folder / "variant.json").read_text())["overrides"] == overrides
        assert (folder / "stage2" / "adapter" / "adapter_config.json").is_file()
        assert len(json.loads((folder / "stage2" / "log_history.json").read_text())) >= 1
    assert all(0 <= r["Retr-F1"] <= 1 and 0 <= r["well-formed"] <= 1 for r in retrained)
    assert [r["distractor"] for r in report.robustness] == ["none (clean)", "conflicting", "lexical"]
    assert attack_seeds == [fast.seed]  # the preset's seed, as notebook 05 passes it: the CLI writes the same attack
    assert list(report.slots) == names
    oracle_slots = report.slots[names[-1]]
    eval_rows = E.load_eval_split(fast, tmp_path, "test", 4)
    mean_gold = sum(len(r["gold_ids"]) for r in eval_rows) / len(eval_rows)
    assert sum(r["gold here"] for r in oracle_slots) == pytest.approx(mean_gold)  # every gold is shown somewhere
    gold = {r["guid"]: set(r["gold_ids"]) for r in eval_rows}
    for res in report.predictions[names[-1]]:
        assert gold[res.guid] <= set(res.kept_ids) and len(res.kept_ids) == max(fast.stage1.k, len(gold[res.guid]))
    md = (tmp_path / "eval" / "results.md").read_text()
    assert f"### Where the gold sat vs which slot was cited: {names[-1]}" in md
    strict = json.loads((tmp_path / "eval" / "results.json").read_text(), parse_constant=_no_constant)
    assert "slots" in strict and "timings_s" in strict
    assert md.startswith("## Results (cpu-tiny, Mini-WebQA from the synthetic world)") and "reference only" in md
    assert any("stage1 adapter" in n for n in report.notes)  # the fallback is in the report, not only on stdout


# ------------------------------------------------------------------------------------------ strict JSON
def _no_constant(name):
    raise ValueError(f"not JSON: {name}")


def test_written_json_is_strict_nan_becomes_null(tmp_path):
    payload = {"echoed": float("nan"), "inf": float("inf"), "rows": [{"x": (1.5, float("nan"))}], "p": tmp_path}
    from mmrag_lite.atomic import write_json_atomic

    path = write_json_atomic(tmp_path / "r.json", payload)
    data = json.loads(path.read_text(), parse_constant=_no_constant)  # a bare NaN would raise here
    assert data == {"echoed": None, "inf": None, "rows": [{"x": [1.5, None]}], "p": str(tmp_path)}


# ------------------------------------------------------------------------------------------ adapter identity
def _fake_adapter(folder, base, weights=b"weights"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _recording_loader(calls):
    def loader(preset, adapter_path=None, **kw):
        calls.append({"adapter_path": adapter_path, **kw})
        return object(), object()
    return loader


def test_a_bank_reloads_an_adapter_retrained_since_it_was_loaded(tmp_path):
    """The bank cached by name: after a retrain without ``unload`` it served the old LoRA while ``judge_identity``
    hashed the new files, so scores of the old judge were saved under the new one's name (and reused)."""
    import os

    calls = []
    adapter = _fake_adapter(tmp_path / "stage1" / "adapter", P.preset_base_model(PRESET))
    bank = P.ModelBank(PRESET, tmp_path, loader=_recording_loader(calls), verbose=False)
    first = bank.get("stage1")
    assert bank.get("stage1") is first and len(calls) == 1  # unchanged: the cached copy
    _fake_adapter(adapter, P.preset_base_model(PRESET), weights=b"retrained weights")
    later = os.stat(adapter / "adapter_model.safetensors").st_mtime_ns + 1_000_000
    os.utime(adapter / "adapter_model.safetensors", ns=(later, later))  # a new mtime even on a coarse clock
    assert bank.get("stage1") is not first and len(calls) == 2
    assert any("changed on disk" in n for n in bank.notes)
    assert bank.get("stage1") is bank.get("stage1") and len(calls) == 2


def test_adapter_trained_on_another_base_is_refused_with_what_to_do(tmp_path):
    calls = []
    other = tmp_path / "models" / "tiny-qwen2vl-old-warm-077730d5d4"  # a miniature rebuilt since
    _fake_adapter(tmp_path / "stage1" / "adapter", other)
    bank = P.ModelBank(PRESET, tmp_path, loader=_recording_loader(calls), verbose=False)
    with pytest.raises(P.AdapterBaseMismatch, match="Retrain stage1") as err:
        bank.get("stage1")
    assert "base_model=" in str(err.value) and str(other) in str(err.value) and calls == []  # nothing was loaded
    matching = P.ModelBank(PRESET, tmp_path, loader=_recording_loader(calls), verbose=False, base_model=other)
    matching.get("stage1")
    assert calls[-1]["model_path"] == str(other)  # the base it was trained on is the base that is loaded
    _fake_adapter(tmp_path / "stage2" / "adapter", P.preset_base_model(PRESET))
    P.ModelBank(PRESET, tmp_path, loader=_recording_loader(calls), verbose=False).get("stage2")  # same base: loads
    assert "model_path" not in calls[-1]
    # hub ids are compared as ids
    t4 = get_preset("colab-t4")
    _fake_adapter(tmp_path / "hub" / "stage2" / "adapter", t4.model.model_id)
    P.ModelBank(t4, tmp_path / "hub", loader=_recording_loader(calls), verbose=False).check_adapter("stage2")
    _fake_adapter(tmp_path / "hub" / "stage2" / "adapter", "someone/another-vlm")
    with pytest.raises(P.AdapterBaseMismatch):
        P.ModelBank(t4, tmp_path / "hub", loader=_recording_loader(calls), verbose=False).get("stage2")


def test_a_missing_adapter_of_a_hub_model_is_an_error_unless_allowed(tmp_path, capsys):
    """On Colab each notebook gets a fresh runtime: a run folder not on Drive leaves notebooks 04/05 without the
    adapters, and falling back to the base model would spend hours on the wrong model. The miniature still falls back."""
    calls = []
    t4 = get_preset("colab-t4")
    bank = P.ModelBank(t4, tmp_path, loader=_recording_loader(calls), verbose=False)
    bank.get("base")  # the base model itself is never missing
    for which in ("stage1", "stage2"):
        with pytest.raises(P.MissingAdapter) as err:
            bank.get(which)
        msg = str(err.value)
        assert str(tmp_path / which / "adapter") in msg and "MMRAG_HOME" in msg and "allow_missing_adapters=True" in msg
    assert [c["adapter_path"] for c in calls] == [None]  # nothing but the base was loaded
    allowed = P.ModelBank(t4, tmp_path, loader=_recording_loader(calls), verbose=False, allow_missing_adapters=True)
    allowed.get("stage2")
    assert allowed.notes == [f"no stage2 adapter in {tmp_path / 'stage2' / 'adapter'}: using the base model instead"]
    _fake_adapter(tmp_path / "stage1" / "adapter", t4.model.model_id)
    P.ModelBank(t4, tmp_path, loader=_recording_loader(calls), verbose=False).get("stage1")  # present: loads
    assert calls[-1]["adapter_path"] == tmp_path / "stage1" / "adapter"
    tiny = P.ModelBank(PRESET, tmp_path / "tiny", loader=_recording_loader(calls))  # the course relies on this
    tiny.get("stage2")
    assert tiny.resolved("stage2") == "base (stage2 adapter missing)" and "using the base model" in capsys.readouterr().out
    with pytest.raises(P.MissingAdapter):
        P.ModelBank(PRESET, tmp_path / "tiny", loader=_recording_loader(calls), allow_missing_adapters=False).get("stage2")


def test_saved_scores_are_keyed_on_the_judge_adapter_and_base(tmp_path):
    adapter = _fake_adapter(tmp_path / "stage1" / "adapter", P.preset_base_model(PRESET))
    bank = P.ModelBank(PRESET, tmp_path, verbose=False)
    scores = tmp_path / "stage1" / "scores_test.json"

    def save(judge):
        scores.write_text(json.dumps({"version": 1, "meta": {"judge": judge},
                                      "questions": {"g": {"candidate_ids": ["a", "b"], "scores": [0.2, 0.9]}}}))

    # the writer notebooks 03/04 and the CLI use records the judge itself
    assert P.save_stage1_scores({"g": [("a", 0.2), ("b", 0.9)]}, PRESET, tmp_path, "test", adapter) == scores
    assert P.reusable_scores(bank, "test") == {"g": {"a": 0.2, "b": 0.9}}
    save(bank.judge_identity("stage1"))
    assert P.reusable_scores(bank, "test") == {"g": {"a": 0.2, "b": 0.9}}
    save({**bank.judge_identity("stage1"), "base": "/elsewhere/another-base"})  # scored on another base
    assert P.reusable_scores(bank, "test") == {} and any("recomputing" in n for n in bank.notes)
    hub = P.judge_identity(get_preset("colab-t4"), adapter)  # a hub base is its id: the rendering tells them apart
    assert hub["base"] == P.judge_identity(get_preset("l4"), adapter)["base"]
    bigger = P.judge_identity(get_preset("colab-t4", **{"model.image_size": 448}), adapter)
    assert not P._same_judge(hub, bigger) and P._same_judge(hub, P.judge_identity(get_preset("colab-t4"), adapter))
    save({**bank.judge_identity("stage1"), "rendering": {**bank.judge_identity("stage1")["rendering"], "image_size": 99}})
    assert P.reusable_scores(bank, "test") == {}  # scored at another image size
    save({k: v for k, v in bank.judge_identity("stage1").items() if k != "rendering"})  # written before it was recorded
    assert P.reusable_scores(bank, "test") == {}
    save(bank.judge_identity("stage1"))
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")  # same file times do not matter: content does
    assert P.reusable_scores(bank, "test") == {}
    # a file from before identities were recorded, next to an adapter trained on another base: refused, not reused
    _fake_adapter(adapter, tmp_path / "models" / "old-base")
    scores.write_text(json.dumps({"g": {"a": 0.2, "b": 0.9}}))
    with pytest.raises(P.AdapterBaseMismatch):
        P.reusable_scores(bank, "test")


def _as_dataset(rows):
    """Rows as a ``datasets`` split with Mini-WebQA's features (images stored as bytes)."""
    from mmrag_lite import data

    return data.rows_to_dataset(rows)


def test_ensure_stage1_scores_scores_what_the_run_reads_and_reuses_it(tmp_path, monkeypatch):
    """Only the train questions stage 2 can read are scored (hours saved on real WebQA); a file that is current and
    covers them is reused; asking for more (a larger stage2.max_examples) scores again."""
    from mmrag_lite import scoring

    preset = PRESET.with_overrides(**{"stage2.max_examples": 4, "stage2.permutations": 2, "evaluation.questions": 3})
    assert scoring.questions_to_score(preset, "train") == scoring.TRAIN_SCORING_HEADROOM * 2
    assert scoring.questions_to_score(preset, "test") == 3 and scoring.questions_to_score(preset, "validation") is None
    rows = synthetic_rows(6)
    calls: list[int | None] = []

    def fake_score_split(model, processor, split_ds, preset, *, max_questions=None, **kw):
        calls.append(max_questions)
        return {r["guid"]: [(c["id"], 0.5) for c in r["candidates"]] for r in list(split_ds)[:max_questions]}

    monkeypatch.setattr(scoring, "score_split", fake_score_split)
    _fake_adapter(tmp_path / "stage1" / "adapter", P.preset_base_model(preset))
    bank = P.ModelBank(preset, tmp_path, loader=_recording_loader([]), verbose=False)
    path = P.ensure_stage1_scores(bank, rows, "train")
    assert calls == [4] and sorted(scoring.load_scores(path)) == ["q0", "q1", "q2", "q3"]
    assert P.ensure_stage1_scores(bank, rows, "train") == path and calls == [4]  # current and covering: reused
    more = P.ModelBank(preset.with_overrides(**{"stage2.max_examples": 8}), tmp_path, loader=_recording_loader([]),
                       verbose=False)
    P.ensure_stage1_scores(more, rows, "train")
    assert calls == [4, 8] and len(scoring.load_scores(path)) == 6  # all six: fewer than asked for
    rebuilt = synthetic_rows(6, pool=4)  # Mini-WebQA rebuilt with smaller pools: the same guids, other candidates
    P.ensure_stage1_scores(more, rebuilt, "train")
    assert calls == [4, 8, 8] and all(len(v) == 4 for v in scoring.load_scores(path).values())
    dataset = P.ensure_stage1_scores(more, _as_dataset(rebuilt), "train")  # a datasets split: pools read from Arrow
    assert dataset == path and calls == [4, 8, 8]
    assert P._pool_ids(_as_dataset(rebuilt), None) == P._pool_ids(rebuilt, None)  # None: every question
    assert len(P._pool_ids(rebuilt, None)) == 6
    other = _fake_adapter(tmp_path / "elsewhere" / "adapter", P.preset_base_model(preset))
    for stranger in (P.ModelBank(preset, tmp_path, adapters={"stage1": other}, verbose=False),
                     P.ModelBank(preset, tmp_path / "untrained", verbose=False)):
        with pytest.raises(ValueError, match="train stage 1 in this run folder"):
            P.ensure_stage1_scores(stranger, rows, "train")  # never the run's file with another judge's scores
    assert calls == [4, 8, 8]


# ------------------------------------------------------------------------------------------ prompt orders
def test_permutations_put_every_candidate_in_every_slot_equally_often():
    """Stage-2 training orders (prompts.permutations): distinct, deterministic, and uniform over slots. Leaving out
    the given order (stage-1 rank, usually gold first), as before, put candidate 0 at D1 less often than chance:
    for two candidates and one order, never."""
    from mmrag_lite.prompts import permutations

    for n, count in ((2, 1), (3, 2), (4, 2), (5, 3), (9, 2)):
        first_slot = Counter()
        for seed in range(600):
            orders = permutations(n, count, seed)
            assert len({tuple(o) for o in orders}) == count and all(sorted(o) == list(range(n)) for o in orders)
            first_slot.update(o.index(0) for o in orders)
        expected = 600 * count / n
        assert all(abs(first_slot[slot] - expected) < 0.2 * expected for slot in range(n)), (n, count, first_slot)
    assert permutations(4, 3, 7) == permutations(4, 3, 7)  # deterministic by seed
    assert sorted(map(tuple, permutations(2, 2, 0))) == [(0, 1), (1, 0)]
    assert permutations(2, 3, 0)[2] == permutations(2, 3, 0)[0]  # only two orders exist: repeated
    assert permutations(1, 2, 0) == [[0], [0]]


def test_reasoning_viewer_never_shows_another_questions_result():
    from mmrag_lite.widgets import reasoning_viewer, result_html

    def res(guid, system, scores=None, kept=()):
        return P.PipelineResult(guid=guid, question=f"question {guid}", system=system, scores=scores or {},
                                kept_ids=tuple(kept), reasoning="", completion="", sources=(), answer="")

    full = [res(r["guid"], "full") for r in ROWS]
    for nothing in ({}, []):  # no system has run yet: a message, not an IndexError
        assert "no predictions" in reasoning_viewer(nothing, ROWS).output.value.lower()
    viewer = reasoning_viewer({"empty": [], "partial": [res("q1", "partial")], "full": full}, ROWS)
    assert [guid for _, guid in viewer.question_picker.options] == ["q1", "q0", "q2"]  # every system's questions
    viewer.question_picker.value = "q0"
    assert "question q0" in viewer.output.value  # "empty" is picked: it says so, it does not crash
    assert "empty has no prediction for this question" in viewer.output.value
    viewer.system_picker.value = "partial"
    assert "partial has no prediction" in viewer.output.value and "question q1" not in viewer.output.value
    viewer.system_picker.value = "full"
    assert "[full]" in viewer.output.value and "question q0" in viewer.output.value

    ids = [c["id"] for c in ROWS[0]["candidates"]]
    scores = {ids[0]: 0.2, ids[1]: float("nan"), ids[2]: 0.9, ids[3]: 0.5}
    page = result_html(res("q0", "s", scores, kept=["adv-x", ids[2]]), ROWS[0])
    order = [page.index(f"<code>{cid}</code>") for cid in ("adv-x", ids[2], ids[3], ids[0], ids[1])]
    assert order == sorted(order)  # kept ones in D-order, then by score, NaN with the unscored at the end
    assert "(not in this row&#x27;s pool)" in page  # a kept id the row lacks (an injected trap) still gets its line
    from mmrag_lite.widgets import NO_PIXELS_HTML

    image_ids = [c["id"] for c in ROWS[0]["candidates"] if c["modality"] == "image"]
    assert image_ids and NO_PIXELS_HTML not in page
    broken = dict(ROWS[0], candidates=[dict(c, image={"bytes": b"not a png"}) if c["id"] == image_ids[0] else c
                                       for c in ROWS[0]["candidates"]])
    assert result_html(res("q0", "s", scores), broken).count(NO_PIXELS_HTML) == 1  # undecodable: a label, no crash


def test_orders_follow_the_seed_images_sit_under_their_id_and_results_round_trip(tmp_path):
    """Found unguarded by a mutation run."""
    from PIL import Image

    from mmrag_lite import pipeline as P
    from mmrag_lite import prompts

    assert prompts.permutations(5, 3, seed=1) != prompts.permutations(5, 3, seed=2)
    img = {"id": "a", "modality": "image", "title": "t", "text": "x", "image": Image.new("RGB", (8, 8))}
    txt = {"id": "b", "modality": "text", "title": "t", "text": "y", "image": None}
    parts = prompts.stage2_messages("q?", [txt, img])[1]["content"]
    labels = [p.get("text", p["type"]) for p in parts]
    assert labels[labels.index("D2: ") + 1] == "image"  # the picture follows its own id, not the one before
    assert prompts.stage2_images([dict(img, image=None), txt]) == []  # no pixels: no placeholder, no image
    res = P.PipelineResult(guid="g", question="q", system="s", scores={"a": 0.5}, kept_ids=("a",), reasoning="r",
                           completion="c", sources=("a",), answer="x", short_sources=("D1",))
    again = P.load_results(P.save_results([res], tmp_path / "r.json"))[0]
    assert again == res and again.short_sources == ("D1",)


def test_fit_prompt_keeps_the_longest_prefix_that_fits(bank):
    processor = bank.get("base")[1]
    row = ROWS[0]
    cands = row["candidates"]
    n_full = P.prompt_length(processor, P.build_request(row, cands, reasoning=False))
    for budget in (n_full - 1, n_full - 20):
        fitted = P.fit_prompt(row, cands, processor, reasoning=False, max_tokens=budget)
        n = len(fitted.source_ids)
        assert 1 <= n < len(cands) and fitted.prompt_tokens <= budget
        assert P.prompt_length(processor, P.build_request(row, cands[: n + 1], reasoning=False)) > budget


def test_the_oracles_gold_is_the_last_thing_a_long_prompt_drops(bank):
    """The oracle shows its kept ids in stage-1 score order, so a gold the judge missed sits last, and shrinking from
    the end dropped it before any distractor: the ceiling without its gold. Gold (``keep``) now goes last, and the
    rest keep their order."""
    processor = bank.get("base")[1]
    row = ROWS[0]
    cands = list(row["candidates"])
    last = cands[-1]["id"]
    n_full = P.prompt_length(processor, P.build_request(row, cands, reasoning=False))
    plain = P.fit_prompt(row, cands, processor, reasoning=False, max_tokens=n_full - 1)
    assert last not in plain.source_ids  # without keep: the lowest-ranked goes first
    kept = P.fit_prompt(row, cands, processor, reasoning=False, max_tokens=n_full - 1, keep={str(last)})
    assert last in kept.source_ids and len(kept.source_ids) == len(plain.source_ids)
    assert list(kept.source_ids) == [c["id"] for c in cands if c["id"] in kept.source_ids]  # order unchanged
    assert "distractors first" in kept.notes[0] and kept.prompt_tokens <= n_full - 1
    # the oracle's gold comes from gold_ids, else from the candidates marked gold: run_pipeline keeps either
    no_ids = dict(row, gold_ids=[])
    assert P._pool_gold(no_ids) == {str(c["id"]) for c in row["candidates"] if c["is_gold"]} == P._pool_gold(row)


def test_cached_scores_for_another_pool_are_recomputed_never_used(monkeypatch, tmp_path):
    rows = ROWS[:1]
    pool = {c["id"] for c in rows[0]["candidates"]}
    calls = []

    def fake_score_rows(model, proc, rs, preset, progress=False):
        calls.append([r["guid"] for r in rs])
        return {r["guid"]: {c["id"]: 0.5 for c in r["candidates"]} for r in rs}

    monkeypatch.setattr(P, "score_rows", fake_score_rows)
    monkeypatch.setattr(P, "fit_prompt", lambda row, cands, *a, **k: P.build_request(row, cands, reasoning=False))
    monkeypatch.setattr(P, "generate", lambda model, proc, reqs, **k: [""] * len(reqs))
    bank = P.ModelBank(PRESET, tmp_path, loader=_recording_loader([]), verbose=False)
    (res,) = P.run_pipeline(rows, PRESET, system=P.SystemSpec("s", "stage1", "base"), bank=bank,
                            scores={"q0": {"stale-id": 0.9}}, progress=False)
    assert calls == [["q0"]] and set(res.scores) == pool


# ------------------------------------------------------------------------------- pure pieces (mutation run 2)
def test_a_systems_own_k_and_reasoning_win_over_the_presets():
    default = P.SystemSpec("d", "stage1", "stage2")
    assert default.resolved_k(PRESET) == PRESET.stage1.k
    assert default.resolved_reasoning(PRESET) is bool(PRESET.stage2.reasoning)
    own = P.SystemSpec("o", "stage1", "stage2", k=PRESET.stage1.k + 2, reasoning=not PRESET.stage2.reasoning)
    assert own.resolved_k(PRESET) == PRESET.stage1.k + 2
    assert own.resolved_reasoning(PRESET) is (not PRESET.stage2.reasoning)


def test_the_oracle_pads_with_distractors_even_when_the_judge_ranks_the_gold_first():
    """Gold ranked on top must not use up the padding: k=4 is 2 gold + the 2 best distractors, in score order."""
    row = ROWS[0]  # gold 3000 and q0_1
    scores = {"3000": 0.9, "q0_1": 0.8, "3002": 0.1, "q0_3": 0.2, "3004": 0.3, "q0_5": 0.4}
    assert P.oracle_ids(row, scores, 4) == ["3000", "q0_1", "q0_5", "3004"]
    assert P.oracle_ids(row, scores, 2) == ["3000", "q0_1"]


def test_a_result_round_trips_every_field():
    r = P.PipelineResult(guid="g", question="q?", system="s", scores={"a": 0.25, "b": 0.5}, kept_ids=("a", "b"),
                         reasoning="because", completion="<answer>x</answer>", sources=("b",), answer="x",
                         problems=("prompt too long", "unknown_id: D9"), short_sources=("D2",))
    assert P.PipelineResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_token_batches_track_the_longest_prompt_of_a_call_and_refuse_a_negative_cap():
    # 10 then 5: 2 x 10 = 20 fits; a third prompt pads to 3 x 10 = 30 > 20 (the longest is still 10, not the last 5)
    assert P.token_batches([10, 5, 5], 8, 20) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="max_batch_tokens=-1"):
        P.token_batches([1, 1], 2, -1)


def test_fit_prompt_drop_order_and_notes_by_hand(monkeypatch):
    """A made-up length of 10 tokens per candidate: which candidates survive each budget, and what the result says."""
    monkeypatch.setattr(P, "prompt_length", lambda processor, req: 10 * len(req.source_ids))
    row = ROWS[0]
    cands = row["candidates"]  # 3000 q0_1 3002 q0_3 3004 q0_5
    exact = P.fit_prompt(row, cands, None, reasoning=False, max_tokens=60)  # exactly at the budget: all of them
    assert exact.source_ids == tuple(c["id"] for c in cands) and exact.notes == () and exact.prompt_tokens == 60
    four = P.fit_prompt(row, cands, None, reasoning=False, max_tokens=40)  # 4 x 10 = 40 fits exactly
    assert four.source_ids == ("3000", "q0_1", "3002", "q0_3") and four.prompt_tokens == 40
    assert four.notes == ("prompt too long: dropped 2 lowest-ranked candidate(s) ['3004', 'q0_5'] to fit 40 tokens",)
    kept = P.fit_prompt(row, cands, None, reasoning=False, max_tokens=40, keep={"q0_5"})  # kept ids go last
    assert kept.source_ids == ("3000", "q0_1", "3002", "q0_5") and kept.prompt_tokens == 40
    assert "dropped 2 candidate(s), lowest-ranked distractors first, ['q0_3', '3004']" in kept.notes[0]
    over = P.fit_prompt(row, cands, None, reasoning=False, max_tokens=5)  # even one is over: the best one, whole
    assert over.source_ids == ("3000",) and over.prompt_tokens == 10
    assert over.notes[0].endswith("still over with one candidate, sent whole (never truncated)")
    alone = P.fit_prompt(row, cands[:1], None, reasoning=False, max_tokens=5)
    assert alone.source_ids == ("3000",) and alone.prompt_tokens == 10 and "sent whole" in alone.notes[0]
