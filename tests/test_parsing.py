"""The parser: the output contract of prompts, read back, with every malformation named."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrag_lite.parsing import (
    MAX_PROBLEMS,
    PROBLEM_CODES,
    completion_text,
    normalize_verdict,
    parse_stage1,
    parse_stage2,
    split_ids,
)
from mmrag_lite.prompts import Tags, stage1_target, stage2_target

IDS = ["D1", "D2", "D3", "D4"]


# ------------------------------------------------------------------------------------------ completion_text
def test_completion_text_accepts_trl_shapes():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    # a system/user message in the list is not part of the completion
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"


@pytest.mark.parametrize("bad", [None, 3, 2.5, b"bytes", [], [1, 2], {"content": None}, object()])
def test_completion_text_non_text_is_none(bad):
    assert completion_text(bad) is None


# ----------------------------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("label", ["yes", "no"])
@pytest.mark.parametrize("reasoning", [True, False])
def test_stage1_round_trips_the_prompt_contract(label, reasoning):
    text = stage1_target(label, reasoning=reasoning, think="the caption names the bridge")
    parsed = parse_stage1(text, reasoning=reasoning)
    assert parsed.ok, parsed.problems
    assert parsed.label == label
    assert parsed.think == ("the caption names the bridge" if reasoning else None)


def test_stage1_is_lenient_on_whitespace_and_verdict_case():
    parsed = parse_stage1("  <think>\n because \n</think>\n\n<answer> Yes. </answer>\n", reasoning=True)
    assert parsed.ok and parsed.label == "yes" and parsed.think == "because"
    assert normalize_verdict(" NO ") == "no"
    assert normalize_verdict("maybe") is None


@pytest.mark.parametrize(
    "text, reasoning, code, label",
    [
        ("<answer>yes</answer>", True, "missing_tag", "yes"),  # think required but absent
        ("<think>x</think><answer>yes</answer>", False, "unexpected_tag", "yes"),
        ("<answer>yes</answer><answer>no</answer>", False, "repeated_tag", None),  # hedging is unreadable
        ("<think>a long chain of thought that was cut", True, "unclosed_tag", None),
        ("<answer>yes", False, "unclosed_tag", None),
        ("Sure! <answer>yes</answer>", False, "text_outside_tags", "yes"),
        ("<answer>yes</answer> I hope this helps", False, "text_outside_tags", "yes"),
        ("<answer>yes</answer><think>x</think>", True, "wrong_order", "yes"),
        ("<answer>probably</answer>", False, "invalid_verdict", None),
        ("<answer></answer>", False, "invalid_verdict", None),
        ("</answer>yes", False, "stray_close_tag", None),
        ("<answer>yes<answer>no</answer>", False, "nested_tag", None),
        ("", False, "empty", None),
        ("   \n", False, "empty", None),
        ("yes", False, "text_outside_tags", None),
    ],
)
def test_stage1_problems(text, reasoning, code, label):
    parsed = parse_stage1(text, reasoning=reasoning)
    assert code in parsed.codes, parsed.problems
    assert not parsed.ok
    assert parsed.label == label
    assert all(p.code in PROBLEM_CODES for p in parsed.problems)


def test_stage1_none_is_a_problem_not_an_exception():
    parsed = parse_stage1(None)
    assert parsed.codes == ("not_text",) and parsed.label is None


def test_stage1_custom_tags():
    tags = Tags(think="reason", answer="verdict")
    text = stage1_target("no", reasoning=True, think="t", tags=tags)
    assert text == "<reason>t</reason><verdict>no</verdict>"
    assert parse_stage1(text, reasoning=True, tags=tags).label == "no"
    assert not parse_stage1("<think>t</think><answer>no</answer>", reasoning=True, tags=tags).ok


def test_renamed_tags_reach_the_prompts_too():
    """A renamed tag is what the system prompt asks for, not only what the parser reads."""
    from mmrag_lite.prompts import stage1_messages, stage2_messages

    tags = Tags(think="reason", answer="verdict", sources="docs")
    cand = {"id": "a", "modality": "text", "title": "t", "text": "x"}
    s1 = stage1_messages("q?", cand, reasoning=True, tags=tags)[0]["content"][0]["text"]
    s2 = stage2_messages("q?", [cand], reasoning=True, tags=tags)[0]["content"][0]["text"]
    assert "<verdict>yes</verdict>" in s1 and "<reason></reason>" in s1 and "<answer>" not in s1
    assert "<docs></docs>" in s2 and "<verdict></verdict>" in s2 and "<think>" not in s2
    default = stage2_messages("q?", [cand], reasoning=False)[0]["content"][0]["text"]
    assert "<sources></sources>" in default and "<think>" not in default  # no hint without reasoning


# ----------------------------------------------------------------------------------------------- stage 2
@pytest.mark.parametrize("reasoning", [True, False])
def test_stage2_round_trips_the_prompt_contract(reasoning):
    text = stage2_target(["D2", "D4"], "a red car", reasoning=reasoning, think="D2 shows it")
    parsed = parse_stage2(text, IDS, reasoning=reasoning)
    assert parsed.ok, parsed.problems
    assert parsed.source_ids == ("D2", "D4")
    assert parsed.answer == "a red car"
    assert parsed.think == ("D2 shows it" if reasoning else None)


def test_stage2_ids_are_lenient_on_separators_and_case():
    assert split_ids("D2, D5") == ["D2", "D5"]
    assert split_ids("[D2] [D5];D1\n") == ["D2", "D5", "D1"]
    assert split_ids("[D2][D5](D1)") == ["D2", "D5", "D1"]  # brackets side by side still separate the ids
    parsed = parse_stage2("<sources>d2 ,D1</sources><answer>x</answer>", IDS, reasoning=False)
    assert parsed.ok and parsed.source_ids == ("D2", "D1")


@pytest.mark.parametrize("listed", ["- D2\n- D4", "• D2 • D4", "1. D2\n2. D4", "(1) D2 (2) D4", "1) D2, 2) D4",
                                    "D2 and D4", "D2 AND D4", "D2 & D4", "D2/D4", "D2 | D4", "D2、D4"])
def test_stage2_ids_written_as_a_list_name_the_same_ids(listed):
    """A pretrained model lists ids as bullets, numbered lines or "D2 and D4": the same two ids, not a list number
    or a dash taken for an unknown id (which would cost the format reward and a ranking slot)."""
    assert split_ids(listed) == ["D2", "D4"]
    parsed = parse_stage2(f"<sources>{listed}</sources><answer>x</answer>", IDS, reasoning=False)
    assert parsed.ok and parsed.source_ids == ("D2", "D4")
    assert split_ids("d5bb-1, 30174997") == ["d5bb-1", "30174997"]  # a dash inside an id stays


def test_stage2_unknown_and_duplicate_ids():
    parsed = parse_stage2("<sources>D2, D9, D2, D1</sources><answer>x</answer>", IDS, reasoning=False)
    assert set(parsed.codes) == {"unknown_id", "duplicate_id"}
    assert parsed.source_ids == ("D2", "D9", "D1")  # order kept, repeat dropped, the unknown one kept in its slot
    assert parsed.unknown_ids == ("D9",)


def test_stage2_without_candidates_accepts_any_id():
    parsed = parse_stage2("<sources>30174997, d5bb_1</sources><answer>x</answer>", None, reasoning=False)
    assert parsed.ok and parsed.source_ids == ("30174997", "d5bb_1")


@pytest.mark.parametrize(
    "text, code, source_ids, answer",
    [
        ("<sources></sources><answer>x</answer>", "empty_sources", (), "x"),
        ("<sources>D1</sources><answer>  </answer>", "empty_answer", ("D1",), ""),
        ("<sources>D1</sources><answer> ... </answer>", "empty_answer", ("D1",), "..."),
        ("<sources>D1</sources><answer>?!</answer>", "empty_answer", ("D1",), "?!"),
        ("<answer>x</answer>", "missing_tag", None, "x"),
        ("<answer>x</answer><sources>D1</sources>", "wrong_order", ("D1",), "x"),
        ("<sources>D1</sources><answer>x</answer><answer>y</answer>", "repeated_tag", ("D1",), None),
        ("<sources>D1</sources><answer>x", "unclosed_tag", ("D1",), None),
        ("<sources>D1</sources>\nThe answer is x", "text_outside_tags", ("D1",), None),
    ],
)
def test_stage2_problems(text, code, source_ids, answer):
    """Each problem is named, and the fields that are still unambiguous survive it (the ranking reward reads them)."""
    parsed = parse_stage2(text, IDS, reasoning=False)
    assert code in parsed.codes, parsed.problems
    assert not parsed.ok
    assert parsed.source_ids == source_ids
    assert parsed.answer == answer


def test_stage2_ambiguous_fields_are_none():
    parsed = parse_stage2("<sources>D1</sources><sources>D2</sources><answer>a</answer><answer>b</answer>", IDS, reasoning=False)
    assert parsed.source_ids is None and parsed.answer is None


# --------------------------------------------------------------------------------------------- pathologies
def test_enormous_outputs_stay_fast_and_problems_stay_few():
    cases = [
        "<answer>" * 20_000,
        "<think>" + "why " * 25_000,  # 100k characters of reasoning, never closed
        ("<sources>D1</sources>" * 5_000)[:100_000],
        "yes " * 25_000,
        ("<answer>yes</answer>" + "x" * 10) * 3_000,
    ]
    start = time.perf_counter()
    for text in cases:
        p1 = parse_stage1(text, reasoning=True)
        p2 = parse_stage2(text, IDS, reasoning=True)
        assert not p1.ok and not p2.ok
        assert len(p1.problems) <= MAX_PROBLEMS and len(p2.problems) <= MAX_PROBLEMS
    assert time.perf_counter() - start < 2.0
    distinct = "".join(f"<answer>yes</answer>junk{i} " for i in range(50))  # 50 different messages, and a repeated tag
    assert len(parse_stage1(distinct, reasoning=False).problems) == MAX_PROBLEMS


def test_unicode_is_fine():
    parsed = parse_stage2("<think>图片 🚗 ünïcødé</think><sources>D1</sources><answer>rouge 红色</answer>", IDS)
    assert parsed.ok and parsed.answer == "rouge 红色"
    assert parse_stage1("<answer>ｙｅｓ</answer>", reasoning=False).label is None  # full-width is not "yes"


# ------------------------------------------------------------------------------------------------- fuzz
_pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<sources>", "</sources>", "yes", "no",
                           "D1", "D2", ", ", " ", "\n", "x", "<", ">", "/", "🚗", "\x00"])
_texts = st.one_of(st.text(max_size=200), st.lists(_pieces, max_size=30).map("".join))
_anything = st.one_of(_texts, st.none(), st.integers(), st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": _texts}), max_size=2))


@settings(max_examples=300, deadline=None)
@given(_anything, st.booleans())
def test_parsers_never_raise(completion, reasoning):
    p1 = parse_stage1(completion, reasoning=reasoning)
    p2 = parse_stage2(completion, IDS, reasoning=reasoning)
    assert p1.label in (None, "yes", "no")
    for p in (p1, p2):  # every problem is one the notebook can list, and a spam of them stays bounded
        assert set(p.codes) <= set(PROBLEM_CODES) and len(p.problems) <= MAX_PROBLEMS
        if p.ok:  # a clean parse read a <think> block exactly when the format asks for one
            assert (p.think is not None) == reasoning
    if p2.ok:
        assert p2.source_ids and set(p2.source_ids) <= set(IDS) and p2.answer
    if p1.ok:
        assert p1.label is not None


def test_a_closing_tag_of_another_block_does_not_close_the_open_one():
    p = parse_stage1("<answer>yes</think>", reasoning=False)
    assert not p.ok and "nested_tag" in p.codes and p.label is None


def test_ids_are_deduplicated_by_their_canonical_form_and_trailing_punctuation_is_read():
    p = parse_stage2("<sources>D2, d2</sources><answer>x</answer>", ["D1", "D2"], reasoning=False)
    assert p.source_ids == ("D2",) and "duplicate_id" in p.codes
    assert split_ids("D2, D5.") == ["D2", "D5"]
    assert normalize_verdict("Yes!") == "yes"


# ------------------------------------------------------------------- cases found surviving a mutation run (2026-11-28)
def test_a_stray_closing_tag_is_one_problem_and_not_text_outside_the_tags():
    """The stray tag is consumed: it is not also "text outside the tags", and the same message is reported once."""
    assert parse_stage1("</think><answer>yes</answer>", reasoning=False).codes == ("stray_close_tag",)
    p = parse_stage1("</think></think><answer>yes</answer>", reasoning=False)
    assert p.codes == ("stray_close_tag",) and p.label == "yes"


def test_a_missing_block_is_not_also_a_wrong_order():
    assert parse_stage1("<answer>yes</answer>", reasoning=True).codes == ("missing_tag",)
    assert parse_stage2("<think>t</think><answer>x</answer>", IDS, reasoning=True).codes == ("missing_tag",)


def test_full_width_ids_and_separators_are_read_as_ascii():
    assert split_ids("Ｄ２，Ｄ４") == ["D2", "D4"]
    parsed = parse_stage2("<sources>Ｄ２，Ｄ４</sources><answer>x</answer>", IDS, reasoning=False)
    assert parsed.ok and parsed.source_ids == ("D2", "D4")


def test_only_a_whole_token_is_a_list_marker():
    """"and" or "1." drop only as whole tokens: an id that starts with them is still an id."""
    assert split_ids("android_1, 2.jpg, D2") == ["android_1", "2.jpg", "D2"]
    parsed = parse_stage2("<sources>Andes, D2</sources><answer>x</answer>", ["Andes", "D2"], reasoning=False)
    assert parsed.ok and parsed.source_ids == ("Andes", "D2")


def test_candidate_ids_are_matched_without_their_surrounding_whitespace():
    parsed = parse_stage2("<sources>D1</sources><answer>x</answer>", [" D1 ", "D2"], reasoning=False)
    assert parsed.ok and parsed.unknown_ids == () and parsed.source_ids == (" D1 ",)  # the candidate's own spelling


def test_completion_text_joins_assistant_turns_and_skips_non_text_parts():
    msgs = [{"role": "assistant", "content": "<think>t</think>"}, {"role": "assistant", "content": "<answer>yes</answer>"}]
    assert completion_text(msgs) == "<think>t</think><answer>yes</answer>"
    assert parse_stage1(msgs, reasoning=True).ok
    parts = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "<answer>no</answer>"}]}]
    assert completion_text(parts) == "<answer>no</answer>" and parse_stage1(parts, reasoning=False).label == "no"


# ----------------------------------------------------------------------------------------------- prompts
def test_the_targets_are_the_completions_the_prompt_module_documents():
    """Pinned byte for byte (a mutation run): the miniature's warm-up and the worked examples show these strings."""
    assert stage2_target(["D2", "D5"], "red", reasoning=True, think="why") == \
        "<think>why</think><sources>D2, D5</sources><answer>red</answer>"
    assert stage2_target(["D1"], "red") == "<sources>D1</sources><answer>red</answer>"
    assert stage1_target("yes", reasoning=True, think="t") == "<think>t</think><answer>yes</answer>"
    assert stage1_target("no") == "<answer>no</answer>"


def test_candidates_are_described_as_documented_and_an_image_part_comes_first():
    from mmrag_lite.prompts import describe_candidate, stage1_images, stage1_messages

    img = {"id": "i", "modality": "image", "title": " Eiffel Tower ", "text": "a tower at night", "image": "PIXELS"}
    assert describe_candidate(img) == "Image titled 'Eiffel Tower': a tower at night"
    assert describe_candidate(dict(img, title="  ")) == "Image: a tower at night"
    assert describe_candidate({"modality": "text", "title": " ", "text": " a fact "}) == "a fact"
    assert describe_candidate({"modality": "text", "title": "T", "text": "a fact"}) == "T: a fact"
    parts = stage1_messages("q?", img)[1]["content"]
    assert [p["type"] for p in parts] == ["image", "text"] and stage1_images(img) == ["PIXELS"]
    assert "Image titled 'Eiffel Tower'" in parts[1]["text"]


def test_the_stage2_system_prompt_names_exactly_the_ids_shown():
    from mmrag_lite.prompts import short_ids, stage2_messages, stage2_system

    assert "documents D1..D3." in stage2_system(3)
    cands = [{"modality": "text", "title": "", "text": f"fact {i}"} for i in range(3)]
    system, user = stage2_messages("q?", cands)
    assert "D1..D3" in system["content"][0]["text"] and short_ids(3) == ["D1", "D2", "D3"]
    assert [p["text"] for p in user["content"] if p["text"].startswith("D")] == ["D1: ", "D2: ", "D3: "]


def test_too_few_orders_repeat_in_turn():
    """Two candidates have two orders: four asked for are each twice, so neither slot is favoured."""
    from mmrag_lite.prompts import permutations

    orders = permutations(2, 4, seed=0)
    assert sorted(map(tuple, orders[:2])) == [(0, 1), (1, 0)] and orders[2:] == orders[:2]


@pytest.mark.parametrize("answer", ["7", "é", "红色", "½", "x."])
def test_a_one_character_answer_with_a_letter_or_digit_is_an_answer(answer):
    """Only an answer without any letter or digit counts as empty: short and non-Latin answers stay answers."""
    parsed = parse_stage2(f"<sources>D1</sources><answer>{answer}</answer>", IDS, reasoning=False)
    assert parsed.ok, parsed.problems
    assert parsed.answer == answer
