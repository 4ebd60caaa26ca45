"""Evaluation orchestration on planted fixtures: hand-made predictions with known metric values, no model."""

from __future__ import annotations

import copy
import json
import math
import random
import shlex

import pytest

from mmrag_lite import evaluation as E
from mmrag_lite.pipeline import PipelineResult


def _row(guid, qcate, answer, keywords, gold, distractors=("d1", "d2")):
    cands = [{"id": g, "modality": "text", "title": f"t{g}", "text": f"fact {g}", "image": None, "is_gold": True} for g in gold]
    cands += [{"id": d, "modality": "text", "title": f"t{d}", "text": f"noise {d}", "image": None, "is_gold": False} for d in distractors]
    return {"guid": guid, "question": f"question {guid}?", "answer": answer, "keywords": keywords, "qcate": qcate,
            "topic": "", "candidates": cands, "gold_ids": list(gold)}


ROWS = [
    _row("q1", "color", "The car is red.", "red", ["g1"]),
    _row("q2", "YesNo", "Yes, it is.", "yes", ["g2", "g3"]),
    _row("q3", "text", "Paris is the capital", "", ["g4", "g5"]),
]


def _res(guid, sources, answer, system="planted", kept=()):
    return PipelineResult(guid=guid, question="", system=system, scores={}, kept_ids=tuple(kept), reasoning="",
                          completion="", sources=tuple(sources), answer=answer)


# Known values: q1 perfect (F1 1, acc 1); q2 wrong source, wrong answer (0, 0); q3 one of two gold (F1 2/3), exact answer (1).
PLANTED = [_res("q1", ["g1"], "red"), _res("q2", ["d1"], "no"), _res("q3", ["g4"], "Paris is the capital")]
PERFECT = [_res(r["guid"], r["gold_ids"], r["answer"], "perfect") for r in ROWS]


def test_score_webqa_planted_values():
    s = E.score_webqa(PLANTED, ROWS)
    assert s["n"] == 3
    assert s["Retr-F1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert s["QA-Acc"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["QA-FL"] == E.UNAVAILABLE and s["QA"] == E.UNAVAILABLE  # no BART scorer: never a made-up number
    cats = {c["qcate"]: c for c in s["per_category"]}
    assert cats["YesNo"]["QA-Acc"] == 0.0 and cats["color"]["Retr-F1"] == 1.0 and cats["All"]["n"] == 3


def test_reasoning_ablation_reports_each_prompt_with_its_scores():
    from dataclasses import replace

    from mmrag_lite.config import get_preset

    thinking = [replace(r, reasoning="because the gold says so") for r in PERFECT]
    rows = E.reasoning_ablation(ROWS, get_preset("cpu-tiny"), None, reuse={False: PLANTED, True: thinking}, progress=False)
    off, on = rows
    assert off["stage-2 prompt asks for reasoning"] == "no" and on["stage-2 prompt asks for reasoning"] == "yes"
    assert off["trained with reasoning"] == on["trained with reasoning"] == "no"  # cpu-tiny trains without <think>
    assert off["has <think>"] == 0.0 and on["has <think>"] == 1.0
    assert off["Retr-F1"] == pytest.approx(5 / 9) and off["QA-Acc"] == pytest.approx(2 / 3, abs=1e-4)
    assert on["Retr-F1"] == 1.0 and on["QA-Acc"] == pytest.approx(1.0, abs=1e-4)
    assert off["well-formed"] == on["well-formed"] == 1.0


def test_missing_prediction_scores_zero():
    s = E.score_webqa(PLANTED[:1], ROWS)
    assert s["Retr-F1"] == pytest.approx(1 / 3) and s["QA-Acc"] == pytest.approx(1 / 3, abs=1e-4)


def test_systems_table_shape_and_markdown():
    table, cats = E.systems_table({"perfect": PERFECT, "planted": PLANTED}, ROWS)
    assert [r["system"] for r in table] == ["perfect", "planted"]
    assert set(E.MAIN_COLUMNS) <= set(table[0])
    assert table[0]["Retr-F1"] == pytest.approx(1.0) and table[0]["QA-Acc"] == pytest.approx(1.0, abs=1e-4)
    assert table[1]["MMQA EM"] == E.NOT_RUN
    md = E.markdown_table(table, E.MAIN_COLUMNS)
    lines = md.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| system | Retr-F1 | QA-Acc")
    assert "| planted | 0.556 | 0.667 | unavailable offline |" in md
    assert set(cats) == {"perfect", "planted"}
    assert table[0]["well-formed"] == 1.0
    answers = E.markdown_table([{"q": "x", "answer": "a | b\nis red\r\nthen"}])
    assert answers.splitlines()[2] == "| x | a \\| b ⏎ is red ⏎ then |"  # a model's line break does not end the row


def test_systems_table_reports_how_much_gold_reached_stage_2():
    """kept_ids is what the stage-2 prompt showed: a filter's top-k, or the candidates that fitted the budget."""
    shown = [_res("q1", ["g1"], "red", kept=["g1", "d1"]),  # the gold shown: 1
             _res("q2", ["g2"], "yes", kept=["d1", "g3"]),  # one of two gold shown: 1/2
             _res("q3", [], "", kept=["d1"])]  # none of two: 0
    table, _ = E.systems_table({"shown": shown, "missing one": shown[:2]}, ROWS)
    assert table[0]["gold recall of kept"] == pytest.approx(0.5)
    assert table[1]["gold recall of kept"] == pytest.approx(0.5)  # q3 has no result: it showed nothing
    assert E.gold_recall_of_kept(PERFECT, ROWS) == 0.0  # PERFECT cites the gold but recorded no prompt
    assert "gold recall of kept" in E.MAIN_COLUMNS


def test_filter_verdict_compares_the_two_judges_on_held_out_gold():
    """Notebook 05 says in one computed line whether stage 1 made the filter better: a sampled training reward cannot."""
    from mmrag_lite.pipeline import SystemSpec

    base = [_res("q1", [], "", kept=["g1"]), _res("q2", [], "", kept=["g2"]), _res("q3", [], "", kept=["d1"])]
    trained = [_res("q1", [], "", kept=["g1"]), _res("q2", [], "", kept=["d1"]), _res("q3", [], "", kept=["d1"])]
    systems = [SystemSpec("all", "all", "base"), SystemSpec("base top-k", "base", "base"),
               SystemSpec("stage 1 only", "stage1", "base"), SystemSpec("stage 1 + stage 2", "stage1", "stage2")]
    table, _ = E.systems_table({"base top-k": base, "stage 1 only": trained, "stage 1 + stage 2": base}, ROWS)
    line = E.filter_verdict(table, systems)  # the first stage-1 system is the one compared
    assert "kept less gold than" in line and "0.500 -> 0.333" in line and "-0.167" in line
    assert "about 0.5 of 3 questions" in line and "up to 0.333" in line
    table, _ = E.systems_table({"base top-k": trained, "stage 1 only": base}, ROWS)
    assert "kept more gold than" in E.filter_verdict(table, systems)
    assert E.filter_verdict(table, systems[2:]) == ""  # no base-judge filter to compare with


def test_accuracy_reference_note_counts_questions_scored_against_the_whole_sentence():
    """Real WebQA_train_val.json has no Keywords_A: the report must say QA-Acc read the full answer, not a keyword."""
    assert E.accuracy_reference_note(ROWS[:2]) == "QA-Acc reference: the keyword answer (Keywords_A) for all 2 WebQA questions"
    public_release = [dict(r, keywords="") for r in ROWS]
    note = E.accuracy_reference_note(public_release)
    assert "for 0 of 3 WebQA questions" in note and "full answer sentence A" in note and "not the official" in note


def test_systems_table_well_formed_counts_completions_citing_ids_not_shown():
    from dataclasses import replace

    cites_nothing = [replace(r, problems=("unknown_id: not among the candidates: D3",), sources=()) for r in PERFECT]
    table, _ = E.systems_table({"half": PERFECT[:1] + cites_nothing[1:], "none": cites_nothing}, ROWS)
    assert table[0]["well-formed"] == pytest.approx(1 / 3) and table[1]["well-formed"] == 0.0
    assert table[1]["Retr-F1"] == 0.0  # the column explains the zero: nothing shown was cited


def test_mmqa_scores_are_x100():
    rows = [dict(_row("m1", "ImageQ", "horses", "", ["a"]), answers=["horses"]),
            dict(_row("m2", "ImageQ", "1976", "", ["b"]), answers=["1976"])]
    s = E.score_mmqa([_res("m1", [], "Horses"), _res("m2", [], "1975")], rows)
    assert s["MMQA EM"] == pytest.approx(50.0) and s["MMQA F1"] == pytest.approx(50.0) and s["n_mmqa"] == 2
    unanswered = dict(_row("m3", "ImageQ", "", "", ["c"]), answers=[])  # no gold answer: left out, as officially
    s = E.score_mmqa([_res("m1", [], "Horses"), _res("m3", [], "")], [rows[0], unanswered])
    assert s["MMQA EM"] == pytest.approx(100.0) and s["n_mmqa"] == 1


def test_load_mmqa_rows_shows_pixels_where_the_release_image_folder_is(tmp_path, monkeypatch):
    from PIL import Image

    from mmrag_lite import data
    from mmrag_lite.config import get_preset

    dev = tmp_path / "mmqa-dev"
    dev.mkdir()
    ids = ["5588a1833b8fa95fe1b0ed520e447d64", "117d500aaa630023c4038b8268b309c0"]
    question = {"qid": "bc2b", "question": "What animals race in the Kentucky Derby?",
                "answers": [{"answer": "horses", "type": "string", "modality": "image"}],
                "metadata": {"type": "ImageQ", "modalities": ["image"], "image_doc_ids": ids, "text_doc_ids": [],
                             "table_id": ""},
                "supporting_context": [{"doc_id": ids[0], "doc_part": "image"}]}
    (dev / "MMQA_dev.jsonl").write_text(json.dumps(question) + "\n")
    (dev / "MMQA_images.jsonl").write_text("".join(json.dumps({"id": i, "title": f"title {i[:4]}", "path": f"{i}.jpg"}) + "\n"
                                                   for i in ids))
    monkeypatch.setenv("MMRAG_SHARED_DATA", str(tmp_path))
    preset = get_preset("cpu-tiny")
    rows, note = E.load_mmqa_rows(preset)
    assert [r["guid"] for r in rows] == ["bc2b"] and all(c["image"] is None for c in rows[0]["candidates"])
    assert "no MMQA pixels here" in note and "final_dataset_images.zip" in note and "weaker setting" in note

    (dev / data.MMQA_IMAGE_FOLDER / data.MMQA_IMAGE_FOLDER).mkdir(parents=True)  # unzipped one level too deep
    nested = dev / data.MMQA_IMAGE_FOLDER / data.MMQA_IMAGE_FOLDER / f"{ids[0]}.jpg"
    Image.new("RGB", (900, 600), (0, 90, 0)).save(nested)
    (dev / "MMQA_texts.jsonl").write_text(json.dumps({"id": "p1", "title": "Derby", "text": "Horses race."}) + "\n")
    rows, note = E.load_mmqa_rows(preset, progress=False)
    assert all(c["image"] is None for c in rows[0]["candidates"])
    assert "pixels for 0 of 2" in note and "weaker setting" in note  # a folder without the files is no pixels
    (dev / "MMQA_texts.jsonl").unlink()
    nested.rename(dev / data.MMQA_IMAGE_FOLDER / f"{ids[0]}.jpg")
    rows, note = E.load_mmqa_rows(preset)
    by_id = {c["id"]: c for c in rows[0]["candidates"]}
    assert max(by_id[ids[0]]["image"].size) == data.MiniWebQAFilters().max_image_side  # stored like WebQA's images
    assert by_id[ids[1]]["image"] is None
    assert "pixels for 1 of 2 image candidates" in note and f"image {ids[1]}: no file" in note
    assert "weaker setting" in note  # no passage texts (MMQA_texts) yet

    (dev / "MMQA_texts.jsonl").write_text(json.dumps({"id": "p1", "title": "Derby", "text": "Horses race."}) + "\n")
    rows, note = E.load_mmqa_rows(preset)
    assert "image+text pools" in note and "weaker setting" in note  # one image still shown as its title
    Image.new("RGB", (40, 40), (90, 0, 0)).save(dev / data.MMQA_IMAGE_FOLDER / f"{ids[1]}.jpg")
    rows, note = E.load_mmqa_rows(preset)
    assert "image+text pools" in note and "pixels for 2 of 2" in note and "weaker setting" not in note


def test_paper_reference_is_labelled_as_theirs():
    rows, md = E.paper_reference_table()
    assert any(r["metric"] == "QA-Acc" and r["value"] == 0.763 for r in rows)
    assert all("paper" in r["source"] or "baseline" in r["source"] for r in rows)
    assert "not measured here" in md
    report = E.EvalReport(preset="cpu-tiny", table=[{"system": "x"}])
    assert "reference only" in report.markdown()
    assert any("not measured here" in k for k in report.to_dict())


# ------------------------------------------------------------------------------------------ robustness
def test_inject_conflicting_adds_one_non_gold_candidate_stating_the_wrong_answer():
    row = ROWS[0]
    before = copy.deepcopy(row)
    out = E.inject_distractors(row, "conflicting", wrong_answer="blue", seed=1)
    assert row == before  # input untouched
    added = [c for c in out["candidates"] if c["id"].startswith("adv-")]
    assert len(added) == 1 and len(out["candidates"]) == len(row["candidates"]) + 1
    adv = added[0]
    assert not adv["is_gold"] and "blue" in adv["text"] and row["question"].rstrip("?") in adv["text"]
    assert adv["title"] == row["candidates"][0]["title"]  # dressed as the gold document
    assert out["gold_ids"] == row["gold_ids"] and out["adversarial_answer"] == "blue"
    assert E.inject_distractors(row, "conflicting", wrong_answer="blue", seed=1) == out  # deterministic


def test_conflicting_text_states_a_changed_fact_alone_and_a_short_answer_with_its_question():
    q = "In which year was the Little Orchard of Tomas founded?"
    changed = E.WrongAnswer("The Little Orchard of Tomas was founded in 1941.", "changed number")
    assert E.conflicting_text(q, changed) == "The Little Orchard of Tomas was founded in 1941."  # reads like the gold fact
    assert E.conflicting_text(q, E.WrongAnswer("No.", "flipped yes/no")) == f"{q} The answer is No."  # one period
    assert E.conflicting_text(q, E.WrongAnswer("Paris is big", E.FALLBACK_WRONG)).endswith("The answer is Paris is big.")
    assert E.conflicting_text(q, "") == f"{q} Not in this document."
    swapped = E.WrongAnswer("The Statue of Liberty is taller.", "other option")  # a sentence: no "The answer is"
    assert E.conflicting_text("Which is taller?", swapped) == "The Statue of Liberty is taller."
    assert E.conflicting_text("Which is taller?", E.WrongAnswer("Big Ben", "other option")).endswith("The answer is Big Ben.")
    row = dict(ROWS[2], question=q, answer="The Little Orchard of Tomas was founded in 1936.", qcate="text")
    adv = next(c for c in E.attack_rows([row], "conflicting", seed=0)[0]["candidates"] if c["id"].startswith("adv-"))
    assert "1936" not in adv["text"] and q.rstrip("?") not in adv["text"] and not adv["text"].endswith("..")


def test_inject_lexical_copies_question_words_without_an_answer():
    out = E.inject_distractors(ROWS[2], "lexical", seed=0)
    adv = next(c for c in out["candidates"] if c["id"].startswith("adv-"))
    assert "question q3" in adv["text"] and "Paris" not in adv["text"] and not adv["is_gold"]
    with pytest.raises(ValueError):
        E.inject_distractors(ROWS[0], "nonsense")  # type: ignore[arg-type]


def test_wrong_answer_has_the_right_type_and_is_wrong():
    rng = random.Random(0)
    assert E.conflicting_answer(ROWS[1], [], rng).text == "No"
    colour = E.conflicting_answer(ROWS[0], [], rng).text
    assert colour in E.COLORS and colour != "red"
    num = E.conflicting_answer({"qcate": "number", "answer": "There are 3 dogs"}, [], rng).text
    assert num.isdigit() and num != "3"
    other = E.conflicting_answer(ROWS[2], ["Paris is the capital", "Berlin"], rng).text
    assert other == "Berlin is the capital"  # a text answer keeps its shape, with the name changed (not a fallback)


def test_wrong_answer_is_never_scored_right_by_the_official_accuracy():
    """The planted "wrong" answer was picked by string: "squares" did not rule out "square", "grey" not "gray", and a
    number written as a word ("four") not 4, so the trap could state the gold answer (QA-Acc 1.0; found by an
    audit). Every draw is now checked with webqa_accuracy itself."""
    from mmrag_lite.metrics import qa_reference, webqa_accuracy

    cases = [
        {"qcate": "shape", "answer": "The tiles are squares.", "keywords": "square"},
        {"qcate": "shape", "answer": "It is circles.", "keywords": ""},
        {"qcate": "color", "answer": "The roof is grey.", "keywords": "grey"},
        {"qcate": "number", "answer": "There are four dogs.", "keywords": "four"},
        {"qcate": "number", "answer": "There are 3 dogs", "keywords": ""},
    ]
    for row in cases:
        ref = qa_reference(row["answer"], row["keywords"])
        for seed in range(60):
            wrong = E.conflicting_answer(dict(row, question="q?"), [], random.Random(seed))
            assert webqa_accuracy(wrong.text, ref, row["qcate"]) == 0.0, (row, seed, wrong)


def test_choose_options_beside_a_name_keep_only_the_option_words():
    """"Are the triangles in the Royal Theater of Ravi orange or black?": the left option is "orange", not the name
    before it (the wrong answer read "... are Royal Theater of Ravi orange")."""
    q = "Are the triangles in the Royal Theater of Ravi orange or black?"
    assert E.choice_options(q) == ("orange", "black")
    assert E.choice_options("Is the ball in Lina's garden dark red or light blue?") == ("dark red", "light blue")
    row = {"qcate": "choose", "question": q, "answer": "The triangles in the Royal Theater of Ravi are black.",
           "keywords": "black"}
    assert E.conflicting_answer(row, [], random.Random(0)).text == "The triangles in the Royal Theater of Ravi are orange."


def test_choose_wrong_answer_is_the_other_option():
    rng = random.Random(0)
    row = {"qcate": "choose", "question": "Which has more circles, the Royal Forest of Vera or the Western Lake of Lea?",
           "answer": "The Western Lake of Lea has more circles than the Royal Forest of Vera.", "keywords": "Western Lake of Lea"}
    # Swapping both options keeps every word: recall against the keyword scores it 1.0, as the gold answer, so
    # echoing it would cost no QA-Acc (and "red and white" -> "white and red" says the same). Such a swap is not used:
    assert E.other_option_answer(row["question"], row["answer"], row["keywords"]) == \
        "The Royal Forest of Vera has more circles than the Western Lake of Lea."
    assert E.conflicting_answer(row, ["unrelated answer"], rng) == E.WrongAnswer("unrelated answer", E.FALLBACK_WRONG)
    flowers = {"qcate": "choose", "question": "Are the flowers red and white or blue?", "answer": "The flowers are red and white.",
               "keywords": ""}
    wrong = E.conflicting_answer(flowers, ["unrelated answer"], rng)
    assert wrong.how == "other option" and "red" not in wrong.text and "blue" in wrong.text
    short = dict(row, question="Is the Eiffel Tower or the Statue of Liberty taller?", answer="The Eiffel Tower is taller.")
    assert E.conflicting_answer(short, [], rng).text == "The Statue of Liberty is taller."
    bare = dict(row, question="Are there more windows on the Tower of London or on Big Ben?", answer="Big Ben", keywords="Big Ben")
    assert E.conflicting_answer(bare, [], rng).text == "Tower of London"
    # the answer names a word beside " or ", not an option: that word is swapped, the shared "than ..." stays once
    taller = dict(row, question="Is the Eiffel Tower taller or shorter than Big Ben?",
                  answer="The Eiffel Tower is taller than Big Ben.")
    assert E.conflicting_answer(taller, [], rng).text == "The Eiffel Tower is shorter than Big Ben."
    hind = dict(row, question="Is the tail or the hind legs of the Suricata longer?",
                answer="The tail of the Suricata is longer than its legs.", keywords="")  # not the Lea's keyword
    assert E.conflicting_answer(hind, [], rng).text == "The hind legs of the Suricata is longer than its legs."
    assert E.choice_options("Which is older, the Colosseum or the Parthenon?") == ("Colosseum", "Parthenon")
    assert E.choice_options("What colour is the car?") is None


def test_text_and_others_wrong_answers_change_one_fact():
    rng = random.Random(0)
    year = {"qcate": "text", "question": "In which year was the Painted Station of Emil founded?",
            "answer": "The Painted Station of Emil was founded in 1804.", "keywords": ""}
    wrong = E.conflicting_answer(year, [], rng)
    assert wrong.how == "changed number" and wrong.text.startswith("The Painted Station of Emil was founded in ")
    assert wrong.text != year["answer"] and 1790 <= int(wrong.text.rstrip(".").split()[-1]) <= 1815
    others = {"qcate": "Others", "question": "What is shown in the picture of the Quiet Lighthouse of Clara?",
              "answer": "The Quiet Lighthouse of Clara shows five blue squares.", "keywords": "five blue squares"}
    wrong = E.conflicting_answer(others, [], rng)
    assert wrong.how == "changed number" and "five" not in wrong.text and wrong.text.endswith(" blue squares.")
    founder = {"qcate": "text", "question": "Who founded the Golden Castle of Marco, and in which city is it?",
               "answer": "The Golden Castle of Marco was founded by Hiro Ravison and is located in Malmo.", "keywords": ""}
    pool = ["The Royal Pier of Elena was founded by Bruno Borisson and is located in Quebec."]
    wrong = E.conflicting_answer(founder, pool, rng)
    assert wrong == E.WrongAnswer("The Golden Castle of Marco was founded by Bruno Borisson and is located in Quebec.",
                                  "changed name")  # the subject (named in the question) stays


def test_fallback_wrong_answers_are_marked_and_counted(monkeypatch):
    from mmrag_lite.config import get_preset

    plain = _row("q4", "text", "it is made of wood", "", ["g6"])  # no number, name, colour or option to change
    wrong = E.conflicting_answer(plain, ["Paris is the capital"], random.Random(0))
    assert wrong == E.WrongAnswer("Paris is the capital", E.FALLBACK_WRONG)
    attacked = E.attack_rows([*ROWS, plain], "conflicting", seed=0)
    # q3's name (Paris) has no other name to swap with among these answers: a fallback too, and counted as one
    assert [r["adversarial_answer_how"] for r in attacked] == ["other colour", "flipped yes/no", E.FALLBACK_WRONG, E.FALLBACK_WRONG]
    assert E.fallback_share(attacked) == pytest.approx(2 / 4)
    monkeypatch.setattr(E, "run_pipeline", lambda rows, preset, *, system, bank, progress: [
        _res(r["guid"], r["gold_ids"], r["answer"]) for r in rows])
    table = E.robustness_check([*ROWS, plain], get_preset("cpu-tiny"), bank=None, progress=False)
    conflicting = next(r for r in table if r["distractor"] == "conflicting")
    assert conflicting["wrong answer: fallback"] == pytest.approx(2 / 4)


def test_trap_rates_measure_what_they_say():
    attacked = E.attack_rows(ROWS, "conflicting", seed=0)
    adv = {r["guid"]: next(c["id"] for c in r["candidates"] if c["id"].startswith("adv-")) for r in attacked}
    wrong = {r["guid"]: r["adversarial_answer"] for r in attacked}
    results = [
        _res("q1", [adv["q1"]], wrong["q1"], kept=[adv["q1"], "g1"]),  # kept, cited, echoed
        _res("q2", ["g2"], "yes", kept=[adv["q2"]]),  # kept only
        _res("q3", ["g4"], "Paris", kept=["g4"]),  # resisted
    ]
    rates = E.trap_rates(results, attacked)
    assert E.trap_rates([*results, _res("not-attacked", [], "")], attacked) == rates  # counts nowhere
    assert rates["trap kept (top-k)"] == pytest.approx(2 / 3)
    assert rates["trap cited"] == pytest.approx(1 / 3)
    assert rates["wrong answer echoed"] == pytest.approx(1 / 3)


def test_stage2_ablation_variants_change_one_thing_each():
    from mmrag_lite.config import get_preset

    preset = get_preset("cpu-tiny")
    variants = E.stage2_ablation_variants(preset)
    assert list(variants) == ["no ranking reward", "no answer reward", "reasoning on"]  # cpu-tiny trains without
    base = preset.to_dict()
    for overrides in variants.values():
        changed = preset.with_overrides(**overrides).to_dict()
        diff = [(sec, k) for sec in base for k in (base[sec] if isinstance(base[sec], dict) else {})
                if base[sec][k] != changed[sec][k]]
        assert len(diff) == 1 and diff[0][0] == "stage2"
    assert list(E.stage2_ablation_variants(get_preset("colab-t4")))[-1] == "reasoning off"
    no_rank = get_preset("cpu-tiny", **{"stage2.weights.ranking": 0.0})
    assert "no ranking reward" not in E.stage2_ablation_variants(no_rank)  # nothing to drop


def test_retrain_ablations_command_turns_them_on_through_the_cli(tmp_path):
    from mmrag_lite.cli import build_parser, resolve

    run = tmp_path / "my drive" / "runs" / "colab-t4"  # MMRAG_HOME on Drive: not runs/<preset> of the shell's folder
    argv = shlex.split(E.retrain_ablations_command("colab-t4", run))[3:]  # drop "python -m mmrag_lite"
    args = build_parser().parse_args(argv)
    assert args.work_dir == str(run)
    preset, _ = resolve(args)
    assert args.command == "evaluate" and preset.name == "colab-t4" and preset.evaluation.retrain_ablations
    # a run with its own overrides and name: the command carries them (it used to name only "--preset t4-k6",
    # which the CLI refuses, and with "stage1.k=6" alone it retrained under the preset's k=5)
    from mmrag_lite.config import get_preset

    mine = get_preset("colab-t4", name="1e-3", **{"stage1.k": 6, "stage2.weights": {"format": 1.0, "answer": 2.0},
                                                  "stage1.grpo.learning_rate": 2e-5, "description": "0:30 run #2: 1:30",
                                                  "lora.target_modules": ["q_proj", "v_proj"]})
    args = build_parser().parse_args(shlex.split(E.retrain_ablations_command(mine, run))[3:])
    preset, _ = resolve(args)
    assert preset == mine.with_overrides(**{"evaluation.retrain_ablations": True})


def test_gpu_presets_list_the_retrained_variants_without_training(tmp_path):
    from mmrag_lite.config import get_preset

    preset = get_preset("colab-t4")
    assert not preset.evaluation.retrain_ablations
    rows = E.retrained_stage2_ablation(preset, tmp_path, ROWS, None, baseline=PLANTED)
    assert rows[0]["stage 2 variant"] == "as the preset (main run)"
    assert rows[0]["Retr-F1"] == pytest.approx((1 + 0 + 2 / 3) / 3) and rows[0]["train reward first → last"] == E.NOT_RUN
    assert [r["stage 2 variant"] for r in rows[1:]] == list(E.stage2_ablation_variants(preset))
    assert all(r["status"].startswith("not run") and "retrain_ablations=true" in r["command"] for r in rows[1:])
    assert all(f"--work-dir {tmp_path}" in r["command"] for r in rows[1:])
    assert not (tmp_path / "ablations").exists()  # nothing was trained


def test_retraining_without_a_train_split_is_a_clear_error(tmp_path):
    from mmrag_lite.config import get_preset

    with pytest.raises(ValueError, match="train split"):
        E.retrained_stage2_ablation(get_preset("cpu-tiny"), tmp_path, ROWS, None)
    assert not (tmp_path / "ablations").exists()


def test_retraining_first_frees_the_models_the_caller_holds(tmp_path, monkeypatch):
    """Notebook 05 kept its bank's base model and the BART scorer on the GPU while stage 2 trained three more times:
    on a100 that is 35 GiB of training plus ~5 GiB more, over a 40 GB card. They are unloaded before the first run."""
    from mmrag_lite import modeling, training
    from mmrag_lite.config import get_preset

    events = []

    class Resident:
        def __init__(self, name):
            self.name = name

        def unload(self):
            events.append(f"unload {self.name}")

    class Stop(Exception):
        pass

    def train_stage2(*args, **kwargs):
        events.append("train")
        raise Stop

    monkeypatch.setattr(modeling, "load_processor", lambda preset: object())
    monkeypatch.setattr(training, "stage2_dataset_for_run", lambda *a, **k: ([], None))
    monkeypatch.setattr(training, "train_stage2", train_stage2)
    with pytest.raises(Stop):
        E.retrained_stage2_ablation(get_preset("cpu-tiny"), tmp_path, ROWS, [], resident=[Resident("bank"), Resident("bart")])
    assert events == ["unload bank", "unload bart", "train"]


def test_plot_results_labels_groups_by_the_given_column():
    import matplotlib

    matplotlib.use("Agg")
    from mmrag_lite import viz

    rows = [{"variant": "a", "Retr-F1": 0.5, "QA-Acc": E.NOT_RUN}, {"variant": "b", "Retr-F1": 1.0, "QA-Acc": 0.25}]
    fig = viz.plot_results(rows, ("Retr-F1", "QA-Acc"), label="variant")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert sorted(round(p.get_height(), 2) for p in ax.patches) == [0.25, 0.5, 1.0]  # the dash cell is skipped
    assert ax.get_ylim() == (0, 1.05)
    mmqa = viz.plot_results([{"system": "a", "Retr-F1": 0.4, "MMQA F1": 42.5}], ("Retr-F1", "MMQA F1"))
    assert mmqa.axes[0].get_ylim()[1] >= 42.5  # MMQA EM/F1 are on a 0-100 scale: the bar is not cut off
    after_nan = viz.plot_results([{"system": "a", "MMQA EM": math.nan, "MMQA F1": 42.5}], ("MMQA EM", "MMQA F1"))
    assert after_nan.axes[0].get_ylim()[1] >= 42.5  # a NaN first value neither hides the scale nor draws a bar


def test_plots_refuse_empty_input_before_opening_a_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmrag_lite import training, viz

    plt.close("all")
    with pytest.raises(ValueError, match="filter_report"):
        viz.plot_k_tradeoff([])
    with pytest.raises(ValueError, match="rows \\[1\\] do not"):
        viz.plot_ablation([{"k": 1, "Retr-F1": 0.5}, {"Retr-F1": 0.4}], "k", ("Retr-F1",))
    assert plt.get_fignums() == []  # no half-drawn figure left open by a refused call
    report = [{"k": k, "recall": k / 3, "all_gold": k / 4, "saved_fraction": 1 - k / 3} for k in (1, 2, 3)]
    tradeoff = viz.plot_k_tradeoff(report, chosen_k=2)
    legend = [t.get_text() for t in tradeoff.axes[0].get_legend().get_texts()]
    assert legend == ["recall@k (trained)", "all gold kept", "preset k = 2", "prompt tokens saved"]  # the bars too
    plt.close(tradeoff)
    fig = training.plot_reward_curves({"reward": [], "format": [(1, 0.5), (2, 0.75)]})  # nothing logged yet: no panel
    assert [ax.get_title() for ax in fig.axes] == ["format"]
    plt.close(fig)



def test_reward_curves_read_a_stage_folder_as_its_log_history(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from mmrag_lite import viz

    stage = tmp_path / "stage1"
    stage.mkdir()
    history = [{"step": 1, "reward": 0.5, "rewards/format/mean": 0.25}, {"step": 2, "reward": 0.75}]
    (stage / "log_history.json").write_text(json.dumps(history), encoding="utf-8")
    assert viz.reward_curves_from_history(stage) == viz.reward_curves_from_history(stage / "log_history.json")
    assert viz.reward_curves_from_history(stage)["reward"] == [(1, 0.5), (2, 0.75)]


def _no_constant(name):
    raise ValueError(f"not JSON: {name}")


def test_results_json_is_strict_json(tmp_path):
    report = E.EvalReport(preset="cpu-tiny", robustness=[{"distractor": "lexical", "wrong answer echoed": float("nan")}])
    out = E.write_report(report, tmp_path)
    data = json.loads((out / "results.json").read_text(), parse_constant=_no_constant)  # bare NaN would raise
    assert data["robustness"][0]["wrong answer echoed"] is None
    assert "| lexical | — |" in (out / "results.md").read_text()


def test_build_report_is_what_evaluate_writes(tmp_path, monkeypatch):
    """Notebook 05 saves through ``build_report``; ``evaluate`` (the CLI) must write the very same files."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.pipeline import ModelBank

    preset = get_preset("cpu-tiny")
    preds = {"perfect": PERFECT, "planted": PLANTED}
    monkeypatch.setattr(E, "load_eval_split", lambda *a, **k: [dict(r) for r in ROWS])
    monkeypatch.setattr(E, "run_systems", lambda rows, *a, **k: preds)
    monkeypatch.setattr(E.data, "mini_webqa_source", lambda work_dir: "synthetic world")
    bank = ModelBank(preset, tmp_path / "cli", verbose=False)
    bank.notes.append("no stage2 adapter in somewhere: using the base model instead")
    cli = E.evaluate(preset, tmp_path / "cli", mmqa=False, ablations=False, robustness=False, fluency_scorer=None,
                     bank=bank, progress=False)
    clock = E.Stopwatch()
    with clock("systems"):
        pass
    nb = E.build_report(preset, ROWS, preds, table=None, per_category=None, notes=bank.notes, timings=clock.done(),
                        data_source="synthetic world")
    E.write_report(nb, tmp_path / "nb")
    a = json.loads((tmp_path / "cli" / "eval" / "results.json").read_text(), parse_constant=_no_constant)
    b = json.loads((tmp_path / "nb" / "eval" / "results.json").read_text(), parse_constant=_no_constant)
    assert set(a["timings_s"]) >= {"systems", "total"} and set(b["timings_s"]) == {"systems", "total"}
    a.pop("timings_s"), b.pop("timings_s")
    assert a == b and cli.table == nb.table
    assert set(a["slots"]) == {"perfect", "planted"} and a["table"][0]["n"] == "3 WebQA" and any("cpu-tiny" in n for n in a["notes"])
    assert a["data_source"] == "synthetic world" and any("say nothing about WebQA" in n for n in a["notes"])
    assert any(n.startswith("QA-Acc reference: the keyword answer (Keywords_A) for 2 of 3") for n in a["notes"])
    assert (tmp_path / "cli" / "eval" / "results.md").read_text().startswith(
        "## Results (cpu-tiny, Mini-WebQA from the synthetic world)")
    assert sorted(p.name for p in (tmp_path / "cli" / "eval").iterdir()) == sorted(p.name for p in (tmp_path / "nb" / "eval").iterdir())
    assert not any(n.startswith("test split") for n in a["notes"])  # the synthetic world's caveat says enough
    real = E.build_report(preset, ROWS, preds, data_source="WebQA files").notes
    assert any("neither WebQA's val nor its test split" in n for n in real)
    on_val = E.build_report(preset.with_overrides(**{"data.test_split": "webqa_val"}), ROWS, preds,
                            data_source="WebQA files").notes
    assert any("WebQA's own val questions" in n for n in on_val) and not any("neither" in n for n in on_val)
    with_mmqa = E.build_report(preset, ROWS, preds, mmqa_note="MMQA: none here")
    assert "MMQA: none here" in with_mmqa.notes and any("x100" in n for n in with_mmqa.notes)
    table, cats = E.systems_table(preds, ROWS)
    assert E.build_report(preset, ROWS, preds, table=table, per_category=cats).table == nb.table  # precomputed table
    with pytest.raises(ValueError, match="both"):
        E.build_report(preset, ROWS, preds, table=table)


def test_write_report_is_json_and_markdown(tmp_path):
    report = E.EvalReport(preset="cpu-tiny", predictions={"planted": PLANTED})
    report.table, _ = E.systems_table({"planted": PLANTED}, ROWS)
    report.slots = {"planted": [{"slot": "D1", "gold here": 1.0, "cited": 0.5}]}
    out = E.write_report(report, tmp_path)
    data = json.loads((out / "results.json").read_text())
    assert data["table"][0]["system"] == "planted" and data["slots"] == report.slots
    assert "| D1 | 1.000 | 0.500 |" in (out / "results.md").read_text()
    sub = json.loads((out / "submission_planted.json").read_text())
    assert sub["q1"] == {"sources": ["g1"], "answer": "red"}
    from mmrag_lite.pipeline import load_results

    assert load_results(out / "predictions_planted.json") == PLANTED  # the full predictions read back unchanged
    assert (out / "results.md").read_text().startswith("## Results (cpu-tiny)")
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_well_formed_rate_is_the_format_rewards_test():
    from dataclasses import replace

    from mmrag_lite import rewards
    from mmrag_lite.parsing import parse_stage2

    text = "<sources>D1, D7, D1</sources><answer>red</answer>"  # an unknown id and a repeat: format reward 0
    assert rewards.format_reward([text], stage=2, reasoning=False, candidate_ids=[["D1", "D2"]]) == [0.0]
    problems = tuple(str(p) for p in parse_stage2(text, ["D1", "D2"], reasoning=False).problems)
    fitted_only = replace(PLANTED[0], problems=("prompt shrunk: dropped 2 candidates, never truncated",))
    assert E.well_formed_rate([replace(PLANTED[0], problems=problems)]) == 0.0
    assert E.well_formed_rate([fitted_only, replace(PLANTED[1], problems=problems)]) == 0.5  # fitting notes are not format


def test_k_ablation_rows_on_planted_results():
    from mmrag_lite.config import get_preset

    kept = [_res("q1", ["g1"], "red", kept=["g1", "d1"]),  # gold 1/1 kept
            _res("q2", ["d1"], "no", kept=["g2", "d1"]),  # gold 1/2 kept
            _res("q3", ["g4"], "Paris is the capital", kept=["d1", "d2"])]  # gold 0/2 kept
    rows = E.k_ablation(ROWS, get_preset("cpu-tiny"), None, [2], reuse={2: kept})
    assert rows[0]["k"] == 2 and rows[0]["shown (mean)"] == 2.0
    assert rows[0]["gold recall of kept"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert rows[0]["Retr-F1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert rows[0]["well-formed"] == 1.0  # no parser problem recorded


def test_k_ablation_reports_the_well_formed_rate():
    """Zeros at small k must be readable: a completion citing a slot that was not shown is malformed, not just wrong."""
    from dataclasses import replace

    from mmrag_lite.config import get_preset

    bad = ("unknown_id: D4",)
    kept = [replace(_res("q1", [], "", kept=["g1"]), problems=bad),
            _res("q2", ["d1"], "no", kept=["d1"]),
            replace(_res("q3", [], "", kept=["g4"]), problems=bad)]
    rows = E.k_ablation(ROWS, get_preset("cpu-tiny"), None, [1], reuse={1: kept})
    assert list(rows[0]) == ["k", "shown (mean)", "gold recall of kept", "Retr-F1", "QA-Acc", "well-formed"]
    assert rows[0]["well-formed"] == pytest.approx(1 / 3)


def test_robustness_check_reports_the_drop_and_the_traps(monkeypatch):
    """A planted pipeline that is perfect on clean pools and falls for every injected document once attacked."""
    from mmrag_lite.config import get_preset

    def gullible_pipeline(rows, preset, *, system, bank, progress):
        out = []
        for r in rows:
            adv = [c["id"] for c in r["candidates"] if c["id"].startswith("adv-")]
            if adv:  # cite the trap and repeat what it says (the lexical trap says no answer: answer "unknown")
                out.append(_res(r["guid"], adv, r["adversarial_answer"] or "unknown", kept=adv))
            else:
                out.append(_res(r["guid"], r["gold_ids"], r["answer"], kept=r["gold_ids"]))
        return out

    monkeypatch.setattr(E, "run_pipeline", gullible_pipeline)
    table = E.robustness_check(ROWS, get_preset("cpu-tiny"), bank=None, progress=False)
    clean, conflicting, lexical = table
    assert [row["distractor"] for row in table] == ["none (clean)", "conflicting", "lexical"]
    assert clean["Retr-F1"] == pytest.approx(1.0) and clean["Δ Retr-F1"] == 0.0
    for attacked in (conflicting, lexical):
        assert attacked["Retr-F1"] == 0.0 and attacked["Δ Retr-F1"] == pytest.approx(-1.0)
        assert attacked["trap kept (top-k)"] == 1.0 and attacked["trap cited"] == 1.0
    assert conflicting["wrong answer echoed"] == 1.0
    assert conflicting["QA-Acc"] < clean["QA-Acc"]
    assert math.isnan(lexical["wrong answer echoed"])  # the lexical trap states no answer: nothing to echo


def test_robustness_check_reuses_given_clean_results(monkeypatch):
    from mmrag_lite.config import get_preset

    calls = []

    def counting_pipeline(rows, preset, *, system, bank, progress):
        calls.append([r["guid"] for r in rows])
        return [_res(r["guid"], r["gold_ids"], r["answer"]) for r in rows]

    monkeypatch.setattr(E, "run_pipeline", counting_pipeline)
    table = E.robustness_check(ROWS, get_preset("cpu-tiny"), bank=None, kinds=("lexical",), clean=PLANTED, progress=False)
    assert len(calls) == 1  # only the attacked pools ran; the clean results were reused
    assert table[0]["Retr-F1"] == pytest.approx(E.score_webqa(PLANTED, ROWS)["Retr-F1"])


def test_slot_table_separates_reading_from_a_positional_shortcut():
    from dataclasses import replace

    shown = {"q1": ("d1", "g1", "d2"), "q2": ("g2", "d1", "g3"), "q3": ("d2", "d1", "g4")}  # gold in D2 / D1+D3 / D3

    def cites(slots):
        return [replace(_res(g, [], "x", kept=kept), short_sources=tuple(slots[g])) for g, kept in shown.items()]

    reader = E.slot_table(cites({"q1": ["D2"], "q2": ["D1", "D3"], "q3": ["D3"]}), ROWS)
    assert [r["slot"] for r in reader] == ["D1", "D2", "D3"]
    assert [r["gold here"] for r in reader] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert [r["cited"] for r in reader] == [r["gold here"] for r in reader]  # cites where the gold is

    shortcut = E.slot_table(cites({"q1": ["D2"], "q2": ["D2"], "q3": ["D2", "D4"]}), ROWS)
    assert [r["slot"] for r in shortcut] == ["D1", "D2", "D3", "D4"]  # D4 was never shown: a format error
    assert [r["cited"] for r in shortcut] == pytest.approx([0.0, 1.0, 0.0, 1 / 3])
    assert shortcut[3]["gold here"] == 0.0
    assert E.slot_table([], ROWS) == []

    assert E.positional_shortcut_note({"reader": reader}) == ""
    note = E.positional_shortcut_note({"full": shortcut})
    assert "'full' cites D2 in 100% of questions (gold sits there in 33%)" in note
    both = E.positional_shortcut_note({"full": shortcut, "oracle": shortcut, "reader": reader})
    assert "'reader'" not in both and "same slot" in both
    assert "same slot" not in E.positional_shortcut_note({"full": shortcut}, share=1.0)


def test_citations_that_stay_put_while_the_gold_moves_are_a_positional_habit():
    """No slot reaches the 80 % share, yet the same weights cite the same slots from a list whose gold moved."""
    def table(gold, cited):
        return [{"slot": f"D{i + 1}", "gold here": g, "cited": c} for i, (g, c) in enumerate(zip(gold, cited))]

    full = table([0.3, 0.3, 0.3, 0.2], [0.0, 0.5, 0.5, 0.2])
    stuck = table([0.3, 0.1, 0.3, 0.4], [0.0, 0.5, 0.5, 0.2])  # the gold moved by 0.4, the citations not at all
    reader = table([0.3, 0.1, 0.3, 0.4], [0.3, 0.1, 0.3, 0.4])  # the citations moved with it
    assert E.positional_shortcut_note({"full": full, "oracle": stuck}) == ""  # the pair is only tested when named
    note = E.positional_shortcut_note({"full": full, "oracle": stuck}, same_weights=[("full", "oracle")])
    assert "from 'full' to 'oracle' the gold's slot shares moved by 0.40 in all and the citations' by 0.00" in note
    assert E.positional_shortcut_note({"full": full, "oracle": reader}, same_weights=[("full", "oracle")]) == ""
    small = table([0.3, 0.3, 0.3, 0.1], [0.0, 0.5, 0.5, 0.2])  # the gold barely moved: no evidence either way
    assert E.positional_shortcut_note({"full": full, "oracle": small}, same_weights=[("full", "oracle")]) == ""
    assert E.positional_shortcut_note({"full": full}, same_weights=[("full", "gone")]) == ""


def test_same_weight_pairs_pairs_lists_answered_by_the_same_weights():
    from mmrag_lite.pipeline import SystemSpec

    systems = [SystemSpec("zs", "all", "base"), SystemSpec("full", "stage1", "stage2"),
               SystemSpec("oracle", "oracle", "stage2"), SystemSpec("no think", "stage1", "stage2", reasoning=False),
               SystemSpec("k=2", "stage1", "stage2", k=2)]
    assert E.same_weight_pairs(systems) == [("full", "oracle"), ("full", "k=2"), ("oracle", "k=2")]


def test_rows_of_untrained_systems_say_they_ran_the_base_model(tmp_path):
    """``evaluate`` before training must not print base-model numbers under a trained system's name."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.pipeline import ModelBank, standard_systems

    preset = get_preset("cpu-tiny")
    (tmp_path / "stage1" / "adapter").mkdir(parents=True)  # an empty folder (a crashed save) is no adapter
    names = [E.label_missing_adapters(s, ModelBank(preset, tmp_path, verbose=False)).name for s in standard_systems(preset)]
    assert names == ["zero-shot", "zero-shot, base top-k", "stage 1 only (no stage1 adapter: base model)",
                     "stage 1 + stage 2 (no stage1 or stage2 adapter: base model)",
                     "oracle filter (gold in top-k) (no stage1 or stage2 adapter: base model)"]
    for stage in ("stage1", "stage2"):
        (tmp_path / stage / "adapter").mkdir(parents=True, exist_ok=True)
        (tmp_path / stage / "adapter" / "adapter_config.json").write_text("{}")
    bank = ModelBank(preset, tmp_path, verbose=False)
    assert [E.label_missing_adapters(s, bank) for s in standard_systems(preset)] == standard_systems(preset)


def test_evaluate_refuses_a_hub_model_without_its_adapters_before_any_system_runs(tmp_path, monkeypatch):
    """On a GPU preset the zero-shot row alone takes a long while: a missing adapter must stop the run first."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.pipeline import MissingAdapter, ModelBank

    ran = []
    monkeypatch.setattr(E, "load_eval_split", lambda *a, **k: ROWS)
    monkeypatch.setattr(E, "run_systems", lambda *a, **k: ran.append(a) or {})
    t4 = get_preset("colab-t4")
    with pytest.raises(MissingAdapter, match="no stage1 adapter"):
        E.evaluate(t4, tmp_path, bank=ModelBank(t4, tmp_path, verbose=False), mmqa=False, write=False)
    assert ran == []
    assert E.adapters_needed(E.standard_systems(t4)[0]) == []  # zero-shot reads no adapter
    assert E.adapters_needed(E.standard_systems(t4)[3]) == ["stage1", "stage2"]


def test_ablation_variants_never_leave_stage_two_without_a_paid_reward():
    from mmrag_lite.config import get_preset

    assert list(E.stage2_ablation_variants(get_preset("cpu-tiny"))) == ["no ranking reward", "no answer reward",
                                                                      "reasoning on"]
    only_ranking = get_preset("cpu-tiny", **{"stage2.weights": {"format": 0, "ranking": 1, "answer": 0}})
    variants = E.stage2_ablation_variants(only_ranking)
    assert list(variants) == ["reasoning on"]  # zeroing the one paid reward would be an invalid preset
    for overrides in variants.values():
        only_ranking.with_overrides(**overrides)  # every variant is a valid preset


def test_slot_table_k_ablation_and_attacks_measure_what_they_name():
    """Found unguarded by a mutation run: shares over the questions, recall of the *kept* set, traps anywhere."""
    rows = ROWS
    res = [PipelineResult(guid="q1", question="", system="s", scores={}, kept_ids=("g1", "d1"), reasoning="",
                          completion="", sources=(), answer="red", short_sources=("D2",)),
           PipelineResult(guid="q2", question="", system="s", scores={}, kept_ids=("d1", "g2"), reasoning="",
                          completion="", sources=("g2",), answer="yes", short_sources=("D2",))]
    stray = PipelineResult(guid="elsewhere", question="", system="s", scores={}, kept_ids=("x",), reasoning="",
                           completion="", sources=(), answer="", short_sources=("D1",))
    table = E.slot_table(res, rows)
    assert E.slot_table([*res, stray], rows) == table  # a result for another question counts nowhere
    assert table == [{"slot": "D1", "gold here": 0.5, "cited": 0.0}, {"slot": "D2", "gold here": 0.5, "cited": 1.0}]
    from mmrag_lite.config import get_preset

    ablation = E.k_ablation(rows[:2], get_preset("cpu-tiny"), None, [2], reuse={2: res}, progress=False)
    assert ablation[0]["gold recall of kept"] == pytest.approx((1 + 0.5) / 2)  # kept ids, not cited ones
    many = [_row(f"m{i}", "color", "red", "red", ["g"], distractors=("d1", "d2", "d3", "d4")) for i in range(12)]
    positions = {[c["id"] for c in a["candidates"]].index(next(c["id"] for c in a["candidates"]
                                                               if c["id"].startswith("adv-")))
                 for a in E.attack_rows(many, "lexical")}
    assert len(positions) > 1  # the trap lands anywhere, not always in slot D1


def test_the_wrong_answer_is_echoed_only_as_a_whole_word():
    """'bored' does not state 'red': a substring match would inflate the trap rate."""
    attacked = [dict(E.inject_distractors(ROWS[0], "conflicting", wrong_answer="red"), adversarial_answer="red")]
    assert E.trap_rates([_res("q1", [], "It is bored.")], attacked)["wrong answer echoed"] == 0.0
    assert E.trap_rates([_res("q1", [], "It is red.")], attacked)["wrong answer echoed"] == 1.0


def test_an_echo_is_the_wrong_fact_repeated_not_the_wrong_sentence_verbatim():
    """Only the whole wrong text counted: a sentence trap without its final period, or its changed fact alone, was
    no echo, and "Yes, there is no cloud" echoed the trap "No". An echo now holds every word the wrong answer adds to
    the gold one and none of the gold reference's words that the wrong answer lacks."""
    gold, wrong = "The Painted Station of Emil was founded in 1809.", "The Painted Station of Emil was founded in 1812."
    assert E.echoes_wrong_answer("The Painted Station of Emil was founded in 1812", wrong, gold)
    assert E.echoes_wrong_answer("It was founded in 1812.", wrong, gold)
    assert not E.echoes_wrong_answer("It was founded in 1809.", wrong, gold)
    assert not E.echoes_wrong_answer("Either 1809 or 1812.", wrong, gold)  # names the gold fact too
    assert not E.echoes_wrong_answer("Yes, there is no cloud at all.", "No", "Yes, there is a cloud.", "Yes")
    assert E.echoes_wrong_answer("No, there is none.", "No", "Yes, there is a cloud.", "Yes")
    assert E.echoes_wrong_answer("The car is green.", "green", "The car is red.", "red")
    assert not E.echoes_wrong_answer("It is bored.", "red", "It is blue.")  # whole words only
    # public WebQA has no Keywords_A: a short wrong answer against the gold sentence is judged by its typed word alone
    assert E.echoes_wrong_answer("The car is blue.", "blue", "The car is red.", "")
    assert E.echoes_wrong_answer("No, there is no cloud in the sky.", "No", "Yes, there is a cloud in the sky.", "")
    assert E.echoes_wrong_answer("There are 5 dogs in the picture.", "5", "There are 4 dogs in the picture.", "")
    assert not E.echoes_wrong_answer("The car is red and blue.", "blue", "The car is red.", "")


def test_the_mmqa_count_in_n_is_the_questions_scored():
    """"+ 2 MMQA" was the rows given; a question without a gold answer is not scored, so n says 1."""
    rows = [{"guid": "m1", "answers": ["Paris"]}, {"guid": "m2", "answers": []}]
    preds = {"sys": [_res("m1", [], "Paris"), _res("m2", [], "x")]}
    from mmrag_lite.config import get_preset

    report = E.build_report(get_preset("cpu-tiny"), ROWS[:1], {"sys": [_res("q1", [], "red")]}, mmqa_rows=rows,
                            mmqa_preds=preds)
    assert report.table[0]["n"] == "1 WebQA + 1 MMQA"


def test_qa_acc_reads_the_keyword_where_the_row_has_one():
    """The planted rows' keyword and sentence restrict to the same colour, so dropping Keywords_A on the way to the
    metric went unseen; on an Others row "fountain" is right against the keyword, a sixth against the sentence."""
    row = _row("o1", "Others", "A big fountain stands near the old church.", "fountain", ["g1"])
    assert E.webqa_references([row])["o1"]["keywords"] == "fountain"
    assert E.score_webqa([_res("o1", ["g1"], "fountain")], [row])["QA-Acc"] == pytest.approx(1.0)


def test_stage_1_only_answers_with_the_weights_stage_2_starts_from():
    """On the GPU presets stage 2 starts from the stage-1 adapter, so "stage 1 only" must answer with it: with the base
    model it would be zero-shot under another name, and stage 2's gain would be counted from the wrong start."""
    from mmrag_lite.config import get_preset
    from mmrag_lite.pipeline import standard_systems

    for name, start in (("colab-t4", "stage1"), ("a100", "stage1"), ("cpu-tiny", get_preset("cpu-tiny").stage2.init_from)):
        answerers = [s.answerer for s in standard_systems(get_preset(name))]
        assert answerers == ["base", "base", start, "stage2", "stage2"], name
    assert get_preset("colab-t4").stage2.init_from == "stage1"


# ------------------------------------------------------------------------------------------ review fixes
def _saved_evaluation(tmp_path, preset):
    """An ``eval/`` folder as ``evaluate`` leaves it on a GPU preset: MMQA, robustness, the inference-time ablations and
    the retrained one listed as not run, with one submission and one predictions file per system."""
    from mmrag_lite.pipeline import standard_systems

    full = E._full_system(standard_systems(preset)).name
    preds = {"zero-shot": PERFECT, full: PLANTED}
    mmqa_rows = [{"guid": "m1", "answers": ["Paris"]}]
    report = E.build_report(
        preset, ROWS, preds, mmqa_rows=mmqa_rows, mmqa_preds={n: [_res("m1", [], "Paris")] for n in preds},
        mmqa_note="MMQA: planted", robustness=[{"distractor": "none (clean)", "Retr-F1": 0.5},
                                               {"distractor": "lexical", "Retr-F1": 0.25, "trap kept (top-k)": 0.5}],
        ablations={E.K_ABLATION_TITLE: [{"k": 2, "Retr-F1": 0.5}],
                   E.RETRAINED_ABLATION_TITLE: E.retrained_stage2_ablation(preset, tmp_path, ROWS, None, baseline=PLANTED)})
    E.write_report(report, tmp_path)
    return full


def test_the_retrained_ablations_command_adds_its_table_and_keeps_the_rest_of_the_report(tmp_path, monkeypatch):
    """The printed command was ``evaluate --no-mmqa --no-robustness``: it re-ran every system and rewrote eval/ without
    the MMQA columns and the robustness table. It now retrains only, reads the full system's saved predictions as the
    baseline, and merges its table into results.json / results.md, leaving submissions and predictions alone."""
    from mmrag_lite.cli import build_parser
    from mmrag_lite.config import get_preset

    preset = get_preset("colab-t4")
    full = _saved_evaluation(tmp_path, preset)
    out = tmp_path / "eval"
    before = json.loads((out / "results.json").read_text())
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("submission_", "predictions_"))}
    not_run = before["ablations"][E.RETRAINED_ABLATION_TITLE]
    argv = shlex.split(not_run[1]["command"])[3:]
    args = build_parser().parse_args(argv)
    assert args.retrained_ablations_only and not args.no_mmqa and not args.no_robustness

    seen = {}

    def retrained(p, work_dir, rows, train, *, baseline, scores, progress, live_plot):
        seen.update(preset=p, rows=[r["guid"] for r in rows], baseline=baseline, scores=scores, train=train)
        return [{"stage 2 variant": "as the preset (main run)", "Retr-F1": 0.55}, {"stage 2 variant": "no ranking reward",
                                                                                   "Retr-F1": 0.125}]

    monkeypatch.setattr(E, "retrained_stage2_ablation", retrained)
    monkeypatch.setattr(E, "load_eval_split", lambda p, wd, split, n: [dict(r) for r in ROWS[:n]])
    monkeypatch.setattr(E.data, "ensure_mini_webqa", lambda p, wd: {"train": ["train rows"]})
    monkeypatch.setattr(E, "run_systems", lambda *a, **k: pytest.fail("no system runs again"))
    monkeypatch.setattr(E, "robustness_check", lambda *a, **k: pytest.fail("no robustness check runs again"))
    E.add_retrained_ablations(preset, tmp_path, progress=False)
    assert seen["preset"].evaluation.retrain_ablations and seen["baseline"] == PLANTED and seen["train"] == ["train rows"]
    assert seen["rows"] == ["q1", "q2", "q3"] and seen["scores"] == E.scores_of(PLANTED)
    after = json.loads((out / "results.json").read_text())
    assert after["ablations"][E.RETRAINED_ABLATION_TITLE][1] == {"stage 2 variant": "no ranking reward", "Retr-F1": 0.125}
    for key in ("table", "robustness", "slots", "per_category", "preset", "data_source"):
        assert after[key] == before[key], key  # MMQA columns, robustness and the rest: kept
    assert list(after["ablations"]) == list(before["ablations"])
    assert after["ablations"][E.K_ABLATION_TITLE] == before["ablations"][E.K_ABLATION_TITLE]
    assert all(n in after["notes"] for n in before["notes"]) and "retrained ablations" in after["timings_s"]
    md = (out / "results.md").read_text()
    assert "### Robustness: adversarial distractors" in md and "| lexical |" in md and "| no ranking reward |" in md
    assert "not run: hours" not in md and "MMQA: planted" in md
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("submission_", "predictions_"))} == files
    E.add_retrained_ablations(preset, tmp_path, progress=False)  # again: one note, not two
    assert len(json.loads((out / "results.json").read_text())["notes"]) == len(after["notes"])

    (out / f"predictions_{E.slug(full)}.json").unlink()
    with pytest.raises(FileNotFoundError, match="predictions_stage_1_stage_2.json not found"):
        E.add_retrained_ablations(preset, tmp_path, progress=False)


def test_the_cli_runs_the_retrained_ablations_alone(tmp_path, monkeypatch):
    from mmrag_lite import cli

    calls = []
    monkeypatch.setattr(cli, "run_data", lambda *a, **k: None)
    monkeypatch.setattr(E, "add_retrained_ablations", lambda preset, wd, **k: calls.append((preset.name, wd, k))
                        or E.EvalReport(preset=preset.name, ablations={E.RETRAINED_ABLATION_TITLE: [{"x": 1}]}))
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("the whole evaluation runs again"))
    args = ["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--allow-untrained", "--quiet"]
    assert cli.main([*args, "--retrained-ablations-only"]) == 0
    assert calls == [("cpu-tiny", tmp_path, {"split": "test", "progress": False})]
    assert cli.main([*args, "--retrained-ablations-only", "--no-ablations"]) == 2  # a contradiction, refused


def test_the_echo_of_a_wrong_answer_is_read_against_the_clean_answers(monkeypatch):
    """A model that answers "Yes, they are." whatever it is shown echoes every flipped "Yes" trap, attacked or not:
    the echoed share alone called that the trap's doing. The clean answers are scored against the same wrong answers
    and the table reports both and the difference."""
    from mmrag_lite.config import get_preset

    rows = [dict(_row(f"y{i}", "YesNo", f"No, the stars in the Abbey {i} are yellow, not blue.", "no", [f"g{i}"]),
                 question=f"Are the stars in the Abbey {i} blue?") for i in range(4)]
    monkeypatch.setattr(E, "run_pipeline", lambda rs, preset, *, system, bank, progress: [
        _res(r["guid"], [], "Yes, they are.", kept=[c["id"] for c in r["candidates"]]) for r in rs])
    table = E.robustness_check(rows, get_preset("cpu-tiny"), bank=None, progress=False)
    conflicting = next(r for r in table if r["distractor"] == "conflicting")
    assert conflicting["wrong answer echoed"] == 1.0 and conflicting[E.ECHO_CLEAN] == 1.0
    assert conflicting[E.ECHO_DELTA] == 0.0  # the trap caused none of it
    lexical = next(r for r in table if r["distractor"] == "lexical")
    assert math.isnan(lexical[E.ECHO_CLEAN]) and math.isnan(lexical[E.ECHO_DELTA])  # no wrong answer to echo


def test_a_number_word_echoes_a_numeric_trap_as_qa_acc_reads_it():
    from mmrag_lite.metrics import webqa_accuracy

    assert webqa_accuracy("There are eleven circles.", "11", "number") == pytest.approx(1.0, abs=1e-4)  # 11
    assert E.echoes_wrong_answer("There are eleven circles.", "11", "There are 10 circles.", "10")
    assert E.echoes_wrong_answer("There are eleven circles.", "11", "There are ten circles.", "")
    assert not E.echoes_wrong_answer("There are ten circles.", "11", "There are 10 circles.", "10")
    assert not E.echoes_wrong_answer("Ten or eleven circles.", "11", "There are 10 circles.", "10")  # the gold too


def test_a_reader_that_cites_in_few_questions_is_not_called_positional():
    """Citations were compared with the gold as raw shares of questions: a reader citing exactly the gold's slot, but
    in a fifth of the questions, moved its citations a fifth as far (0.12 against 0.60) and was called positional."""
    def table(gold, cited):
        return [{"slot": f"D{i + 1}", "gold here": g, "cited": c} for i, (g, c) in enumerate(zip(gold, cited))]

    g1, g2 = [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]
    shy = {"full": table(g1, [0.2 * g for g in g1]), "oracle": table(g2, [0.2 * g for g in g2])}
    assert E._slot_moves(shy["full"], shy["oracle"])[:2] == pytest.approx((0.6, 0.12))
    assert E.positional_shortcut_note(shy, same_weights=[("full", "oracle")]) == ""
    # a fifth of the questions cite D2 whatever it holds: still positional
    habit = {"full": table(g1, [0, 0.2, 0, 0]), "oracle": table(g2, [0, 0.2, 0, 0])}
    assert "Citations that stay put" in E.positional_shortcut_note(habit, same_weights=[("full", "oracle")])
    nothing = {"full": table(g1, [0, 0, 0, 0]), "oracle": table(g2, [0, 0, 0, 0])}  # no citation: no evidence
    assert E.positional_shortcut_note(nothing, same_weights=[("full", "oracle")]) == ""
    # runs/course-20261128-120447 (37 questions): the same weights cited identically while the gold moved by 0.24
    n = 37
    full = table([12 / n, 13 / n, 4 / n, 6 / n], [0, 19 / n, 18 / n, 7 / n])
    oracle = table([12 / n, 13 / n, 5 / n, 14 / n], [0, 19 / n, 18 / n, 7 / n])
    note = E.positional_shortcut_note({"stage 1 + stage 2": full, "oracle": oracle},
                                      same_weights=[("stage 1 + stage 2", "oracle")])
    assert "the gold's slot shares moved by 0.24 in all and the citations' by 0.00" in note


def test_a_computed_qa_fl_says_which_bart_it_used_and_what_it_compares_with():
    from types import SimpleNamespace

    from mmrag_lite.config import get_preset

    scorer = SimpleNamespace(model=SimpleNamespace(name_or_path="facebook/bart-large-cnn"))
    table, cats = E.systems_table({"planted": PLANTED}, ROWS)
    notes = E.build_report(get_preset("cpu-tiny"), ROWS, {"planted": PLANTED}, fluency_scorer=scorer, table=table,
                           per_category=cats).notes
    fl = [n for n in notes if n.startswith("QA-FL")]
    assert len(fl) == 1 and "facebook/bart-large-cnn" in fl[0] and "ParaBank" in fl[0]
    assert "trend-comparable, not value-comparable" in fl[0]
    assert not any("unavailable" in n for n in fl)


def test_write_report_removes_the_files_of_systems_it_does_not_hold(tmp_path):
    """A submission of an earlier run's system (the base model under a trained system's name, say) stayed in eval/."""
    first = E.EvalReport(preset="cpu-tiny", predictions={"old system": PLANTED, "kept": PERFECT})
    out = E.write_report(first, tmp_path)
    (out / "submission_notes.txt").write_text("mine")  # not a per-system file: left alone
    assert (out / "submission_old_system.json").is_file()
    E.write_report(E.EvalReport(preset="cpu-tiny", predictions={"kept": PERFECT}), tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["predictions_kept.json", "results.json", "results.md",
                                                     "submission_kept.json", "submission_notes.txt"]


def test_conflicting_traps_are_reported_per_wording(monkeypatch):
    """A trap restating the question shares its words, a statement does not; the single conflicting row mixed both
    (on the course run: kept 55 % vs 94 %). The row now carries the split, and the report shows it as a table."""
    from mmrag_lite.config import get_preset

    year = dict(_row("t1", "text", "The Painted Station of Emil was founded in 1809.", "", ["g7"]),
                question="In which year was the Painted Station of Emil founded?")
    rows = [ROWS[0], ROWS[1], year]  # colour and yes/no: restated; the year: a statement
    attacked = E.attack_rows(rows, "conflicting", seed=0)
    assert [r["adversarial_form"] for r in attacked] == [E.FORM_RESTATED, E.FORM_RESTATED, E.FORM_STATEMENT]
    for r in attacked:  # the form is how conflicting_text wrote the trap
        adv = next(c for c in r["candidates"] if c["id"].startswith("adv-"))
        assert adv["text"].startswith(r["question"].rstrip("?")) == (r["adversarial_form"] == E.FORM_RESTATED)

    def keeps_statements(rs, preset, *, system, bank, progress):  # keeps, cites and repeats statement traps only
        out = []
        for r in rs:
            adv = [c["id"] for c in r["candidates"] if c["id"].startswith("adv-")]
            if adv and r.get("adversarial_form") == E.FORM_STATEMENT:
                out.append(_res(r["guid"], adv, r["adversarial_answer"], kept=adv))
            else:
                out.append(_res(r["guid"], r["gold_ids"], r["answer"], kept=r["gold_ids"]))
        return out

    monkeypatch.setattr(E, "run_pipeline", keeps_statements)
    table = E.robustness_check(rows, get_preset("cpu-tiny"), bank=None, kinds=("conflicting",), progress=False)
    forms = {f["trap form"]: f for f in table[1]["by form"]}
    assert forms[E.FORM_STATEMENT]["n"] == 1 and forms[E.FORM_RESTATED]["n"] == 2
    assert forms[E.FORM_STATEMENT]["trap kept (top-k)"] == 1.0 and forms[E.FORM_RESTATED]["trap kept (top-k)"] == 0.0
    assert forms[E.FORM_STATEMENT]["trap cited"] == 1.0 and forms[E.FORM_STATEMENT]["wrong answer echoed"] == 1.0
    assert forms[E.FORM_RESTATED]["wrong answer echoed"] == 0.0
    assert table[1]["trap kept (top-k)"] == pytest.approx(1 / 3)  # the mixed share, as before
    md = E.robustness_markdown(table)
    assert "by form" not in E.markdown_table(table) and "conflicting traps by wording" in md
    assert f"| {E.FORM_STATEMENT} | 1 | 1.000 | 1.000 | 1.000 |" in md
    report = E.EvalReport(preset="cpu-tiny", robustness=table)
    assert "conflicting traps by wording" in report.markdown()


def test_notebook_05_reads_the_robustness_and_recall_columns_as_they_are():
    """Its text said gold recall of kept "bounds what Retr-F1 can find" (gold [a, b], kept [a, c, d, e], cited [a]:
    recall 0.5, Retr-F1 0.667): it bounds the recall part, a question keeping m of g gold reaching at most 2m/(m+g)."""
    from pathlib import Path

    from mmrag_lite import metrics

    assert E.gold_recall_of_kept([_res("x", ["a"], "", kept=["a", "c", "d", "e"])],
                                 [{"guid": "x", "gold_ids": ["a", "b"]}]) == 0.5
    assert metrics.webqa_retrieval_f1(["a"], ["a", "b"]) == pytest.approx(2 * 1 / (1 + 2))
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "05_evaluate.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "It bounds what Retr-F1 can find" not in text and "2m/(m+g)" in text
    assert E.ECHO_DELTA in text and E.ECHO_CLEAN in text and E.FORM_STATEMENT in text and E.FORM_RESTATED in text
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "evaluation.robustness_markdown(robust)" in code


# ------------------------------------------------------------------------------------------ mutation audit (pure parts)
def test_cells_show_a_missing_value_as_a_dash_and_an_empty_table_as_such():
    assert E.fmt(None) == E.NOT_RUN and E.fmt(float("nan")) == E.NOT_RUN and E.fmt(0.5) == "0.500" and E.fmt(True) == "True"
    assert E.markdown_table([]) == "(no rows)\n"
    assert E.markdown_table([{"a": None, "b": 0.25}], ["a", "b", "c"]).splitlines()[2] == "| — | 0.250 | — |"


class _HalfFluency:
    """A planted BARTScore: s(r → c) = 0 when c is the reference itself, log 0.5 otherwise, so FL_i = 1 for the exact
    reference and 0.5 for anything else (``metrics.webqa_fluency_batch``: min(1, exp(s(r → c) − s(r → r))))."""

    def score(self, srcs, tgts):
        return [0.0 if s == t else math.log(0.5) for s, t in zip(srcs, tgts)]


def test_a_fluency_scorer_fills_qa_fl_and_qa_as_the_mean_of_per_question_products():
    # PLANTED: q1 "red" (FL 0.5, Acc 1), q2 "no" (FL 0.5, Acc 0), q3 the exact reference (FL 1, Acc 1)
    table, cats = E.systems_table({"planted": PLANTED}, ROWS, fluency_scorer=_HalfFluency())
    row = table[0]
    assert row["QA-FL"] == pytest.approx(2 / 3)
    assert row["QA"] == pytest.approx((0.5 * 1 + 0.5 * 0 + 1 * 1) / 3, abs=1e-4)  # 0.5, not mean FL × mean Acc (4/9)
    by = {c["qcate"]: c for c in cats["planted"]}
    assert (by["color"]["QA-FL"], by["YesNo"]["QA-FL"], by["text"]["QA-FL"]) == pytest.approx((0.5, 0.5, 1.0))
    assert by["YesNo"]["QA"] == 0.0 and by["color"]["QA"] == pytest.approx(0.5, abs=1e-4)
    assert by["text"]["QA"] == pytest.approx(1.0, abs=1e-4)
    assert [by[c]["n"] for c in ("color", "YesNo", "image", "text", "All")] == [1, 1, 2, 1, 3]
    assert E.score_webqa(PLANTED, ROWS, fluency_scorer=_HalfFluency())["QA"] == pytest.approx(0.5, abs=1e-4)


def test_a_metric_that_is_nan_is_no_number_in_the_table():
    from types import SimpleNamespace

    nan = float("nan")
    report = SimpleNamespace(overall={"n": 2, "retrieval_f1": 0.5, "acc": nan, "fl": nan, "qa": nan},
                             rows=[{"group": "All", "n": 2, "retrieval_f1": 0.5, "acc": nan, "fl": nan, "qa": nan}])
    out = E.flatten_webqa_report(report)
    assert out["Retr-F1"] == 0.5 and out["QA-Acc"] is None and out["QA-FL"] == E.UNAVAILABLE and out["QA"] == E.UNAVAILABLE
    assert out["per_category"] == [{"qcate": "All", "n": 2, "Retr-F1": 0.5, "QA-Acc": None, "QA-FL": E.UNAVAILABLE,
                                     "QA": E.UNAVAILABLE}]


def test_mmqa_columns_are_each_systems_own_em_and_f1():
    # raw MMQA answers are dicts; "in 1976" is no exact match, F1 2·0.5·1/1.5 → 0.67 (DROP rounds to 2 places)
    rows = [{"guid": "m1", "answers": [{"answer": "horses", "type": "string"}], "qtype": "ImageQ"},
            {"guid": "m2", "answers": ["1976"]}]
    assert E.mmqa_references(rows) == {"m1": {"answers": ["horses"], "type": "ImageQ"},
                                       "m2": {"answers": ["1976"], "type": "unknown"}}
    mmqa = {"with mmqa": [_res("m1", [], "horses"), _res("m2", [], "in 1976")]}
    table, _ = E.systems_table({"with mmqa": PLANTED, "without": PERFECT}, ROWS, mmqa_preds=mmqa, mmqa_rows=rows)
    assert table[0]["MMQA EM"] == pytest.approx(50.0) and table[0]["MMQA F1"] == pytest.approx(83.5)
    assert table[0]["n_mmqa"] == 2
    assert table[1]["MMQA EM"] == table[1]["MMQA F1"] == E.NOT_RUN and "n_mmqa" not in table[1]


def test_a_row_without_a_category_is_scored_as_text():
    row = {k: v for k, v in _row("t1", "", "Paris is the capital", "", ["g1"]).items() if k != "qcate"}
    assert E.webqa_references([row])["t1"]["qcate"] == "text"
    cats = {c["qcate"] for c in E.score_webqa([_res("t1", ["g1"], "Paris")], [row])["per_category"]}
    assert cats == {"text", "All"}


def _slots(gold, cited):
    return [{"slot": f"D{i + 1}", "gold here": g, "cited": c} for i, (g, c) in enumerate(zip(gold, cited))]


def test_positional_checks_at_their_thresholds():
    # one slot cited in exactly SHORTCUT_SHARE (0.8) of questions is a habit
    assert "cites D1 in 80% of questions" in E.positional_shortcut_note({"s": _slots([0.2, 0.8], [0.8, 0.2])})
    # two habits on different slots: no "same slot" sentence, the single-system one
    two = E.positional_shortcut_note({"a": _slots([0.5, 0.5], [0.9, 0.0]), "b": _slots([0.5, 0.5], [0.0, 0.9])})
    assert "same slot" not in two and "Its Retr-F1 tracks" in two and "'a' cites D1" in two and "'b' cites D2" in two
    pair = [("a", "b")]
    # the gold's distribution moves by exactly GOLD_MOVE (0.2), the citations not at all: stuck
    at_gold_move = {"a": _slots([0.3, 0.7], [0.5, 0.0]), "b": _slots([0.4, 0.6], [0.5, 0.0])}
    assert E._slot_moves(at_gold_move["a"], at_gold_move["b"])[2] == E.GOLD_MOVE
    assert "Citations that stay put" in E.positional_shortcut_note(at_gold_move, same_weights=pair)
    # the citations move by exactly STUCK_RATIO of the gold's move (0.125 of 0.5): not stuck; a little less: stuck
    gold_a, gold_b = [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.25, 0.25]
    at_ratio = {"a": _slots(gold_a, [0.5, 0.5, 0, 0]), "b": _slots(gold_b, [0.5625, 0.4375, 0, 0])}
    assert E._slot_moves(at_ratio["a"], at_ratio["b"])[2:] == (0.5, 0.125)
    assert E.positional_shortcut_note(at_ratio, same_weights=pair) == ""
    below = {"a": _slots(gold_a, [0.5, 0.5, 0, 0]), "b": _slots(gold_b, [0.5, 0.5, 0, 0])}
    assert "Citations that stay put" in E.positional_shortcut_note(below, same_weights=pair)
    # one system cites nothing: its citations have no distribution, so no evidence either way (and no division by 0)
    silent = {"a": _slots(gold_a, [0, 0, 0, 0]), "b": _slots(gold_b, [0.5, 0, 0, 0])}
    assert math.isnan(E._slot_moves(silent["a"], silent["b"])[3])
    assert E.positional_shortcut_note(silent, same_weights=pair) == ""


def test_robustness_attacks_with_its_seed_and_reports_both_drops(monkeypatch):
    """Clean = PLANTED (Retr-F1 5/9, QA-Acc 2/3); attacked, the pipeline cites the gold and repeats the trap's wrong
    answer: Retr-F1 1, every wrong answer echoed; of the clean answers only q2's "no" says the trap's "No"."""
    from mmrag_lite.config import get_preset

    seen = {}

    def repeats_the_trap(rows, preset, *, system, bank, progress):
        kind = "conflicting" if any(c["id"].startswith("adv-conflicting") for c in rows[0]["candidates"]) else "lexical"
        seen[kind] = rows
        return [_res(r["guid"], r["gold_ids"], r["adversarial_answer"] or "unknown", kept=r["gold_ids"]) for r in rows]

    monkeypatch.setattr(E, "run_pipeline", repeats_the_trap)
    assert E.attack_rows(ROWS, "conflicting", seed=5) != E.attack_rows(ROWS, "conflicting", seed=0)
    table = E.robustness_check(ROWS, get_preset("cpu-tiny"), bank=None, clean=PLANTED, seed=5, progress=False)
    clean, conflicting, lexical = table
    for kind in ("conflicting", "lexical"):
        assert seen[kind] == E.attack_rows(ROWS, kind, seed=5)  # the seed it was given
    assert clean["Δ Retr-F1"] == 0.0 and clean["Δ QA-Acc"] == 0.0 and clean["QA-Acc"] == pytest.approx(2 / 3, abs=1e-4)
    assert conflicting["Δ Retr-F1"] == pytest.approx(1 - 5 / 9)
    # q3's fallback trap is q2's answer, "Yes, it is.": its "is" is one of the 3 lemmas of "Paris is the capital"
    assert conflicting["QA-Acc"] == pytest.approx((0 + 0 + 1 / 3) / 3, abs=1e-4)
    assert conflicting["Δ QA-Acc"] == pytest.approx(1 / 9 - 2 / 3, abs=1e-4)
    assert conflicting["wrong answer echoed"] == 1.0 and conflicting[E.ECHO_CLEAN] == pytest.approx(1 / 3)
    assert conflicting[E.ECHO_DELTA] == pytest.approx(2 / 3)
    assert "wrong answer: fallback" not in lexical and "by form" not in lexical  # conflicting traps only


def test_attack_rows_draws_each_wrong_answer_and_position_from_its_seed():
    rng = random.Random(5)
    answers = [r["answer"] for r in ROWS]
    attacked = E.attack_rows(ROWS, "conflicting", seed=5)
    assert [r["adversarial_answer"] for r in attacked] == [E.conflicting_answer(r, answers, rng).text for r in ROWS]
    for row, a in zip(ROWS, attacked):
        wrong = E.WrongAnswer(a["adversarial_answer"], a["adversarial_answer_how"])
        assert a["candidates"] == E.inject_distractors(row, "conflicting", wrong_answer=wrong, seed=5)["candidates"]
    lexical = E.attack_rows(ROWS, "lexical", seed=5)
    assert [(r["adversarial_answer"], r["adversarial_answer_how"], r["adversarial_form"]) for r in lexical] == [("", "", "")] * 3
    assert E.trap_forms_table([], [], lexical) == []  # no conflicting trap: no wording to report
    # the name swap draws on the other questions' answers, all of them
    founder = dict(_row("f1", "text", "The Golden Castle of Marco was founded by Hiro Ravison and is located in Malmo.", "",
                        ["g1"]), question="Who founded the Golden Castle of Marco, and in which city is it?")
    pier = _row("f2", "text", "The Royal Pier of Elena was founded by Bruno Borisson and is located in Quebec.", "", ["g2"])
    assert E.attack_rows([founder, ROWS[0], pier], "conflicting")[0]["adversarial_answer"] == \
        "The Golden Castle of Marco was founded by Bruno Borisson and is located in Quebec."


def test_injected_traps_copy_the_gold_they_imitate_and_are_named_by_question():
    question = "What is on the roof of the Hall?"
    row = {"guid": "r1", "question": question, "answer": "A flag.", "gold_ids": ["g1", "g2"], "candidates": [
        {"id": "d1", "modality": "text", "title": "noise", "text": "noise", "image": None, "is_gold": False},
        {"id": "g1", "modality": "image", "title": "The Hall", "text": "", "image": "pixels of g1", "is_gold": True},
        {"id": "g2", "modality": "image", "title": "The Hall roof", "text": "", "image": "pixels of g2", "is_gold": True}]}
    out = E.inject_distractors(row, "conflicting", wrong_answer="A bell.", seed=0, n=2)
    adv = sorted((c for c in out["candidates"] if c["id"].startswith("adv-")), key=lambda c: c["id"])
    text = f"{question.rstrip('?')}? The answer is A bell."
    assert adv == [{"id": "adv-conflicting-r1-0", "modality": "image", "title": "The Hall", "text": text,
                    "image": "pixels of g1", "is_gold": False},
                   {"id": "adv-conflicting-r1-1", "modality": "image", "title": "The Hall roof", "text": text,
                    "image": "pixels of g2", "is_gold": False}]
    assert len(out["candidates"]) == 5 and out["gold_ids"] == ["g1", "g2"]
    lexical_row = dict(row, candidates=[row["candidates"][1], dict(row["candidates"][0], modality="image", image="pixels of d1")])
    trap = next(c for c in E.inject_distractors(lexical_row, "lexical", seed=0)["candidates"] if c["id"].startswith("adv-"))
    q = question.rstrip("?")
    assert trap == {"id": "adv-lexical-r1-0", "modality": "image", "title": q, "text": f"{q} {q.lower()}",
                    "image": "pixels of d1", "is_gold": False}  # shaped like a distractor, never like the gold


def test_a_trap_can_land_in_the_last_slot():
    many = [_row(f"m{i}", "color", "red", "red", ["g"], distractors=("d1", "d2", "d3", "d4")) for i in range(12)]
    last = [[c["id"] for c in a["candidates"]][-1].startswith("adv-") for a in E.attack_rows(many, "lexical")]
    assert any(last)


def test_trap_rates_find_a_trap_anywhere_and_echoes_over_the_rows_with_a_wrong_answer():
    attacked = E.attack_rows(ROWS[:2], "conflicting", seed=0)
    adv = {r["guid"]: next(c["id"] for c in r["candidates"] if c["id"].startswith("adv-")) for r in attacked}
    results = [_res("q1", ["g1", adv["q1"]], attacked[0]["adversarial_answer"], kept=["g1", adv["q1"]]),
               _res("q2", ["g2"], "yes", kept=["g2", "g3"])]
    rates = E.trap_rates(results, attacked)
    assert rates == {"trap kept (top-k)": 0.5, "trap cited": 0.5, "wrong answer echoed": 0.5}
    no_wrong = [attacked[0], dict(attacked[1], adversarial_answer="")]  # q2 states no wrong answer: no echo to count
    assert E.trap_rates(results, no_wrong)["wrong answer echoed"] == 1.0


def test_trap_forms_are_listed_statement_first():
    year = dict(_row("t1", "text", "The Painted Station of Emil was founded in 1809.", "", ["g7"]),
                question="In which year was the Painted Station of Emil founded?")
    attacked = E.attack_rows([ROWS[0], year], "conflicting", seed=0)
    forms = E.trap_forms_table([], [], attacked)
    assert [(f["trap form"], f["n"]) for f in forms] == [(E.FORM_STATEMENT, 1), (E.FORM_RESTATED, 1)]
    assert E.trap_form(E.WrongAnswer("Tower of London", "other option")) == E.FORM_RESTATED  # a bare option, no sentence


def test_build_report_notes_a_positional_habit_once_each_and_shows_the_main_columns_in_order():
    from dataclasses import replace

    from mmrag_lite.config import get_preset

    d1 = [replace(r, short_sources=("D1",)) for r in PLANTED]  # every question cites D1
    report = E.build_report(get_preset("cpu-tiny"), ROWS, {"d1": d1}, notes=["mine", "mine"])
    assert any(n.startswith("Positional habit: 'd1' cites D1 in 100%") for n in report.notes)
    assert report.notes.count("mine") == 1
    assert "| " + " | ".join(E.MAIN_COLUMNS) + " |" in report.markdown()


def test_mmqa_questions_default_to_the_webqa_count_capped_by_the_preset():
    from mmrag_lite.config import get_preset

    capped = get_preset("cpu-tiny", **{"evaluation.mmqa_questions": 5})
    assert E.default_mmqa_questions(capped, 3) == 3 and E.default_mmqa_questions(capped, 10) == 5
    assert E.default_mmqa_questions(get_preset("cpu-tiny", **{"evaluation.mmqa_questions": 0}), 10) == 10


def test_same_weights_on_the_same_list_are_no_pair():
    from mmrag_lite.pipeline import SystemSpec

    twins = [SystemSpec("full", "stage1", "stage2"), SystemSpec("full again", "stage1", "stage2")]
    assert E.same_weight_pairs(twins) == []


def test_k_ablation_shows_the_mean_number_of_candidates_kept():
    from mmrag_lite.config import get_preset

    kept = [_res("q1", [], "", kept=["g1"]), _res("q2", [], "", kept=["g2", "d1"]), _res("q3", [], "", kept=["g4", "d1", "d2"])]
    assert E.k_ablation(ROWS, get_preset("cpu-tiny"), None, [3], reuse={3: kept})[0]["shown (mean)"] == 2.0


def test_filter_verdict_says_when_the_trained_judge_kept_as_much_gold():
    from mmrag_lite.pipeline import SystemSpec

    same = [_res("q1", [], "", kept=["g1"]), _res("q2", [], "", kept=["d1"]), _res("q3", [], "", kept=["d1"])]
    table, _ = E.systems_table({"base top-k": same, "stage 1 only": same}, ROWS)
    line = E.filter_verdict(table, [SystemSpec("base top-k", "base", "base"), SystemSpec("stage 1 only", "stage1", "base")])
    assert "kept as much gold as" in line and "+0.000" in line


def test_a_wrong_option_written_as_a_sentence_is_a_statement_from_three_words():
    assert E.trap_form(E.WrongAnswer("Big Ben leads.", "other option")) == E.FORM_STATEMENT
    assert E.trap_form(E.WrongAnswer("Big Ben.", "other option")) == E.FORM_RESTATED


def test_an_echo_holds_every_word_the_wrong_answer_adds():
    assert not E.echoes_wrong_answer("The car is blue.", "The car is dark blue.", "The car is red.", "red")
    assert E.echoes_wrong_answer("It is dark blue.", "The car is dark blue.", "The car is red.", "red")


def test_slot_table_counts_a_cited_slot_of_two_digits():
    res = [PipelineResult(guid="q1", question="", system="s", scores={}, kept_ids=("g1",), reasoning="", completion="",
                          sources=(), answer="", short_sources=("D12",))]
    table = E.slot_table(res, ROWS)
    assert len(table) == 12 and table[-1] == {"slot": "D12", "gold here": 0.0, "cited": 1.0}


def test_blank_keywords_count_as_none_in_the_reference_note():
    assert "for 0 of 1 WebQA questions" in E.accuracy_reference_note([dict(ROWS[0], keywords="  ")])


def test_a_report_read_back_keeps_its_timings_and_drops_empty_sections():
    report = E.EvalReport(preset="cpu-tiny", timings={"systems": 1.5, "total": 2.0}, per_category={"none": []},
                          robustness=[{"distractor": "conflicting", "Retr-F1": 0.5, "by form": []}])
    assert E.EvalReport.from_dict(json.loads(json.dumps(report.to_dict()))).timings == {"systems": 1.5, "total": 2.0}
    md = report.markdown()
    assert "Per question category" not in md and "traps by wording" not in md


def test_retrained_variant_rows_say_what_changed_and_how_the_reward_moved():
    assert E._changes({"stage2.reasoning": True, "stage2.weights.ranking": 0.0}) == "reasoning=true, weights.ranking=0"
    assert E._changes({}) == "none"
    history = [{"reward": 0.25}, {"reward": 0.5}, {"reward": 0.5}, {"reward": 0.75}]
    row = E._variant_row("v", {}, PLANTED, ROWS, history)  # windows of one step (a fifth of 4): the first and the last
    assert row["train reward first → last"] == "0.250 → 0.750"


def test_the_table_keeps_no_mmqa_count_beside_n():
    rows = [{"guid": "m1", "answers": ["Paris"]}]
    from mmrag_lite.config import get_preset

    report = E.build_report(get_preset("cpu-tiny"), ROWS[:1], {"sys": [_res("q1", [], "red")]}, mmqa_rows=rows,
                            mmqa_preds={"sys": [_res("m1", [], "Paris")]})
    assert "n_mmqa" not in report.table[0] and report.table[0]["n"] == "1 WebQA + 1 MMQA"


def test_perturbed_facts_leave_what_the_question_names_and_keep_the_case():
    others = {"qcate": "Others", "question": "How many windows do the two towers have?",
              "answer": "The two towers have five windows.", "keywords": ""}
    wrong = E.conflicting_answer(others, [], random.Random(0)).text
    assert wrong.startswith("The two towers have ") and "five" not in wrong
    capital = dict(others, question="What does the tower show?", answer="Five blue squares.")
    assert E.conflicting_answer(capital, [], random.Random(0)).text[0].isupper()
    digits = dict(others, question="Which of the 2 towers is older?", answer="The north one of the 2 towers, built in 1804.")
    assert E.conflicting_answer(digits, [], random.Random(0)).text.startswith("The north one of the 2 towers, built in ")
    years = {int(E.perturb_answer("Built in 1804.", "When?", [], random.Random(s)).text[9:13]) for s in range(20)}
    assert min(years) < 1804 < max(years)  # a year moves either way


def test_a_yes_no_flip_reads_the_leading_yes_or_no_and_never_falls_back_to_the_gold_answer():
    assert E.conflicting_answer({"qcate": "YesNo", "answer": "No, the eyes are closed."}, [], random.Random(0)).text == "Yes"
    plain = _row("q4", "text", "it is made of wood", "", ["g6"])
    assert E.conflicting_answer(plain, ["It is made of wood"], random.Random(0)) == \
        E.WrongAnswer("none of the above", E.FALLBACK_WRONG)  # attack_rows passes every answer, its own included
