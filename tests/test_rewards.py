"""Rewards: hand-computed values, TRL wiring, reward hacks, and a fuzz proving nothing raises and scores stay in range."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmrag_lite import metrics, rewards
from mmrag_lite.config import get_preset
from mmrag_lite.prompts import stage1_target, stage2_target
from mmrag_lite.rewards import (
    answer_reward,
    balanced_positive_weight,
    build_reward_funcs,
    class_weights,
    format_reward,
    ranking_reward,
    relevance_reward,
    score_completion,
)


def trl_extras(n: int) -> dict:
    """What TRL passes a reward besides the dataset columns: one prompt and one completion's ids per completion."""
    return {"prompts": ["p"] * n, "completion_ids": [[1, 2]] * n, "trainer_state": None}


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------- format
def test_format_reward_all_or_nothing():
    good1 = stage1_target("yes", reasoning=True, think="t")
    assert format_reward([good1, "<answer>yes</answer>", None, ""], stage=1, reasoning=True) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(["<answer>no</answer>", good1], stage=1, reasoning=False) == [1.0, 0.0]
    good2 = stage2_target(["D1"], "red")
    assert format_reward([good2, good2 + "!"], stage=2, reasoning=False) == [1.0, 0.0]
    assert format_reward([good2], stage=2, reasoning=False, penalty=-0.5, candidate_ids=[["D2"]]) == [-0.5]  # unknown id


def test_format_reward_can_ask_for_words_inside_think():
    """An empty ``<think>`` is the cheapest well-formed completion and explains nothing: ``min_think_words`` refuses
    it where the preset asks (the GPU presets ask for 1; the miniature, which writes no reasoning, for none)."""
    empty, blank, one = (stage1_target("yes", reasoning=True, think=t) for t in ("", "  \n ", "red"))
    assert format_reward([empty, blank, one], stage=1, reasoning=True) == [1.0, 1.0, 1.0]
    assert format_reward([empty, blank, one], stage=1, reasoning=True, min_think_words=1) == [0.0, 0.0, 1.0]
    assert format_reward([one], stage=1, reasoning=True, min_think_words=2) == [0.0]
    s2 = [stage2_target(["D1"], "red", reasoning=True, think=t) for t in ("", "D1 shows a red car")]
    assert format_reward(s2, stage=2, reasoning=True, min_think_words=3, penalty=-1.0) == [-1.0, 1.0]
    assert format_reward(["<answer>no</answer>"], stage=1, reasoning=False, min_think_words=5) == [1.0]  # no <think> asked
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_think_words"):
            build_reward_funcs(1, {"format": 1.0}, reasoning=True, min_think_words=bad)
    gpu, tiny = rewards.preset_reward_options("colab-t4", 2), rewards.preset_reward_options("cpu-tiny", 1)
    assert gpu["min_think_words"] == 1 and tiny["min_think_words"] == 0
    funcs, _ = rewards.reward_funcs_for_preset("colab-t4", 1)
    assert next(f for f in funcs if f.__name__ == "format")([empty, one]) == [0.0, 1.0]
    from mmrag_lite.widgets import reward_playground

    says_why = reward_playground(1, completion=empty, row={"label": "yes"}, **rewards.preset_reward_options("colab-t4", 1))
    assert "asks for at least 1 (min_think_words)" in says_why.output.value
    assert "min_think_words" not in reward_playground(1, completion=one, row={"label": "yes"},
                                                      **rewards.preset_reward_options("colab-t4", 1)).output.value


def test_penalty_must_not_be_positive():
    with pytest.raises(ValueError, match="penalty"):
        format_reward(["x"], stage=1, reasoning=False, penalty=0.5)


# ---------------------------------------------------------------------------------------------- relevance
def test_relevance_reward_hand_computed():
    comps = [chat("<answer>yes</answer>"), "<answer>no</answer>", "<answer>yes</answer>", "nonsense", "<answer>NO</answer>"]
    labels = ["yes", "yes", "no", "no", "no"]
    assert relevance_reward(comps, label=labels, **trl_extras(len(comps))) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert relevance_reward(comps, label=labels, penalty=-1.0) == [1.0, 0.0, 0.0, -1.0, 1.0]


def test_relevance_class_weights():
    assert class_weights(1.0) == {"yes": 1.0, "no": 1.0}
    assert class_weights(4.0) == {"yes": 1.0, "no": 0.25}  # rare positives worth 4x, scaled so the max is 1
    assert class_weights(0.5) == {"yes": 0.5, "no": 1.0}
    assert balanced_positive_weight(0.2) == pytest.approx(4.0)
    r = relevance_reward(["<answer>yes</answer>", "<answer>no</answer>"], label=["yes", "no"], positive_weight=4.0)
    assert r == [1.0, 0.25]
    with pytest.raises(ValueError):
        class_weights(0.0)


def test_relevance_reads_verdict_despite_bad_format_but_not_a_hedge():
    assert relevance_reward(["Sure. <answer>yes</answer>"], label=["yes"]) == [1.0]
    assert relevance_reward(["<answer>yes</answer><answer>no</answer>"], label=["yes"]) == [0.0]
    assert relevance_reward(["<answer>yes</answer>"], label=["maybe"]) == [0.0]  # a broken row earns nothing


def test_missing_column_is_a_loud_wiring_error():
    with pytest.raises(ValueError, match="label"):
        relevance_reward(["<answer>yes</answer>"], prompts=["p"])
    with pytest.raises(ValueError, match="gold_ids"):
        ranking_reward(["x"], candidate_ids=[["D1"]])
    with pytest.raises(ValueError, match="1 values for 2"):
        relevance_reward(["a", "b"], label=["yes"])


# ------------------------------------------------------------------------------------------------ ranking
CANDS = ["D1", "D2", "D3", "D4", "D5"]


def _rank(ids: list[str], gold: list[str], **kw) -> float:
    return ranking_reward([stage2_target(ids, "x")], candidate_ids=[CANDS], gold_ids=[gold], **kw)[0]


def test_ranking_f1_hand_computed():
    assert _rank(["D2", "D4"], ["D2", "D4"]) == 1.0
    assert _rank(["D2"], ["D2", "D4"]) == pytest.approx(2 / 3)  # P=1, R=1/2
    assert _rank(["D2", "D1", "D3"], ["D2"]) == pytest.approx(0.5)  # P=1/3, R=1
    assert _rank(["D1"], ["D2"]) == 0.0
    assert _rank(["D9", "D2"], ["D2"]) == pytest.approx(2 / 3)  # the unknown D9 earns nothing, still counts as picked
    assert _rank(["D2", "D2", "D2"], ["D2"]) == 1.0  # repeating a good id gains nothing


def test_ranking_ndcg_hand_computed():
    # gold {D2, D4}, k = |G| = 2: [D2, D1] -> 1 / (1 + 1/log2 3)
    assert _rank(["D2", "D1"], ["D2", "D4"], metric="ndcg") == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert _rank(["D4", "D2"], ["D2", "D4"], metric="ndcg") == pytest.approx(1.0)
    assert _rank(["D1", "D2"], ["D2"], metric="ndcg") == 0.0  # k = 1: only the first slot counts
    assert _rank(["D1", "D2"], ["D2"], metric="ndcg", k=2) == pytest.approx(1 / math.log2(3))
    assert _rank(["D9", "D2"], ["D2"], metric="ndcg", k=2) == pytest.approx(1 / math.log2(3))  # D9 takes slot 1


def test_listing_every_candidate_does_not_pay():
    everything = ["D1", "D2", "D3", "D4", "D5"]
    assert _rank(everything, ["D5"]) == pytest.approx(2 / 6)
    assert _rank(everything, ["D5"], metric="ndcg") == 0.0
    # the gold first and every other candidate after it: diluted to k/|S|, below naming the gold alone
    assert _rank(["D2", "D5", "D1", "D3", "D4"], ["D2", "D5"], metric="ndcg") == pytest.approx(2 / 5)
    assert _rank(["D2"], ["D2", "D5"], metric="ndcg") > 2 / 5
    assert _rank(["D2", "D5"], ["D2", "D5"], metric="ndcg") == 1.0


def test_ranking_score_candidates_bound_the_gold_set():
    # candidates=None: every gold id counts; with candidates, gold the model could not see is not asked for
    assert rewards.ranking_score(["D2"], ["D2", "D7"], None) == pytest.approx(2 / 3)
    assert rewards.ranking_score(["D2"], ["D2", "D7"], CANDS) == 1.0
    assert rewards.ranking_score(["D2"], ["D7"], CANDS) == 0.0  # no visible gold: nothing to earn
    # repeats dropped, as the module docstring says, also when called on an unparsed list
    assert rewards.ranking_score(["D2", "D2", "D9"], ["D2", "D9"], None, metric="ndcg") == 1.0
    assert rewards.ranking_score(["D2", "D2"], ["D2"], None) == 1.0
    with pytest.raises(ValueError, match="unknown ranking metric"):
        rewards.ranking_score(["D2"], ["D2"], None, metric="map")


def test_ranking_reads_ids_as_the_metrics_do():
    """WebQA image ids come as int, float (a column with gaps) or text; Retrieval-F1 matches them all, so must the
    reward (it paid 0 with f1 and 1 with ndcg for the same int ids)."""
    assert metrics.webqa_retrieval_f1([30079629.0], ["30079629"]) == 1.0
    for metric in ("f1", "ndcg"):
        assert rewards.ranking_score(["30079629"], [30079629], None, metric=metric) == 1.0
        assert rewards.ranking_score(["30079629"], [30079629.0], [30079629.0, "30079630"], metric=metric) == 1.0
    out = ranking_reward(["<sources>30079629</sources><answer>x</answer>"], candidate_ids=[[30079629.0, 30079630.0]],
                         gold_ids=[[30079629]])
    assert out == [1.0]


def test_ranking_unreadable_sources_get_the_penalty():
    out = ranking_reward(["<answer>x</answer>", None, "<sources>D1</sources><sources>D2</sources><answer>x</answer>"],
                         candidate_ids=[CANDS] * 3, gold_ids=[["D1"]] * 3, penalty=-0.2)
    assert out == [-0.2, -0.2, -0.2]
    empty = ranking_reward(["<sources></sources><answer>x</answer>"], candidate_ids=[CANDS], gold_ids=[["D1"]], penalty=-0.2)
    assert empty == [0.0]  # an empty list is readable: it cites nothing and earns 0, not the penalty


# ------------------------------------------------------------------------------------------------- answer
def test_answer_reward_webqa_uses_keywords_then_answer():
    comps = [stage2_target(["D1"], "It is red."), stage2_target(["D1"], "blue"), stage2_target(["D1"], "a fountain")]
    out = answer_reward(comps, answer=["The car is red.", "The car is red.", "A fountain is in front."],
                        keywords=["red", "red", ""], qcate=["color", "color", "Others"], **trl_extras(3))
    assert out[0] == pytest.approx(1.0, abs=1e-4) and out[1] == 0.0
    # no keyword: the reward derives one, the answer's words that are neither the question's nor stop words
    # ("fountain"; "front" is a spaCy stop word); without keyword_guard, recall against the full answer: 1 of 4 lemmas
    assert out[2] == pytest.approx(1.0)
    assert answer_reward(comps[2:], answer=["A fountain is in front."], keywords=[""], qcate=["Others"],
                         keyword_guard=False) == [pytest.approx(1 / 4)]
    # Where keyword and full answer disagree, the keyword decides: 1.0 against "fountain", 0.2 against the sentence.
    said = [stage2_target(["D1"], "a fountain")]
    long_answer = ["A big fountain near the old church"]
    assert answer_reward(said, answer=long_answer, keywords=["fountain"], qcate=["Others"]) == [pytest.approx(1.0)]
    assert answer_reward(said, answer=long_answer, keywords=[""], qcate=["Others"]) == [pytest.approx(0.2)]
    # a category WebQA lacks scores by the text rule (rewards never raise); a differently cased one is read as WebQA's
    assert answer_reward(said, answer=long_answer, keywords=[""], qcate=["sports"]) == [pytest.approx(0.2)]
    assert answer_reward(comps[:1], answer=["The car is red and blue."], keywords=[""], qcate=["Color"]) == \
        answer_reward(comps[:1], answer=["The car is red and blue."], keywords=[""], qcate=["color"])


def test_qa_reference_is_the_keyword_when_annotated_else_the_answer():
    from mmrag_lite.metrics import qa_reference

    assert qa_reference("A big fountain", "fountain") == "fountain"
    assert qa_reference(["Full answer", "another"], "  ") == "Full answer"  # blank keywords do not count
    assert qa_reference(None, None) == ""


def test_answer_reward_qcate_defaults_to_text_recall():
    out = answer_reward([stage2_target(["D1"], "Paris France")], answer=["Paris"])
    assert out == [1.0]


def test_answer_reward_mmqa():
    comps = [stage2_target(["D1"], "two dogs"), stage2_target(["D1"], "3 cats")]
    assert answer_reward(comps, answer=[["2 dogs"], ["4 cats"]], metric="mmqa_em") == [1.0, 0.0]
    assert answer_reward(comps, answer=["the 2 dogs", "4 cats"], metric="mmqa_f1") == [1.0, 0.0]  # number rule
    partial = [stage2_target(["D1"], "red car")]
    assert answer_reward(partial, answer=[["red"]], metric="mmqa_em") == [0.0]  # EM and F1 differ where it is partial
    assert answer_reward(partial, answer=[["red"]], metric="mmqa_f1") == [pytest.approx(2 / 3, abs=0.01)]
    # several references (max over them, as mmqa_em_f1) and MMQA's raw answer dicts: they were read as their repr
    london = [stage2_target(["D1"], "London")]
    assert answer_reward(london, answer=[[["Paris"], ["London"]]], metric="mmqa_em") == [1.0]
    assert answer_reward(london, answer=[[{"answer": "London", "type": "string"}]], metric="mmqa_em") == [1.0]
    assert answer_reward(london, answer=[{"answer": "Paris"}], metric="mmqa_f1") == [0.0]


def test_all_or_nothing_format_and_a_label_in_capitals():
    comps = ["<sources>D1, D1</sources><answer>x</answer>", "<sources></sources><answer>x</answer>",
             "<sources>D1</sources><answer>x</answer>"]
    assert format_reward(comps, stage=2, reasoning=False, candidate_ids=[["D1", "D2"]] * 3) == [0.0, 0.0, 1.0]
    assert relevance_reward(["<answer>yes</answer>", "<answer>no</answer>"], label=["YES", "No"]) == [1.0, 1.0]


def test_answer_reward_malformed():
    out = answer_reward([None, "<sources>D1</sources>", "", "<answer></answer>"], answer=["red"] * 4, penalty=-1.0)
    assert out == [-1.0, -1.0, -1.0, 0.0]  # an empty but present answer is readable: it is just wrong


STACHYS = "Does the Stachys byzantia grow upwards or sideways ?"


def test_choose_guard_copying_the_question_earns_a_coin_flip():
    """Recall-scored `choose` paid a pasted question in full (0.94 on real val); naming both options now earns what
    a random pick between them earns in expectation (1/2), so committing to the right one always pays more."""
    said = ["Does the Stachys byzantia grow upwards or sideways ?", "Upwards", "It grows upwards.",
            "upwards or sideways", "sideways and upwards"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": ["It grows upwards."] * 5, "keywords": ["Upwards."] * 5, "qcate": ["choose"] * 5}
    assert answer_reward(comps, question=[STACHYS] * 5, length_guard=False, **cols) == [0.5, 1.0, 1.0, 0.5, 0.5]
    assert answer_reward(comps, question=[STACHYS] * 5, choose_guard=False, length_guard=False, **cols) == [1.0] * 5  # the hole
    # no question known: the choose guard has nothing to check against; the list guard still reads the bare lists
    assert answer_reward(comps, length_guard=False, hedge_guard=False, **cols) == [1.0] * 5
    assert answer_reward(comps, length_guard=False, **cols) == [1.0, 1.0, 1.0, 0.5, 1.0]  # two joined by "and": one claim?
    # the length guard leaves these alone: 7 words at most, within 2 x 3 ("it grow upwards") + LENGTH_GUARD_SLACK
    assert answer_reward(comps, question=[STACHYS] * 5, **cols) == [0.5, 1.0, 1.0, 0.5, 0.5]
    # a reference that names both options itself ("Minnesota or Mayo ...") never triggers the guard
    q = "Is the Gonda Building in Rochester , Minnesota or Mayo Clinic Opus Building taller ?"
    ref = "The Gonda Building in Rochester, Minnesota"
    assert answer_reward([stage2_target(["D1"], ref)], answer=[ref], keywords=[ref], qcate=["choose"], question=[q]) == [1.0]
    # "Between X and Y" questions have their options around the "and"
    q = "Between the Petit Palais and the Hotel de Ville , which has more windows ?"
    both = [stage2_target(["D1"], "Petit Palais and Hotel de Ville"), stage2_target(["D1"], "The Hotel de Ville")]
    assert answer_reward(both, answer=["x"] * 2, keywords=["Hotel de Ville"] * 2, qcate=["choose"] * 2,
                         question=[q] * 2, length_guard=False) == [0.5, 1.0]


def test_choose_guard_reads_an_option_the_answer_denies_as_not_named():
    """Recall cannot read "not": "sideways, not upwards" holds the keyword and scored 1 while wrong. An option named
    only in a denied clause ("not", "rather than", "instead of", "n't") counts neither as named nor as said, so the
    contrast pays when right and not when wrong; the metric itself stays official."""
    said = ["It grows upwards, not sideways.", "upwards rather than sideways", "It doesn't grow sideways, it grows upwards",
            "sideways, not upwards", "It grows sideways instead of upwards.", "It does not grow upwards."]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": ["It grows upwards."] * 6, "keywords": ["Upwards."] * 6, "qcate": ["choose"] * 6}
    assert answer_reward(comps, choose_guard=False, **cols) == [1.0] * 6  # the metric's view: all six "right"
    assert answer_reward(comps, question=[STACHYS] * 6, **cols) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert metrics.webqa_accuracy("sideways, not upwards", "Upwards.", "choose") == 1.0  # the official metric unchanged
    # a reference that denies an option: the reward never pays more than the metric ("upwards" holds 1 of its 3 words)
    short = [stage2_target(["D1"], "upwards")]
    ref = {"answer": ["upwards, not sideways"], "qcate": ["choose"], "keyword_guard": False}
    assert answer_reward(short, question=[STACHYS], **ref) == answer_reward(short, choose_guard=False, **ref) == [1 / 3]
    # with no keyword the reward derives one, the option the reference affirms: "upwards" in full, "sideways" nothing
    derived = {"answer": ["upwards, not sideways"], "qcate": ["choose"], "question": [STACHYS]}
    assert answer_reward(short + [stage2_target(["D1"], "sideways")], **{k: v * 2 for k, v in derived.items()}) == [1.0, 0.0]


def test_a_denied_comparative_option_is_not_named():
    """spaCy lemmatises in context: the option span "red tower taller" keeps "taller", the denial "not taller" reads
    "tall". Option words are matched in both forms, so a wrong "X, not Y" on a comparative pays nothing (it paid 1.0
    on real val questions: "Wider, not taller." for a "taller or wider?" question)."""
    q = "Is the red tower taller or shorter than the blue tower?"
    said = ["Shorter, not taller", "Taller, not shorter", "Taller", "taller or shorter"]
    cols = {"answer": ["The red tower is taller."] * 4, "keywords": ["taller"] * 4, "qcate": ["choose"] * 4}
    comps = [stage2_target(["D1"], a) for a in said]
    assert answer_reward(comps, question=[q] * 4, **cols) == [0.0, 1.0, 1.0, 0.5]
    eiffel = "Is the Eiffel Tower taller or shorter than the Statue of Liberty?"
    wrong = [stage2_target(["D1"], "It is shorter, not taller"), stage2_target(["D1"], "It is taller, not shorter")]
    assert answer_reward(wrong, answer=["The Eiffel Tower is taller."] * 2, keywords=["taller"] * 2,
                         qcate=["choose"] * 2, question=[eiffel] * 2) == [0.0, 1.0]
    # "not as tall as it is wide" denies "tall" only and affirms "wide" (a real val reference is worded so)
    wide = "Is the Madison Park building taller or wider in length ?"
    said = ["It is not as tall as it is wide.", "It is not as wide as it is tall.", "Wider, not taller.",
            "It isn't as tall as it is wide"]
    assert answer_reward([stage2_target(["D1"], a) for a in said], answer=["It is not as tall as it is wide."] * 4,
                         keywords=["Wider"] * 4, qcate=["choose"] * 4, question=[wide] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_a_contrast_word_ends_the_denied_clause():
    """A denial ran to the next punctuation, so "not sideways but upwards" (and "I'm not sure but ...") denied the
    right option too and paid 0 where the metric pays 1; a contrast word now ends the denial."""
    said = ["It does not grow sideways but upwards.", "I'm not completely sure but it grows upwards.",
            "It does not grow upwards but sideways.", "It is not sideways, yet upwards."]
    cols = {"answer": ["It grows upwards."] * 4, "keywords": ["Upwards."] * 4, "qcate": ["choose"] * 4}
    assert answer_reward([stage2_target(["D1"], a) for a in said], question=[STACHYS] * 4, **cols) == [1.0, 1.0, 0.0, 1.0]


def test_a_lead_in_that_restates_the_options_is_not_a_hedge():
    """"Of upwards and sideways, it grows upwards." names both options, so the choose guard paid it a coin flip, and
    the wrong "..., it grows sideways." the very same half. The lead-in is cut when it names both options; what
    follows is scored."""
    said = ["Of upwards and sideways, it grows upwards.", "Of upwards and sideways, it grows sideways.",
            "Between upwards and sideways: upwards or sideways.", "Of course, it grows upwards."]
    cols = {"answer": ["It grows upwards."] * 4, "keywords": ["Upwards."] * 4, "qcate": ["choose"] * 4}
    assert answer_reward([stage2_target(["D1"], a) for a in said], question=[STACHYS] * 4, **cols) == [1.0, 0.0, 0.5, 1.0]
    q = "Which is taller, the Eiffel Tower or the Tokyo Tower?"
    said = ["Between the Eiffel Tower and the Tokyo Tower, the Eiffel Tower is taller.",
            "Between the Eiffel Tower and the Tokyo Tower, the Tokyo Tower is taller."]
    got = answer_reward([stage2_target(["D1"], a) for a in said], answer=["The Eiffel Tower is taller."] * 2,
                        keywords=["Eiffel Tower"] * 2, qcate=["choose"] * 2, question=[q] * 2)
    assert got[0] == 1.0 and got[1] < got[0]  # the wrong one keeps only what recall gives "tower"
    # a rest that names no option leaves the whole answer (a coin flip, as before); never more than the official score
    former = [stage2_target(["D1"], "Of upwards and sideways, the former.")]
    assert answer_reward(former, question=[STACHYS], answer=["It grows upwards."], keywords=["Upwards."], qcate=["choose"]) == [0.5]
    lr = [stage2_target(["D1"], a) for a in ("Between left and right, left.", "Left.")]
    got = answer_reward(lr, question=["Does the building face left or right?"] * 2, answer=["The building faces left."] * 2,
                        keywords=["Left."] * 2, qcate=["choose"] * 2)
    assert got[0] <= metrics.webqa_accuracy("Between left and right, left.", "Left.", "choose") and got[1] == 1.0


def test_not_yet_still_denies_and_not_only_names_both():
    """The contrast-word cut let "not yet red" deny nothing (a right "green, not yet red" was halved) and made "not only
    X but also Y" deny X (a two-option answer paid in full)."""
    q = "Is the leaf red or green?"
    said = ["It has not yet turned red; it is green.", "The leaf is green, not yet red.", "The leaf is red, not yet green."]
    assert answer_reward([stage2_target(["D1"], a) for a in said], question=[q] * 3, answer=["The leaf is green."] * 3,
                         keywords=["green"] * 3, qcate=["choose"] * 3) == [1.0, 1.0, 0.0]
    both = [stage2_target(["D1"], "It grows not only sideways but also upwards.")]
    assert answer_reward(both, question=[STACHYS], answer=["It grows upwards."], keywords=["Upwards."], qcate=["choose"]) == [0.5]


def test_choose_guard_reads_the_question_from_trl_prompts():
    from mmrag_lite.prompts import stage2_messages

    cand = {"id": "1", "modality": "text", "title": "t", "text": "a fact", "image": None, "is_gold": True}
    prompt = stage2_messages(STACHYS, [cand], reasoning=True)
    assert rewards.question_from_prompt(prompt) == STACHYS  # pins the reward to the prompt's "Question:" line
    assert rewards.question_from_prompt("Question: Red or blue?") == "Red or blue?"
    assert rewards.question_from_prompt("p") is None and rewards.question_from_prompt(None) is None
    funcs, _ = build_reward_funcs(2, {"answer": 1.0}, reasoning=False, length_guard=False)
    out = funcs[0]([stage2_target(["D1"], STACHYS), stage2_target(["D1"], "upwards")], prompts=[prompt] * 2,
                   answer=["x"] * 2, keywords=["Upwards."] * 2, qcate=["choose"] * 2, completion_ids=[[1], [2]])
    assert out == [0.5, 1.0]
    funcs, _ = build_reward_funcs(2, {"answer": 1.0}, reasoning=False, choose_guard=False, length_guard=False)
    assert funcs[0]([stage2_target(["D1"], STACHYS)], prompts=[prompt], answer=["x"], keywords=["Upwards."],
                    qcate=["choose"]) == [1.0]
    with pytest.raises(ValueError, match="'prompts' has 1 values for 2 completions"):  # would switch the guard off unseen
        rewards.answer_reward([stage2_target(["D1"], STACHYS)] * 2, prompts=[prompt], answer=["x"] * 2,
                              keywords=["Upwards."] * 2, qcate=["choose"] * 2)


def test_option_spans_read_the_options_beside_or():
    assert rewards.option_spans("Is the Royal Forest of Vera or Lake of Lea larger ?") == [
        ("royal forest of vera", "lake of lea larger")]  # at most OPTION_SPAN_WORDS words a side
    assert rewards.option_spans("Which flower grows in a mass ; Hydrangea or Crocus ?") == [("hydrangea", "crocus")]
    assert rewards.option_spans("Between the Petit Palais and the Hotel de Ville , which has more windows ?") == [
        ("between the petit palais", "the hotel de ville")]
    assert rewards.option_spans("Is it red , blue , or green ?") == []  # nothing between the comma and the "or"
    assert rewards.option_spans("What colour is the car ?") == []


def test_choose_guard_catches_a_hedge_that_drops_the_word_next_to_or():
    """The audit's bypass: the words around "or" are "vera" and "lake"; dropping one of them named both options
    while escaping the word test. The option spans' own words catch it; a committed answer stays whole."""
    q = "Is the Royal Forest of Vera or Lake of Lea larger ?"
    said = ["The Royal Forest or Lake of Lea is larger", "Forest of Vera or Lea is larger", "Lake of Lea is larger",
            "The Royal Forest of Vera is larger"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": ["Lake of Lea is larger."] * 4, "keywords": [""] * 4, "qcate": ["choose"] * 4,
            "keyword_guard": False}  # the choose guard alone (a derived keyword reads "lake": see the test after next)
    unguarded = answer_reward(comps, choose_guard=False, hedge_guard=False, **cols)
    guarded = answer_reward(comps, question=[q] * 4, **cols)
    assert guarded[:2] == pytest.approx([u / 2 for u in unguarded[:2]]) and guarded[:2] != [0.0, 0.0]
    # the list guard leaves options the question states to the choose guard (they are context, not guesses)
    assert answer_reward(comps, question=[q] * 4, choose_guard=False, **cols) == unguarded
    assert guarded[2] == unguarded[2] == 1.0  # committing to the right option: no guard
    # committing to the other one earns nothing (recall paid the words the two sentences share, "is larger", 0.6)
    assert unguarded[3] == pytest.approx(0.6) and guarded[3] == 0.0


def test_choose_guard_spares_sentences_that_say_what_the_reference_says():
    """Real WebQA references often name both options ("X has more ... than Y") while Acc reads a keyword naming one:
    such a sentence is no hedge, and a second "or" inside the question ("slits or gills") is no choice; but the two
    options joined by "or" still are."""
    q = ("From which stadium can you see more skyscrapers while sitting in the stands , Busan Sajik Baseball "
         "Stadium or the Sydney football stadium ?")
    ref = "You can see more skyscrapers while sitting in the stands of Busan Sajik Baseball Stadium than in Sydney football stadium."
    said = [ref, "Busan Sajik Baseball Stadium or Sydney football stadium", "Busan Sajik Baseball Stadium"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": [ref] * 3, "keywords": ["Busan Sajik Baseball Stadium"] * 3, "qcate": ["choose"] * 3}
    assert answer_reward(comps, question=[q] * 3, **cols) == [1.0, 0.5, 1.0]
    q = "Which car appears to have wider slits or gills on it ' s hood ; 2016Acura NSX or 2019 Alpha Romeo Giulia ?"
    ref = "The 2016 Acura NSX appears to have wider slits or gills on its hood, compared to the 2019 Alpha Romeo Giulia."
    assert answer_reward([stage2_target(["D1"], ref)], answer=[ref], keywords=["2016Acura NSX"], qcate=["choose"],
                         question=[q]) == answer_reward([stage2_target(["D1"], ref)], answer=[ref],
                                                        keywords=["2016Acura NSX"], qcate=["choose"])


def test_choose_guard_sees_options_set_side_by_side_without_or():
    """When the reference sentence names both options ("X has more ... compared to Y") and Acc reads the keyword X,
    "X and Y" or "X, Y" hedges as well as "X or Y" does; the comparative sentence stays whole. (Real val question.)"""
    q = ("On which organ , are more round visible stop knobs installed ; Western Cottage pump organ or Wurlitzer "
         "Model 44 Electrostatic Reed Organ ?")
    ref = ("The Western Cottage pump organ has more round visible stop knobs installed compared to the Wurlitzer "
           "Model 44 Electrostatic Reed Organ.")
    said = [ref, "Western Cottage pump organ or Wurlitzer Model 44 Electrostatic Reed Organ",
            "Western Cottage pump organ and Wurlitzer Model 44 Electrostatic Reed Organ",
            "Western Cottage pump organ, Wurlitzer Model 44 Electrostatic Reed Organ", "The Western Cottage pump organ"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": [ref] * 5, "keywords": ["Western Cottage pump organ"] * 5, "qcate": ["choose"] * 5}
    assert answer_reward(comps, choose_guard=False, **cols) == [1.0] * 5  # the hole: every hedge scores like the answer
    assert answer_reward(comps, question=[q] * 5, **cols) == [1.0, 0.5, 0.5, 0.5, 1.0]


def test_choose_guard_also_reads_options_of_text_and_others_questions():
    """WebQA files some either-or questions under `text` or `Others`; recall pays a hedge there just as well."""
    q = "Which is located further south ; Hyde Park or Vanderbilt University ?"
    said = ["Hyde Park or Vanderbilt University", "Vanderbilt University", "Hyde Park"]
    comps = [stage2_target(["D1"], a) for a in said]
    for qcate in ("text", "Others"):
        cols = {"answer": ["Vanderbilt University"] * 3, "keywords": [""] * 3, "qcate": [qcate] * 3}
        assert answer_reward(comps, question=[q] * 3, **cols) == [0.5, 1.0, 0.0]
        assert answer_reward(comps, question=[q] * 3, choose_guard=False, **cols) == [1.0, 1.0, 0.0]


def test_length_guard_stops_paying_a_pasted_prompt_on_recall_categories():
    """Recall cannot see padding: the question and every caption pasted into a `text` answer held the reference's
    words and scored 1, more than a correct sentence. Beyond twice the reference answer's length (plus a few words of
    sentence) the score thins."""
    ref = "The Golden Castle was founded by Hiro Ravison in Malmo."  # normalised: 8 words (articles, '.' dropped)
    paste = ("Who founded the Golden Castle and where is it? Golden Castle history: founded by Hiro Ravison, a "
             "merchant. Malmo harbour at dusk. The castle in Malmo seen from the water, with boats and gulls. "
             "Lina Berg painted the castle gate in Oslo in 1901. The Silver Tower of Bergen at night. "
             "A ferry leaves the old port of Malmo in winter.")  # the question and the k = 5 captions shown
    said = [paste, ref, "Hiro Ravison; Malmo", "It was founded by Lina Berg in Oslo.",
            "Based on the images, the Golden Castle was founded by Hiro Ravison in Malmo."]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": [ref] * 5, "keywords": [""] * 5, "qcate": ["text"] * 5}
    unguarded = answer_reward(comps, length_guard=False, hedge_guard=False, **cols)
    guarded = answer_reward(comps, **cols)
    assert unguarded[0] == pytest.approx(1.0) and guarded[0] < 0.5 < guarded[1]  # the paste now loses to the sentence
    n_paste = len(metrics.normalize_webqa_text(paste).split())
    n_ref = len(metrics.normalize_webqa_text(ref).split())
    allowance = rewards.LENGTH_GUARD_RATIO * n_ref + rewards.LENGTH_GUARD_SLACK
    length_only = answer_reward(comps, hedge_guard=False, **cols)
    assert length_only[0] == pytest.approx(min(1.0, allowance / n_paste))
    assert guarded[0] <= length_only[0]  # the paste's sentences also read as a list of guesses: thinned further
    assert guarded[1:] == unguarded[1:]  # within the allowance ("Based on the images, " + the reference): untouched
    # a one-word reference still leaves room for a sentence around it
    short = [stage2_target(["D1"], a) for a in ("Ether", "It is Ether.", "Based on the images, it is ether.")]
    assert answer_reward(short, answer=["Ether"] * 3, qcate=["text"] * 3) == [1.0, 1.0, 1.0]
    # the allowance follows the full answer, also when the keyword is what Acc reads; colour (F1) is not guarded
    kw = answer_reward([stage2_target(["D1"], "The forest of Vera lies closer to the old town")], answer=[
        "The Royal Forest of Vera is closer."], keywords=["Vera"], qcate=["choose"])
    assert kw == [1.0]
    spam = stage2_target(["D1"], "the car in the picture that was parked on the street is red")
    assert answer_reward([spam], answer=["red"], keywords=["red"], qcate=["color"]) == [pytest.approx(1.0, abs=1e-4)]


def test_hedge_guard_scales_an_answer_by_the_share_of_its_words_the_reference_holds():
    """Hedging over m options with one right: F1 = 2/(m+1), times 1/m = 2/(m(m+1)) < 1/m, what a random commit earns."""
    f1 = lambda p, r: 2 * p * r / (p + r + 1e-5)  # the official F1, +1e-5 included
    said = ["yes or no", "red or blue", "red, blue or green", "yes", "no", "3 or 4"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": ["x"] * 6, "keywords": ["yes", "red", "red", "yes", "yes", "3"],
            "qcate": ["YesNo", "color", "color", "YesNo", "YesNo", "number"]}
    half = f1(1 / 2, 1)
    assert answer_reward(comps, **cols) == pytest.approx([half / 2, half / 2, f1(1 / 3, 1) / 3, f1(1, 1), 0.0, half / 2])
    assert answer_reward(comps, hedge_guard=False, **cols) == pytest.approx([half, half, f1(1 / 3, 1), f1(1, 1), 0.0, half])
    assert answer_reward(comps, **cols)[0] == pytest.approx(1 / 3, abs=1e-4)  # "yes or no": 0.667 before the guard
    # a two-colour reference: naming both is right, not a hedge
    assert answer_reward([stage2_target(["D1"], "red and blue")], answer=["x"], keywords=["red and blue"], qcate=["color"]) == [pytest.approx(1.0, abs=1e-4)]


def test_hedge_guard_spares_what_the_whole_reference_or_a_number_question_says():
    """Acc reads the keyword, but a word the whole reference answer holds is no guess ("the gold medalist wore a white
    jacket": gold is a colour), and neither is a number the question states (a year); a colour the question names
    still counts, since colour questions rarely name one and a hedge could lean on it."""
    f1 = lambda p, r: 2 * p * r / (p + r + 1e-5)
    medal = "The men's gymnastics gold medalist wore a white jacket at the 2016 Summer Olympics."
    assert answer_reward([stage2_target(["D1"], medal)], answer=[medal], keywords=["White."], qcate=["color"]) == [
        pytest.approx(f1(1 / 2, 1))]  # the official F1 of the reference sentence against its keyword, not halved
    said = ["The 1901 church has 3 towers", "3 or 4 towers"]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": ["It has 3 towers."] * 2, "keywords": ["3"] * 2, "qcate": ["number"] * 2,
            "question": ["How many towers does the 1901 church have ?"] * 2}
    assert answer_reward(comps, **cols) == pytest.approx([f1(1 / 2, 1), f1(1 / 2, 1) / 2])
    q = "What color is the stripe on the blue flag ?"
    assert answer_reward([stage2_target(["D1"], "white or blue")], answer=["The stripe is white."], keywords=["white"],
                         qcate=["color"], question=[q]) == [pytest.approx(f1(1 / 2, 1) / 2)]


def test_no_guard_lowers_a_real_val_reference_sentence(shared_data):
    """Each of the 4,966 real val reference sentences, as the answer, keeps its official score under all three guards.
    The first choose guard (the words around "or" against the keyword) halved 172 of the 502 `choose` references, the
    first hedge guard (colours against the keyword) 6 colour and 7 shape ones."""
    val = shared_data / "webqa-val"
    if not val.is_dir():
        pytest.skip("webqa-val not in the shared data")
    refs = list(metrics.read_webqa_val_references(val).values())
    comps = [stage2_target(["D1"], r["answer"][0]) for r in refs]
    cols = {"answer": [r["answer"][0] for r in refs], "keywords": [r["keywords"] for r in refs],
            "qcate": [r["qcate"] for r in refs], "question": [r["question"] for r in refs]}
    guarded = answer_reward(comps, **cols)
    assert len(refs) == 4966 and guarded == answer_reward(comps, choose_guard=False, hedge_guard=False,
                                                          length_guard=False, **cols)


def test_answer_reward_survives_an_enormous_answer():
    """A 1.2-million-character answer made spaCy raise (E088) and took the whole batch down with it."""
    comps = [stage2_target(["D1"], "x " * 600_000), stage2_target(["D1"], "red")]
    start = time.perf_counter()
    assert answer_reward(comps, answer=["red", "red"], qcate=["text", "text"]) == [0.0, 1.0]
    assert time.perf_counter() - start < 10.0


def test_answer_reward_mmqa_scalar_gold_is_its_text():
    comp = [stage2_target(["D1"], "1985")]
    assert answer_reward(comp, answer=[1985.0], metric="mmqa_em") == [1.0]  # was 0: a float was not a span
    assert answer_reward(comp, answer=[[1985.0]], metric="mmqa_em") == [1.0]
    assert answer_reward(comp, answer=[1985], metric="mmqa_f1") == [1.0]


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_penalty_and_weights_must_be_finite(bad):
    """An infinite penalty or weight gives GRPO NaN advantages; refuse it at once."""
    with pytest.raises(ValueError, match="finite"):
        format_reward(["x"], stage=1, reasoning=False, penalty=bad)
    with pytest.raises(ValueError, match="finite"):
        build_reward_funcs(2, {"format": 1.0}, reasoning=False, penalty=bad)
    with pytest.raises(ValueError, match="finite"):
        build_reward_funcs(2, {"format": bad}, reasoning=False)


# ------------------------------------------------------------------------------------------------ builder
def test_build_reward_funcs_names_weights_and_order():
    funcs, weights = build_reward_funcs(2, {"answer": 1.0, "format": 0.2, "ranking": 0.5}, reasoning=True)
    assert [f.__name__ for f in funcs] == ["format", "ranking", "answer"]
    assert weights == [0.2, 0.5, 1.0]
    funcs, weights = build_reward_funcs(1, {"relevance": 1.0}, reasoning=False)
    assert [f.__name__ for f in funcs] == ["relevance"] and weights == [1.0]


@pytest.mark.parametrize("stage, weights", [(1, {"ranking": 1.0}), (2, {"relevance": 1.0}), (2, {"fromat": 1.0}), (3, {"format": 1.0}), (1, {})])
def test_build_reward_funcs_rejects_unknown(stage, weights):
    with pytest.raises(ValueError):
        build_reward_funcs(stage, weights, reasoning=False)


def test_build_reward_funcs_rejects_bad_options():
    for kw in ({"ranking_metric": "map"}, {"answer_metric": "bleu"}, {"penalty": 1.0}):
        with pytest.raises(ValueError):
            build_reward_funcs(2, {"format": 1.0}, reasoning=False, **kw)
    with pytest.raises(ValueError):
        build_reward_funcs(1, {"format": -1.0}, reasoning=False)


def test_built_funcs_take_trl_keywords_and_ignore_extras():
    funcs, _ = build_reward_funcs(1, {"format": 0.2, "relevance": 1.0}, reasoning=False, balance_classes=True, positive_fraction=0.2)
    comps = [chat("<answer>yes</answer>"), chat("<answer>no</answer>")]
    cols = {"label": ["yes", "no"], "guid": ["g", "g"], "candidate_id": ["1", "2"], "modality": ["image", "text"],
            "prompts": [[], []], "completion_ids": [[1], [2]], "trainer_state": object(), "images": [[], []]}
    assert funcs[0](comps, **cols) == [1.0, 1.0]
    assert funcs[1](comps, **cols) == [1.0, 0.25]


def test_reward_funcs_for_every_preset():
    for name in ("cpu-tiny", "colab-t4", "l4", "a100"):
        preset = get_preset(name)
        for stage in (1, 2):
            funcs, weights = rewards.reward_funcs_for_preset(preset, stage)
            settings_ = preset.stage1 if stage == 1 else preset.stage2
            assert [f.__name__ for f in funcs] == [c for c in rewards.STAGE_COMPONENTS[stage] if c in settings_.weights]
            assert weights == [settings_.weights[f.__name__] for f in funcs]


def test_preset_reward_options_reach_the_reward_functions():
    """Every preset uses f1 and sampling-balanced classes, so the other options need a preset that asks for them."""
    cited, cols = [stage2_target(["D1", "D2"], "x")], {"candidate_ids": [["D1", "D2", "D3"]], "gold_ids": [["D2"]]}
    for metric, expected in (("f1", 2 / 3), ("ndcg", 0.0)):  # nDCG@|G|=1: the first id is not gold
        funcs, _ = rewards.reward_funcs_for_preset(get_preset("cpu-tiny", **{"stage2.ranking_metric": metric}), 2)
        assert next(f for f in funcs if f.__name__ == "ranking")(cited, **cols) == [pytest.approx(expected)]
    funcs, _ = build_reward_funcs(2, {"ranking": 1.0}, reasoning=False, ranking_metric="ndcg", ndcg_k=2)
    assert funcs[0](cited, **cols) == [pytest.approx(1 / math.log2(3))]  # gold at rank 2 of an ideal 1
    skewed = get_preset("cpu-tiny", **{"stage1.balance_classes": True, "stage1.positive_fraction": 0.2})
    funcs, _ = rewards.reward_funcs_for_preset(skewed, 1)
    relevance = next(f for f in funcs if f.__name__ == "relevance")
    said = [stage1_target(v, reasoning=skewed.stage1.reasoning) for v in ("no", "yes")]
    assert relevance(said, label=["no", "yes"]) == [pytest.approx(0.25), 1.0]  # rho = 4: a right "no" pays 1/4


def test_preset_answer_guards_switch_both_guards():
    hedge = [stage2_target(["D1"], "yes or no")]
    cols = {"answer": ["Yes."], "keywords": ["yes"], "qcate": ["YesNo"], "candidate_ids": [["D1"]], "gold_ids": [["D1"]]}
    for guards, expected in ((True, 1 / 3), (False, 2 / 3)):
        preset = get_preset("cpu-tiny", **{"stage2.answer_guards": guards})
        funcs, _ = rewards.reward_funcs_for_preset(preset, 2)
        answer = next(f for f in funcs if f.__name__ == "answer")
        assert answer(hedge, **cols) == [pytest.approx(expected, abs=1e-4)]


def test_trl_grpo_config_accepts_the_weights(tmp_path):
    trl = pytest.importorskip("trl")
    funcs, weights = build_reward_funcs(2, {"format": 0.2, "ranking": 0.5, "answer": 1.0}, reasoning=False)
    cfg = trl.GRPOConfig(output_dir=str(tmp_path), reward_weights=weights, use_cpu=True, report_to=[],
                         activation_checkpointing=False)
    assert list(cfg.reward_weights) == weights
    assert all(callable(f) and f.__name__ for f in funcs)


def test_explain_shows_the_parse_behind_the_scores():
    parsed = rewards.explain("<sources>d2</sources><answer>x</answer>", stage=2, reasoning=False, candidate_ids=["D1", "D2"])
    assert parsed.source_ids == ("D2",) and parsed.answer == "x" and parsed.ok
    verdict = rewards.explain("<answer>yes</answer>", stage=1, reasoning=True)
    assert verdict.label == "yes" and not verdict.ok  # the verdict is readable; the format is not right
    assert [p.code for p in verdict.problems] == ["missing_tag"]


def test_score_completion_total():
    row = {"candidate_ids": CANDS, "gold_ids": ["D2"], "answer": "The car is red.", "keywords": "red", "qcate": "color"}
    s = score_completion(stage2_target(["D2"], "red"), row, stage=2, weights={"format": 0.2, "ranking": 0.5, "answer": 1.0}, reasoning=False)
    assert s["format"] == 1.0 and s["ranking"] == 1.0 and s["answer"] == pytest.approx(1.0, abs=1e-4)
    assert s["total"] == pytest.approx(1.7, abs=1e-4)


def test_task_rewards_can_be_paid_only_on_well_formed_completions():
    """A completion whose answer never closes still reads its <sources>: with independent components (the default)
    it keeps its ranking and answer points, which lets GRPO trade the format point for them; ``task_needs_format``
    pays them only where the format reward pays, ``penalty`` elsewhere, whether or not format itself is weighted."""
    row = {"candidate_ids": CANDS, "gold_ids": ["D2"], "answer": "The car is red.", "keywords": "red", "qcate": "color"}
    cut = "<sources>D2</sources><answer>red"  # cut off before </answer>
    weights = {"format": 1.0, "ranking": 1.0, "answer": 1.0}
    free = score_completion(cut, row, stage=2, weights=weights, reasoning=False)
    gated = score_completion(cut, row, stage=2, weights=weights, reasoning=False, task_needs_format=True)
    assert free["format"] == 0.0 and free["ranking"] == 1.0
    assert gated == {"format": 0.0, "ranking": 0.0, "answer": 0.0, "total": 0.0}
    good = stage2_target(["D2"], "red")
    assert score_completion(good, row, stage=2, weights=weights, reasoning=False, task_needs_format=True) == \
        score_completion(good, row, stage=2, weights=weights, reasoning=False)
    funcs, lambdas = build_reward_funcs(2, {"ranking": 1.0}, reasoning=False, task_needs_format=True, penalty=-0.5)
    assert [f.__name__ for f in funcs] == ["ranking"] and lambdas == [1.0]  # format unweighted, still the gate
    assert funcs[0]([cut, good], candidate_ids=[CANDS] * 2, gold_ids=[["D2"]] * 2) == [-0.5, 1.0]
    no_think, stage1 = "<answer>yes</answer>", {"label": "yes"}  # readable verdict, <think> missing
    assert score_completion(no_think, stage1, stage=1, weights={"format": 1, "relevance": 1},
                            reasoning=True) == {"format": 0.0, "relevance": 1.0, "total": 1.0}
    assert score_completion(no_think, stage1, stage=1, weights={"format": 1, "relevance": 1}, reasoning=True,
                            task_needs_format=True)["relevance"] == 0.0
    from mmrag_lite.config import get_preset

    assert rewards.preset_reward_options("cpu-tiny", 2)["task_needs_format"] is False  # our default: independent
    on = get_preset("cpu-tiny", **{"stage2.task_needs_format": True})
    assert rewards.preset_reward_options(on, 2)["task_needs_format"] is True
    assert rewards.preset_reward_options(on, 1)["task_needs_format"] is False
    (ranking,) = [f for f in rewards.reward_funcs_for_preset(on, 2)[0] if f.__name__ == "ranking"]
    assert ranking([cut], candidate_ids=[CANDS], gold_ids=[["D2"]]) == [0.0]


# --------------------------------------------------------------------------------------------- pathologies
def test_pathologies_score_low_and_fast():
    funcs, _ = build_reward_funcs(2, {"format": 1, "ranking": 1, "answer": 1}, reasoning=True)
    comps = [
        "<answer>" * 20_000,
        "<think>" + "because " * 12_500,
        "red " * 25_000,
        "<think>x</think><sources>" + ", ".join(CANDS * 4000) + "</sources><answer>red</answer>",
        "<think>x</think><sources>D2</sources><answer>" + "red blue green " * 6000 + "</answer>",
        "🚗" * 100_000,
        "",
        None,
    ]
    n = len(comps)
    cols = {"candidate_ids": [CANDS] * n, "gold_ids": [["D2"]] * n, "answer": ["The car is red."] * n,
            "keywords": ["red"] * n, "qcate": ["color"] * n}
    start = time.perf_counter()
    scores = {f.__name__: f(comps, **cols) for f in funcs}
    assert time.perf_counter() - start < 10.0
    assert scores["format"][:3] == [0.0, 0.0, 0.0] and scores["format"][5:] == [0.0, 0.0, 0.0]
    assert scores["ranking"][3] == pytest.approx(2 / 6)  # spamming every id: repeats collapse, precision falls
    # colour-word spam: F1 over the colour vocabulary (P 1/3, R 1), then the hedge guard keeps 1 of its 3 colours
    assert scores["answer"][4] == pytest.approx(0.5 / 3, abs=1e-4)
    assert all(0.0 <= s <= 1.0 for v in scores.values() for s in v)


def test_listing_many_distinct_unknown_ids_stays_linear():
    """40,000 distinct made-up ids (~270 KB): list-membership checks made this take seconds; sets keep it instant."""
    many = "<think>x</think><sources>" + ", ".join(f"X{i}" for i in range(40_000)) + "</sources><answer>red</answer>"
    cols = {"candidate_ids": [CANDS], "gold_ids": [["D2"]]}
    start = time.perf_counter()
    for metric in ("f1", "ndcg"):
        assert rewards.ranking_reward([many], metric=metric, **cols) == [0.0]
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------------- fuzz
_pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<sources>", "</sources>", "yes", "no",
                           "D1", "D2", "D7", ", ", " ", "\n", "red", "3", "three", "the", ".", "🚗"])
_texts = st.one_of(st.text(max_size=120), st.lists(_pieces, max_size=25).map("".join))
_completion = st.one_of(_texts, st.none(), st.integers(), st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": _texts}), max_size=2))
_weird = st.one_of(st.none(), st.integers(), st.text(max_size=10))
_question_words = st.sampled_from(["or", "and", "between", "Between", ",", ";", ":", "?", "red", "blue", "3", "the",
                                   "taller", "upwards", "sideways", "X", "🚗", "", " ", "not", "rather than", "isn't"])
_question = st.one_of(_weird, st.lists(_question_words, max_size=16).map(" ".join))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    comps=st.lists(_completion, min_size=1, max_size=4),
    penalty=st.sampled_from([0.0, -0.5, -1.0]),
    reasoning=st.booleans(),
    ranking_metric=st.sampled_from(["f1", "ndcg"]),
    answer_metric=st.sampled_from(["webqa", "mmqa_f1", "mmqa_em"]),
    label=st.one_of(st.sampled_from(["yes", "no", "YES"]), _weird),
    gold=st.one_of(st.lists(st.sampled_from(["D1", "D2", "D3", "D9"]), max_size=3), st.none(), st.text(max_size=5)),
    answer=st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=2), st.none()),
    qcate=st.one_of(st.sampled_from(["color", "shape", "YesNo", "number", "Others", "choose", "text"]), _weird),
    question=_question,
    balance=st.booleans(),
)
def test_rewards_never_raise_and_stay_in_range(comps, penalty, reasoning, ranking_metric, answer_metric, label, gold,
                                               answer, qcate, question, balance):
    n = len(comps)
    columns = {"label": [label] * n, "candidate_ids": [["D1", "D2", "D3"]] * n, "gold_ids": [gold] * n,
               "answer": [answer] * n, "keywords": [qcate] * n, "qcate": [qcate] * n, "question": [question] * n,
               **trl_extras(n)}
    for stage, weights in ((1, {"format": 1.0, "relevance": 1.0}), (2, {"format": 1.0, "ranking": 1.0, "answer": 1.0})):
        funcs, _ = build_reward_funcs(stage, weights, reasoning=reasoning, penalty=penalty, ranking_metric=ranking_metric,
                                      answer_metric=answer_metric, balance_classes=balance, positive_fraction=0.1)
        for f in funcs:
            out = f(comps, **columns)
            assert len(out) == n
            assert all(isinstance(x, float) and penalty <= x <= 1.0 for x in out), (f.__name__, out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    question=_question,
    said=st.lists(st.lists(_question_words, max_size=10).map(" ".join), min_size=1, max_size=4),
    reference=st.lists(_question_words, max_size=10).map(" ".join),
    keyword=st.one_of(st.just(""), st.lists(_question_words, max_size=3).map(" ".join)),
    qcate=st.sampled_from(["color", "shape", "YesNo", "number", "Others", "choose", "text"]),
)
def test_answer_guards_never_raise_or_raise_a_score(question, said, reference, keyword, qcate):
    """Well-formed answers made of the question's own words, so the option tests really run: every guard only lowers."""
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": [reference] * len(said), "keywords": [keyword] * len(said), "qcate": [qcate] * len(said),
            "question": [question] * len(said)}
    guarded = answer_reward(comps, **cols)
    unguarded = answer_reward(comps, choose_guard=False, hedge_guard=False, length_guard=False, **cols)
    assert all(0.0 <= g <= u + 1e-12 <= 1.0 + 1e-12 for g, u in zip(guarded, unguarded)), (guarded, unguarded)


def test_playground_scores_the_row_as_score_completion_does():
    pytest.importorskip("ipywidgets")
    from mmrag_lite.widgets import reward_playground

    q = "Does the plant grow upwards or sideways?"
    row = {"candidate_ids": ["D1", "D2"], "gold_ids": ["D2"], "answer": "The plant grows upwards, towards the light.",
           "keywords": "Upwards.", "qcate": "choose", "question": q}
    weights = {"format": 1.0, "ranking": 1.0, "answer": 1.0}
    pasted = stage2_target(["D2"], q)  # the question pasted as the answer: the choose guard keeps half
    expected = score_completion(pasted, row, stage=2, weights=weights, reasoning=False)
    assert expected["answer"] == pytest.approx(0.5, abs=1e-4)
    pg = reward_playground(2, row=row, weights=weights, completion=pasted, reasoning=False)
    assert f"<td>answer</td><td>{expected['answer']:+.3f}</td>" in pg.output.value  # the question reached the guard
    pg.fields["gold_ids"].value = "D9"
    assert "gold ids not among the candidates, so no completion can cite them: D9" in pg.output.value
    odd = reward_playground(2, row=dict(row, qcate="Other"), weights=weights, completion=pasted)
    assert odd.fields["qcate"].value == "Other"  # an unlisted category is shown, not a TraitError
    partial = reward_playground(2, row={"candidate_ids": ["D1"]})  # columns left out: empty fields, no KeyError
    assert partial.fields["gold_ids"].value == "" and "<td>format</td>" in partial.output.value
    assert "<td>relevance</td>" in reward_playground(1, row={}).output.value


def test_preset_helpers_take_a_name_and_refuse_an_unknown_stage():
    funcs, weights = rewards.reward_funcs_for_preset("cpu-tiny", 2)
    assert [f.__name__ for f in funcs] == ["format", "ranking", "answer"] and len(weights) == 3
    assert rewards.preset_reward_options("cpu-tiny", 1) == rewards.preset_reward_options(get_preset("cpu-tiny"), 1)
    for bad in ("1", 5):
        with pytest.raises(ValueError, match="stage must be 1 or 2"):
            rewards.explain("<answer>yes</answer>", stage=bad, reasoning=False)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stage must be 1 or 2"):
            rewards.reward_funcs_for_preset("cpu-tiny", bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- from a mutation audit
def test_ndcg_depth_is_the_number_of_gold_ids_the_model_was_shown():
    # D7 was filtered out before stage 2: k = 1 (D2 only), so D1 in the first slot earns nothing
    done = ranking_reward([stage2_target(["D1", "D2"], "x")], candidate_ids=[CANDS], gold_ids=[["D2", "D7"]], metric="ndcg")
    assert done == [0.0]


def _answer(text: str, reference: str, keyword: str, qcate: str, question: str | None = None, **kw) -> float:
    extra = {"question": [question]} if question is not None else {}
    return answer_reward([stage2_target(["D1"], text)], answer=[reference], keywords=[keyword], qcate=[qcate],
                         **extra, **kw)[0]


def test_hedge_guards_catch_inflections_and_softened_ors():
    assert _answer("The dog sits or stands", "The dog is standing.", "standing", "choose",
                   "Is the dog sitting or standing ?") == pytest.approx(0.5)  # lemmatised: sits/stands
    q = ("From which stadium can you see more skyscrapers while sitting in the stands , Busan Sajik Baseball "
         "Stadium or the Sydney football stadium ?")
    ref = "You can see more skyscrapers while sitting in the stands of Busan Sajik Baseball Stadium than in Sydney football stadium."
    assert _answer("Busan Sajik Baseball Stadium or maybe the Sydney football stadium", ref,
                   "Busan Sajik Baseball Stadium", "choose", q) == pytest.approx(0.5)
    hyde = "Which is located further south ; Hyde Park or Vanderbilt University ?"
    assert _answer("Park or University", "Vanderbilt University", "", "text", hyde, keyword_guard=False) == pytest.approx(0.25)
    f1 = 2 * 0.5 * 1.0 / (0.5 + 1.0 + 1e-5)
    assert _answer("round or square", "It is round.", "round", "shape") == pytest.approx(f1 / 2)


def test_the_length_guard_also_reads_choose_answers():
    padded = "It grows upwards, towards the light of the sun, every single day of the spring"  # 12 words for 1
    assert _answer(padded, "Upwards.", "", "choose") == pytest.approx(0.5)


def test_class_balance_follows_its_switch_and_an_explicit_weight():
    funcs, _ = build_reward_funcs(1, {"relevance": 1.0}, reasoning=False, balance_classes=False, positive_fraction=0.2)
    assert funcs[0](["<answer>no</answer>"], label=["no"]) == [1.0]  # sampling's fraction alone reweights nothing
    funcs, _ = build_reward_funcs(1, {"relevance": 1.0}, reasoning=False, balance_classes=True, positive_weight=4.0)
    assert funcs[0](["<answer>no</answer>"], label=["no"]) == [pytest.approx(0.25)]
    funcs, _ = build_reward_funcs(1, {"format": 1.0}, reasoning=False)
    assert funcs[0](["<answer>yes</answer>"], stage=[2], reasoning=[True], penalty=[5]) == [1.0]  # columns never override


def test_the_question_is_the_last_question_line_and_an_unreadable_verdict_pays_the_penalty():
    assert rewards.question_from_prompt("D1: Question: who built it?\nQuestion: Red or blue?") == "Red or blue?"
    assert relevance_reward(["nonsense"], label=["maybe"], penalty=-1.0) == [-1.0]


# ------------------------------------------------------------------------------------------------ from a review
STADIUMS = ("From which stadium can you see more skyscrapers while sitting in the stands , Busan Sajik Baseball "
            "Stadium or the Sydney football stadium ?")  # a real val question
STADIUMS_REF = ("You can see more skyscrapers while sitting in the stands of Busan Sajik Baseball Stadium than in Sydney "
                "football stadium.")


def test_choose_guard_halves_a_comparison_that_leads_with_the_other_option():
    """A reference sentence that names both options ("X ... than Y") let an answer naming both the other way round
    ("Y ... than X") keep full recall: the wrong answer paid 1. Leading with the other option now earns a coin flip,
    unless Acc's reference (the keyword) names that option alone; the reference's own order stays whole."""
    kw = "Busan Sajik Baseball Stadium"
    said = ["You see more skyscrapers from the Sydney football stadium than from Busan Sajik Baseball Stadium",
            "You see more skyscrapers from Busan Sajik Baseball Stadium than from the Sydney football stadium",
            STADIUMS_REF]
    comps = [stage2_target(["D1"], a) for a in said]
    cols = {"answer": [STADIUMS_REF] * 3, "keywords": [kw] * 3, "qcate": ["choose"] * 3}
    assert answer_reward(comps, question=[STADIUMS] * 3, choose_guard=False, **cols) == [1.0] * 3  # the hole
    assert answer_reward(comps, question=[STADIUMS] * 3, **cols) == [0.5, 1.0, 1.0]
    # a reference that leads with the wrong option ("Y shows fewer than X"): leading with the keyword's X still pays
    ref = "Sydney football stadium shows fewer skyscrapers than Busan Sajik Baseball Stadium."
    assert _answer(said[1], ref, kw, "choose", STADIUMS) == 1.0
    assert _answer(said[0], ref, kw, "choose", STADIUMS) == 1.0  # the reference's own order
    # without a keyword, the whole reference is what Acc reads: only its order pays in full
    for answer, factor in zip(said[:2], (0.5, 1.0)):
        unguarded = _answer(answer, STADIUMS_REF, "", "choose", STADIUMS, choose_guard=False)
        assert unguarded > 0 and _answer(answer, STADIUMS_REF, "", "choose", STADIUMS) == pytest.approx(factor * unguarded)
    # the order is read without denied clauses and from words the question says once (real val questions): these
    # right answers lead with the right option, though "traditional" and "Mayo" open both options
    q = ("Which native dress includes more floral aspects ; Traditional costumes from Łowicz , Poland or Traditional "
         "clothes , Siwa ?")
    ref = "The traditional costumes from Łowicz, Poland has more floral aspects."
    assert _answer(f"{ref[:-1]}, not traditional clothes.", ref, "Traditional costumes from Łowicz, Poland", "choose",
                   q) == 1.0
    q = ("Does the Mayo Clinic Guggenheim Building in Rochester , Minnesota or the Mayo Clinic Plummer Building in "
         "Rochester , Minnesota have a more reflective exterior ?")
    ref = "The Mayo Clinic Guggenheim Building in Rochester, Minnesota has a more reflective exterior."
    assert _answer(f"{ref[:-1]}, not the Mayo Clinic Plummer.", ref, "Mayo Clinic Guggenheim Building", "choose", q) == 1.0


def test_choose_guard_pairs_the_words_that_tell_options_with_a_shared_head_noun_apart():
    """The word pair was the literal words around "or": "stadium"/"sydney" and "car"/"blue", both of which a committed
    "the Sydney football stadium" or "the blue car" holds, so the right answer was halved. The pair is now the nearest
    words the other side lacks ("baseball"/"sydney", "red"/"blue"); naming both options still hedges."""
    sydney = "You can see more skyscrapers from the one in Sydney."
    assert _answer("The Sydney football stadium", sydney, "Sydney", "choose", STADIUMS) == 1.0
    assert _answer("Busan Sajik Baseball Stadium or the Sydney football stadium", sydney, "Sydney", "choose",
                   STADIUMS) == pytest.approx(0.5)
    cars = "Is the red car or the blue car faster ?"
    assert _answer("The blue car", "Blue", "", "choose", cars) == 1.0
    assert _answer("The blue car", "Blue", "", "choose", cars, choose_guard=False) == 1.0
    assert _answer("The red car or the blue car", "Blue", "", "choose", cars, length_guard=False) == pytest.approx(0.5)
    assert _answer("red or blue", "Blue", "", "choose", cars) == pytest.approx(0.5)
    assert rewards._word_pairs(["be", "red", "car", "or", "blue", "car", "fast"]) == [({"red"}, {"blue"}, set())]
    assert rewards._word_pairs(["car", "or", "car"]) == []  # nothing tells the sides apart: no pair
    organs = ["lmm", "pump", "organ", "or", "pump", "organ", "at", "gressenhall"]
    assert rewards._word_pairs(organs) == [({"lmm"}, {"gressenhall"}, set())]  # a filler ("at") tells nothing either


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_ndcg_depth_below_one_is_refused(bad):
    """nDCG@0 has no slot to earn in: the ranking reward was 0 for every completion, silently."""
    with pytest.raises(ValueError, match="ndcg_k"):
        build_reward_funcs(2, {"ranking": 1.0}, reasoning=False, ranking_metric="ndcg", ndcg_k=bad)
    with pytest.raises(ValueError, match="ndcg_k"):
        _rank(["D2"], ["D2"], metric="ndcg", k=bad)
    with pytest.raises(ValueError, match="ndcg_k"):
        rewards.ranking_score(["D2"], ["D2"], None, metric="ndcg", k=bad)
    funcs, _ = build_reward_funcs(2, {"ranking": 1.0}, reasoning=False, ranking_metric="ndcg", ndcg_k=1)
    assert funcs[0]([stage2_target(["D2"], "x")], candidate_ids=[CANDS], gold_ids=[["D2"]]) == [1.0]


def test_list_guard_pays_a_list_of_guesses_what_committing_at_random_pays():
    """Recall paid "Ether, India, Gold, Rome, Oslo" in full on a `text` question whose answer is "Ether": listing
    guesses beat committing (an audit, real val: 0.96 against 0.21). Now m guesses with one right earn 1/m."""
    assert _answer("Ether", "Ether", "", "text") == 1.0
    assert _answer("Ether, India, Gold, Rome, Oslo", "Ether", "", "text") == pytest.approx(0.2)
    assert _answer("Ether, India, Gold, Rome, Oslo", "Ether", "", "text", hedge_guard=False) == 1.0  # the hole
    assert _answer("It is Ether or India.", "Ether", "", "text") == pytest.approx(0.5)  # a lead-in is no escape
    for listed in ("Ether\nIndia\nGold\nRome", "Ether | India | Gold | Rome", "Ether vs India vs Gold vs Rome",
                   "Ether - India - Gold - Rome", "Ether. India. Gold. Rome.", "- Ether\n- India\n- Gold\n- Rome",
                   "Ether, also India, also Gold, also Rome"):
        assert _answer(listed, "Ether", "", "text", length_guard=False) == pytest.approx(0.25), listed
    for hedge in ("Ether or perhaps India", "India or perhaps Ether"):  # "perhaps" opens one more guess
        assert _answer(hedge, "Ether", "", "text") == pytest.approx(0.5), hedge
    # not read, the documented gaps: nothing between the guesses; two enumerated ones (one claim with a qualifier?)
    assert _answer("Ether India Gold Rome", "Ether", "", "text") == _answer("Ether, India", "Ether", "", "text") == 1.0
    assert _answer("Yes or no.", "Yes", "", "text") == pytest.approx(0.5)  # the YesNo hedge, filed under text
    assert _answer("fountain, gold, bike rack", "There is a fountain.", "fountain", "Others") == pytest.approx(1 / 3)


def test_list_guard_spares_lists_the_reference_makes_and_sentences_with_commas():
    kw = "Delta, Budweiser, AT&T, Napa, Gas South"
    assert _answer(kw, f"Sponsors include {kw}.", kw, "Others") == 1.0
    assert _answer("H&M", "An H&M store is there.", "H&M", "Others") == 1.0  # "&" joins a name, not a list
    assert _answer("Leaves and petals", "Leaves and petals are pointy.", "Leaves and petals", "Others") == 1.0
    flag = ("red, white and blue", "The flag is red, white and blue.", "", "text")
    assert (_answer(*flag, keyword_guard=False) == _answer(*flag, hedge_guard=False, keyword_guard=False)
            == pytest.approx(4 / 6))  # recall of the sentence's words
    # a derived keyword (the reference's words less stop words: "flag red white blue") spares the list all the same
    assert _answer(*flag) == _answer(*flag, hedge_guard=False) == pytest.approx(3 / 4)
    for sentence, reference in (("It grows upwards, not sideways.", "It grows upwards."),
                                ("It grows upwards, towards the light of the sun", "It grows upwards."),
                                ("Yes, it is.", "Yes"), ("Yes, the tower which is tall stands there", "Yes"),
                                ("Paris, France", "Paris"), ("Mercury, a planet near the Sun", "Mercury"),
                                ("The tower is tall and thin", "The tower is tall."), ("1,500", "It cost 1500."),
                                ("The Louvre, Paris", "It hangs in the Louvre.")):
        unguarded = _answer(sentence, reference, "", "text", hedge_guard=False)
        assert unguarded > 0 and _answer(sentence, reference, "", "text") == unguarded, sentence
    # the documented cost: three comma-set fragments of a sentence's own, two not in the reference, read as a list
    fragments = ("Yes, the tower, which is tall, stands there", "Yes", "", "text")
    assert _answer(*fragments) == pytest.approx(_answer(*fragments, hedge_guard=False) / 3)


def test_list_guard_on_real_val_text_questions(shared_data):
    """On the real val `text` questions with a one- or two-word reference, the reference listed with three other
    questions' references earns about a quarter; the reference alone keeps 1."""
    val = shared_data / "webqa-val"
    if not val.is_dir():
        pytest.skip("webqa-val not in the shared data")
    refs = [r for r in metrics.read_webqa_val_references(val).values()
            if r["qcate"] == "text" and len(r["answer"][0].split()) <= 2]
    assert len(refs) > 1000
    others = [r["answer"][0] for r in refs]
    lists = [", ".join([r["answer"][0], *others[i + 1:i + 4]]) for i, r in enumerate(refs[:-4])]
    cols = {"answer": [r["answer"][0] for r in refs[:-4]], "keywords": [""] * len(lists), "qcate": ["text"] * len(lists),
            "question": [r["question"] for r in refs[:-4]]}
    listed = answer_reward([stage2_target(["D1"], a) for a in lists], **cols)
    alone = answer_reward([stage2_target(["D1"], a) for a in cols["answer"]], **cols)
    assert min(alone) == 1.0 and sum(listed) / len(listed) < 0.3


def test_number_hedge_between_options_the_question_offers_earns_no_more_than_a_coin_flip():
    """The question's numbers are context ("in 1901"), except two it offers as the choice: "3 or 4" then paid 0.667."""
    f1 = lambda p, r: 2 * p * r / (p + r + 1e-5)  # the official F1, +1e-5 included
    question = "Were there 3 or 4 players on the team ?"
    hedge = _answer("3 or 4", "There were 3 players.", "3", "number", question)
    assert hedge == pytest.approx(f1(1 / 2, 1) / 2)  # F1 2/3, halved: below committing at random (1/2)
    assert _answer("3", "There were 3 players.", "3", "number", question) == pytest.approx(f1(1, 1))
    ranged = ("3 titles between 1990 and 2000", "He won 3 titles.", "3", "number",
              "How many titles did he win between 1990 and 2000 ?")  # a range the question states is context
    assert _answer(*ranged) == _answer(*ranged, hedge_guard=False) == pytest.approx(f1(1 / 3, 1))
    years = ("5000 people in 2010 or 2011", "About 5000 people came.", "5000", "number",
             "How many people came in 2010 or 2011 ?")  # two years offered: context too
    assert _answer(*years) == _answer(*years, hedge_guard=False)
    assert _answer("3 in 1901", "There were 3 players in 1901.", "3", "number",
                   "How many players were there in 1901 ?") == pytest.approx(f1(1 / 2, 1))  # 1901 is context: F1 only


# ---------------------------------------------------------------------------------------------- from a rewards review
def test_a_lone_surrogate_in_an_answer_neither_raises_nor_spoils_its_batch():
    """spaCy hashes text as UTF-8: one answer holding a lone surrogate (JSON "\\ud83d") raised for the whole batch."""
    done = answer_reward([stage2_target(["D1"], "red"), stage2_target(["D1"], "big red \ud83d")], answer=["red"] * 2,
                         keywords=["red"] * 2, qcate=["color"] * 2)
    assert done == [pytest.approx(1.0, abs=1e-4)] * 2
    assert metrics.normalize_webqa_text("big red \ud83d dogs").split()[:3] == ["big", "red", "dog"]


def test_full_width_id_separators_and_digits_read_as_their_ascii_forms():
    """Qwen writes full-width punctuation after Chinese text: "D2，D5" was one unknown id (format and ranking 0)."""
    for block in ("D2，D5", "D2；D5", "Ｄ２／D5", "D2｜D5"):
        text = f"<sources>{block}</sources><answer>x</answer>"
        assert ranking_reward([text], candidate_ids=[CANDS], gold_ids=[["D2", "D5"]]) == [1.0], block


def test_with_no_keyword_restating_the_question_no_longer_outscores_the_answer():
    """The public train file has no Keywords_A: recall against the whole sentence paid a restated question 0.615 and
    the right answer 0.231 here. The derived keyword is the answer's words the question lacks, less stop words."""
    q = "What grows near both Galaxy Soho and Wangjing SOHO ?"
    a = "Both the Galaxy Soho and Wangjing SOHO has grass and trees growing near them."
    said = ["Grass and trees.", q, a]
    assert [_answer(t, a, "", "Others", q, keyword_guard=False) for t in said] == pytest.approx([3 / 13, 8 / 13, 1.0])
    assert [_answer(t, a, "", "Others", q) for t in said] == [1.0, 0.0, 1.0]
    assert rewards.derived_keyword("grass tree", "what grow near", "Others") == "grass tree"
    assert rewards.derived_keyword("it be", "what be it", "text") == "it be"  # nothing left: the whole answer


def test_with_no_keyword_a_choose_answer_reads_the_option_the_reference_affirms():
    fence = "Is the fence in front of The Glass House in Fulham taller or shorter than a bicycle ?"
    ref = "The fence in font of the building is taller than a typical bicycle."
    assert [_answer(t, ref, "", "choose", fence) for t in ("Taller.", "Shorter.", "Taller or shorter")] == [1.0, 0.0, 0.5]
    towers = "Which is taller, the Eiffel Tower or the Tokyo Tower?"
    ref = "The Tokyo Tower is taller than the Eiffel Tower."  # names both: the one it leads with
    said = ["The Tokyo Tower", "The Eiffel Tower", "The Tokyo Tower and the Eiffel Tower", ref]
    assert [_answer(t, ref, "", "choose", towers, keyword_guard=False) for t in said] == pytest.approx(
        [2 / 7, 2 / 7, 4 / 7, 1.0])  # the hedge paid twice the answer
    assert [_answer(t, ref, "", "choose", towers) for t in said] == [1.0, 0.0, 0.5, 1.0]


def test_with_no_keyword_a_yes_no_sentence_gives_its_verdict():
    q = "Does the Durham Cathedral in England have any trees outside of it ?"
    ref = "The Durham Cathedral in England has trees outside of it."  # neither yes nor no: every answer scored 0
    assert [_answer(t, ref, "", "YesNo", q, keyword_guard=False) for t in ("Yes", "No")] == [0.0, 0.0]
    assert [_answer(t, ref, "", "YesNo", q) for t in ("Yes", "No", "Yes, it has trees.")] == pytest.approx(
        [1.0, 0.0, 1.0], abs=1e-4)
    assert _answer("yes or no", ref, "", "YesNo", q) == pytest.approx(2 / 3 / 2, abs=1e-4)  # the hedge guard reads it
    denied = "The heads of the women are not covered."
    assert [_answer(t, denied, "", "YesNo", "Are the heads covered ?") for t in ("Yes", "No")] == pytest.approx(
        [0.0, 1.0], abs=1e-4)


def test_a_commitment_to_the_other_option_earns_nothing():
    """Recall paid the word two options share: "Mycena pura" earned 0.5 against the keyword "Mycena guldeniana"."""
    q = "Which mushrooms stems seem more transparent ; Mycena guldeniana or Mycena pura ?"
    ref = "The Mycena guldeniana's stems are more transparent."
    assert _answer("Mycena pura", ref, "Mycena guldeniana", "choose", q, choose_guard=False) == 0.5
    assert _answer("Mycena pura", ref, "Mycena guldeniana", "choose", q) == 0.0
    assert _answer("Mycena guldeniana", ref, "Mycena guldeniana", "choose", q) == 1.0
    # a keyword that contradicts its own sentence: the sentence's commitment is spared (a real val annotation)
    side = "Would you put gas in a Bentley Continental GT on the driver side or passenger side ?"
    said = "You would put gas on the driver side of  a Bentley Continental GT."
    assert _answer(said, said, "Passenger side.", "choose", side) == pytest.approx(0.5)


def test_an_opening_clause_that_cites_the_documents_is_no_list_of_guesses():
    """Explaining which documents were used is what stage 2 asks for: "Based on D1 and D3, ..." was cut to 1/3."""
    q = "What animal is on the flag of Albania?"
    a = "A double-headed eagle is on the flag of Albania."
    for opener in ("Based on D1 and D3, ", "From the snippets and titles, ", "According to D2, D4 and D5, "):
        assert _answer(opener + a[0].lower() + a[1:], a, "", "text", q) == 1.0, opener
    assert _answer("Based on D1, a lion, a bear, a wolf, or an eagle.", a, "", "text", q) < 0.5  # still a list


def test_an_option_denied_after_it_is_named_is_not_named():
    """"X; Y is not." denies Y after naming it: _DENIAL read only what follows a "not", so the answer was halved."""
    towers = "Which is taller, the Eiffel Tower or the Tokyo Tower?"
    ref = "The Tokyo Tower is taller than the Eiffel Tower."
    for said in ("The Tokyo Tower; the Eiffel Tower is not.", "The Tokyo Tower. The Eiffel Tower isn't as tall."):
        assert _answer(said, ref, "Tokyo Tower", "choose", towers) == 1.0, said
    assert _answer("Upwards. Sideways is wrong.", "It grows upwards.", "Upwards.", "choose", STACHYS) == 1.0
    assert _answer("Sideways. Upwards is wrong.", "It grows upwards.", "Upwards.", "choose", STACHYS) == 0.0
    # four words before the verb at most: "as opposed to the Saxhornbasse which is not" denies that one only
    q = "Which instrument is constructed from a previously living thing more completely ; bansuri or Saxhornbasse ?"
    a = "The bansuri is constructed from a previously living thing more completely as opposed to the Saxhornbasse which is not."
    assert _answer(a, a, "bansuri", "choose", q) == 1.0


# ---------------------------------------------------------------------------------------- from a second mutation audit
def test_class_weights_and_the_balanced_weight_refuse_what_has_no_weight():
    """An infinite positive weight made w_yes = inf/inf = NaN; a share of positives of 0 or 1 has no balancing weight
    (1/0), and must say so as a ValueError, not a ZeroDivisionError from deep inside."""
    with pytest.raises(ValueError, match="positive_weight"):
        class_weights(math.inf)
    for share in (0, 0.0, 1, 1.0):
        with pytest.raises(ValueError, match="positive_fraction"):
            balanced_positive_weight(share)


def test_relevance_reads_a_padded_label_and_a_broken_label_earns_zero_not_the_penalty():
    said = ["<answer>yes</answer>", "<answer>no</answer>"]
    assert relevance_reward(said, label=[" Yes\n", "no "], penalty=-1.0) == [1.0, 1.0]
    # a readable verdict on a row whose label is not yes/no: the row is broken, the model is not (0, never the penalty)
    assert relevance_reward(said[:1] * 3, label=["maybe", None, 3], penalty=-1.0) == [0.0, 0.0, 0.0]


def test_balance_classes_without_a_fraction_or_weight_assumes_half_positives():
    """balance_classes with neither positive_fraction nor positive_weight: pi = 0.5, rho = 1, nothing re-weighted."""
    funcs, _ = build_reward_funcs(1, {"relevance": 1.0}, reasoning=False, balance_classes=True)
    assert funcs[0](["<answer>no</answer>", "<answer>yes</answer>"], label=["no", "yes"]) == [1.0, 1.0]
    funcs, _ = build_reward_funcs(1, {"relevance": 1.0}, reasoning=False, balance_classes=True, positive_fraction=0.25)
    assert funcs[0](["<answer>no</answer>", "<answer>yes</answer>"], label=["no", "yes"]) == [pytest.approx(1 / 3), 1.0]


def test_ranking_reward_matches_ids_to_the_candidates_case_insensitively():
    """The parse maps "d2" to the candidate "D2" (as the format reward does); without the candidates it was an
    unknown id: "d2, D9" against gold D2 earned 0 instead of 2 * 1 / (2 + 1)."""
    out = ranking_reward(["<sources>d2, D9</sources><answer>x</answer>"], candidate_ids=[CANDS], gold_ids=[["D2"]])
    assert out == [pytest.approx(2 / 3)]


def test_ranking_score_refuses_an_unknown_metric_also_where_no_gold_is_shown():
    """An unknown metric raised only on rows with visible gold; a row whose gold was filtered out returned 0.0 first."""
    for gold in (["D7"], []):
        with pytest.raises(ValueError, match="unknown ranking metric"):
            rewards.ranking_score(["D2"], gold, CANDS, metric="map")
    assert rewards.ranking_score(["D2"], ["D7"], CANDS, metric="ndcg") == 0.0


def test_mmqa_answer_without_a_reference_earns_zero_not_full_marks():
    said = [stage2_target(["D1"], "Paris")] * 3
    for metric in ("mmqa_em", "mmqa_f1"):
        assert answer_reward(said, answer=[None, [], {"type": "string"}], metric=metric, penalty=-1.0) == [0.0] * 3
    # a gap in a number column reads as NaN: no reference either (its text "nan" paid an answer "nan" in full)
    nan = [stage2_target(["D1"], "nan"), stage2_target(["D1"], "NaN")]
    for metric in ("mmqa_em", "mmqa_f1"):
        assert answer_reward(nan, answer=[math.nan, [math.nan]], metric=metric) == [0.0, 0.0]
    assert answer_reward([stage2_target(["D1"], "2.5")], answer=[2.5], metric="mmqa_em") == [1.0]  # a real number stays


def test_the_list_guard_does_not_stack_on_an_answer_the_choose_guard_halved():
    """Documented: the list guard applies "unless the choose guard already halved the answer". Naming both options
    plus two made-up guesses: recall 1 ("upwards"), halved by the choose guard = 0.5; the list guard, on its own, reads
    the two non-question guesses ("downwards", "diagonally"), neither in the reference, and would pay 0."""
    said = "Upwards or sideways or downwards or diagonally"
    cols = {"answer": "It grows upwards.", "keyword": "Upwards.", "qcate": "choose", "question": STACHYS}
    assert _answer(said, cols["answer"], cols["keyword"], cols["qcate"], cols["question"]) == 0.5
    assert _answer(said, cols["answer"], cols["keyword"], cols["qcate"], cols["question"], choose_guard=False) == 0.0


def test_with_no_keyword_options_joined_as_alternatives_hedge_whatever_the_reference_names():
    """With no keyword (keyword_guard), "X and Y" is a hedge even where Acc's reference (here the whole answer, which
    names neither option) does not name one: recall 2/4 ("it", "be" of "it be autumn colour"), halved = 1/4."""
    leaf = ("It is red and green", "It is autumn coloured.", "", "choose", "Is the leaf red or green?")
    assert _answer(*leaf) == pytest.approx(0.25)
    assert _answer(*leaf, choose_guard=False) == pytest.approx(0.5)


def test_an_opening_clause_is_no_guess_of_the_list():
    """"As far as I can tell," ends with a comma, holds stop words and no word of the reference: an opener, so the list
    is the two guesses "Ether" and "India", one right: 1/2 (counted as a third guess it would be 1/3)."""
    said = "As far as I can tell, Ether or India"
    assert _answer(said, "Ether", "", "text", length_guard=False) == pytest.approx(0.5)
    assert _answer(said, "Ether", "", "text", length_guard=False, hedge_guard=False) == 1.0


def test_keyword_and_length_guards_follow_their_switches_through_the_builder_and_the_presets():
    fountain = [stage2_target(["D1"], "a fountain")]
    cols = {"answer": ["A fountain is in front."], "keywords": [""], "qcate": ["Others"]}
    for guard, expected in ((True, 1.0), (False, 1 / 4)):  # derived keyword "fountain"; else recall 1 of 4 lemmas
        funcs, _ = build_reward_funcs(2, {"answer": 1.0}, reasoning=False, keyword_guard=guard)
        assert funcs[0](fountain, **cols) == [pytest.approx(expected)]
    padded = [stage2_target(["D1"], "It grows upwards, towards the light of the sun, every single day of the spring")]
    for guards, expected in ((True, 0.5), (False, 1.0)):  # 12 words against 2 x 1 + 4: the length guard keeps 6/12
        preset = get_preset("cpu-tiny", **{"stage2.answer_guards": guards})
        options = rewards.preset_reward_options(preset, 2)
        assert [options[g] for g in ("choose_guard", "hedge_guard", "length_guard", "keyword_guard")] == [guards] * 4
        funcs, _ = rewards.reward_funcs_for_preset(preset, 2)
        answer = next(f for f in funcs if f.__name__ == "answer")
        assert answer(padded, answer=["Upwards."], keywords=[""], qcate=["choose"]) == [pytest.approx(expected)]
        assert answer(fountain, **cols) == [pytest.approx(1.0 if guards else 1 / 4)]


def test_a_punctuation_only_answer_earns_no_format_reward():
    """"<answer>...</answer>" is the cheapest well-formed-looking answer; it states nothing, so it is no answer."""
    done = "<think>the red car is in the first image</think><sources>D1</sources><answer>{}</answer>"
    scores = rewards.format_reward([done.format("..."), done.format("red")], stage=2, reasoning=True,
                                   candidate_ids=[["D1", "D2"]] * 2)
    assert scores == [0.0, 1.0]
