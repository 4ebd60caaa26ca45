"""Does hedging pay more than committing? The answer reward's guards on the real WebQA val questions.

    .venv/bin/python benchmarks/bench_answer_guards.py [--webqa-val DIR]   (default: ../shared/data/webqa-val)

Two tables. First, ``choose``:
``choose`` is scored by recall, so an answer that names both options holds the reference's words. ``choose_guard``
(``rewards`` module docstring) halves such answers. This script takes the val ``choose`` questions whose reference
names exactly one of the two options (an ``option_spans`` span found verbatim in it), writes for each an honest
committed sentence of both kinds (the reference, and the reference with the option swapped for the other one) and
four hedges, and prints the mean answer reward without and with the guard, plus how often each hedge beats
committing at random (the mean of the right and the swapped sentence), the bar a reward must set.
Second, the same for the either-or questions WebQA files under ``text`` and ``Others``. Third, ``number``: the val
questions whose keyword is one number n; the hedge "n or n+1" against committing to n or to n+1 at random, without
and with ``hedge_guard``; and the reference sentence itself, which no guard may lower. The length guard stays on in
these three, as in the presets. Fourth, ``length_guard`` on the val ``text`` questions: sentences around the
reference, and a paste. Fifth, the list guard (``hedge_guard`` on recall categories): the right answer listed with
four other questions' answers, against committing to one of the five at random. Sixth, ``keyword_guard``: the
image questions with their keywords blanked, as a build from the public ``WebQA_train_val.json`` (which has none)
trains on: restating the question against answering with the keyword, with and without the guard; and how often the
keyword the guard derives for a ``choose`` question names the same option as the real keyword. Takes about two
minutes (spaCy).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmrag_lite import metrics, rewards
from mmrag_lite.config import shared_data_dir
from mmrag_lite.prompts import stage2_target


def committed_and_hedged(question: str, answer: str) -> dict[str, str] | None:
    """The answers to score for one question, or None when its reference does not name exactly one option."""
    for left, right in rewards.option_spans(question):
        in_ref = [span for span in (left, right) if span in answer.lower()]
        if len(in_ref) != 1:
            continue
        right_span = in_ref[0]
        wrong_span = left if right_span == right else right
        words = question.split()
        joint = words.index("or") if "or" in words else words.index("and")
        swapped = re.sub(re.escape(right_span), wrong_span, answer, flags=re.IGNORECASE)
        return {
            "right sentence": answer,
            "swapped sentence": swapped,
            "right sentence, not the other option": f"{answer.rstrip('. ')}, not {wrong_span}.",
            "swapped sentence, not the right option": f"{swapped.rstrip('. ')}, not {right_span}.",
            "hedge: copy the question": question,
            "hedge: question less the word before 'or'": " ".join(words[:joint - 1] + words[joint:]),
            "hedge: question less the word after 'or'": " ".join(words[:joint + 1] + words[joint + 2:]),
            "hedge: 'X or Y'": f"{left} or {right}",
            "hedge: 'X and Y'": f"{left} and {right}",
            "hedge: 'X, Y'": f"{left}, {right}",
        }
    return None


def columns(refs: list[dict]) -> dict[str, list]:
    """The dataset columns the answer reward reads, for these references."""
    return {"answer": [r["answer"][0] for r in refs], "keywords": [r["keywords"] for r in refs],
            "qcate": [r["qcate"] for r in refs], "question": [r["question"] for r in refs]}


def mean(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.3f}"


def choose_table(refs: dict[str, dict], categories: tuple[str, ...]) -> None:
    cases = []
    for ref in refs.values():
        if ref["qcate"] in categories:
            answers = committed_and_hedged(ref["question"], ref["answer"][0])
            if answers is not None:
                cases.append((ref, answers))
    n_asked = sum(r["qcate"] in categories for r in refs.values())
    print(f"\n{len(cases)} of {n_asked} val {'/'.join(categories)} questions have a reference that names exactly one option")
    scores: dict[tuple[str, bool], list[float]] = {}
    for kind in cases[0][1]:
        completions = [stage2_target(["D1"], answers[kind]) for _, answers in cases]
        for guard in (False, True):
            scores[kind, guard] = rewards.answer_reward(completions, choose_guard=guard, **columns([r for r, _ in cases]))
    print("| answer | reward, no choose_guard | beats committing | reward, choose_guard | beats committing |")
    print("|---|---|---|---|---|")
    for kind in cases[0][1]:
        cells = []
        for guard in (False, True):
            s = scores[kind, guard]
            coin = [(a + b) / 2 for a, b in zip(scores["right sentence", guard], scores["swapped sentence", guard])]
            beats = sum(x > c + 1e-9 for x, c in zip(s, coin))
            cells += [mean(s), "" if "sentence" in kind else f"{beats} of {len(s)}"]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    for guard in (False, True):
        coin = [(a + b) / 2 for a, b in zip(scores["right sentence", guard], scores["swapped sentence", guard])]
        print(f"committing at random, choose_guard={guard}: {mean(coin)}")


def comparative_table(refs: dict[str, dict]) -> None:
    """A content-free comparison that names both options ("L has more than R", in either order) against committing
    to one option span, on every val choose question with one option pair: the template must not beat a coin flip
    whichever option is right (the reference usually names both options in such a sentence)."""
    cases = [(r, *option_spans[0]) for r in refs.values() if r["qcate"] == "choose"
             and len(option_spans := rewards.option_spans(r["question"])) == 1]
    kinds = ("L has more than R", "R has more than L", "commit to L", "commit to R")
    said, cols = [], {k: [] for k in columns([])}
    for ref, left, right in cases:
        for text in (f"{left} has more than {right}", f"{right} has more than {left}", left, right):
            said.append(stage2_target(["D1"], text))
            for k, v in columns([ref]).items():
                cols[k] += v
    print(f"\n{len(cases)} val choose questions with one option pair: a comparison naming both options vs committing")
    print("| answer | reward, no choose_guard | reward, choose_guard |")
    print("|---|---|---|")
    by_guard = {g: rewards.answer_reward(said, choose_guard=g, **cols) for g in (False, True)}
    for i, kind in enumerate(kinds):
        print(f"| {kind} | " + " | ".join(mean(by_guard[g][i::4]) for g in (False, True)) + " |")
    for g in (False, True):
        out = by_guard[g]
        worse = [min(out[4 * j], out[4 * j + 1]) for j in range(len(cases))]
        coin = [(out[4 * j + 2] + out[4 * j + 3]) / 2 for j in range(len(cases))]
        print(f"choose_guard={g}: the worse of the two template orders {mean(worse)} vs committing at random "
              f"{mean(coin)}; the template pays >= 0.99 in both orders on {sum(w >= 0.99 for w in worse)} questions")


def number_table(refs: dict[str, dict]) -> None:
    chosen = [r for r in refs.values() if r["qcate"] == "number" and re.fullmatch(r"\s*\d+\.?\s*", r["keywords"])]
    n_number = sum(r["qcate"] == "number" for r in refs.values())
    print(f"\n{len(chosen)} of {n_number} val number questions have a single number n as their keyword")
    answers = {"reference sentence": [r["answer"][0] for r in chosen]}
    answers["commit to n"] = [r["keywords"].strip(" .") for r in chosen]
    answers["commit to n+1"] = [str(int(n) + 1) for n in answers["commit to n"]]
    answers["hedge: 'n or n+1'"] = [f"{a} or {b}" for a, b in zip(answers["commit to n"], answers["commit to n+1"])]
    scores = {(kind, guard): rewards.answer_reward([stage2_target(["D1"], a) for a in said], hedge_guard=guard,
                                                   **columns(chosen))
              for kind, said in answers.items() for guard in (False, True)}
    print("| answer | reward, no hedge_guard | reward, hedge_guard |")
    print("|---|---|---|")
    for kind in answers:
        print(f"| {kind} | {mean(scores[kind, False])} | {mean(scores[kind, True])} |")
    for guard in (False, True):
        coin = [(a + b) / 2 for a, b in zip(scores["commit to n", guard], scores["commit to n+1", guard])]
        print(f"committing to n or n+1 at random, hedge_guard={guard}: {mean(coin)}")


def length_table(refs: dict[str, dict]) -> None:
    chosen = [r for r in refs.values() if r["qcate"] == "text"]
    print(f"\nlength_guard on the {len(chosen)} val text questions (the reference A is what Acc reads)")
    others = [chosen[(i * 7 + j) % len(chosen)]["answer"][0] for i in range(len(chosen)) for j in (1, 2, 3)]
    answers = {
        "reference sentence": [r["answer"][0] for r in chosen],
        "It is REF.": [f"It is {r['answer'][0].rstrip('. ')}." for r in chosen],
        "Based on the images, REF": [f"Based on the images, {r['answer'][0]}" for r in chosen],
        "the question, then REF": [f"{r['question'].rstrip(' ?')} : {r['answer'][0]}" for r in chosen],
        "paste: question, REF, 3 other answers": [" ".join([r["question"], r["answer"][0], *others[3 * i:3 * i + 3]])
                                                  for i, r in enumerate(chosen)],
    }
    print("| answer | reward, no length_guard | reward, length_guard | lowered |")
    print("|---|---|---|---|")
    for kind, said in answers.items():
        completions = [stage2_target(["D1"], a) for a in said]
        off = rewards.answer_reward(completions, length_guard=False, **columns(chosen))
        on = rewards.answer_reward(completions, **columns(chosen))
        print(f"| {kind} | {mean(off)} | {mean(on)} | {sum(a < b - 1e-9 for a, b in zip(on, off))} |")


def list_table(refs: dict[str, dict]) -> None:
    """A list of guesses with the right one among them, against committing to one of the same guesses at random."""
    short_text = [r for r in refs.values() if r["qcate"] == "text" and len(r["answer"][0].split()) <= 2]
    keyed = [r for r in refs.values() if r["qcate"] in ("Others", "choose") and r["keywords"]]
    for name, chosen, key in (("text questions with a one- or two-word reference", short_text, "answer"),
                              ("Others/choose questions with a keyword", keyed, "keywords")):
        said = [r["answer"][0] if key == "answer" else r["keywords"] for r in chosen]
        guesses = [[said[i], *(said[(i * 7 + j) % len(said)] for j in (1, 2, 3, 4))] for i in range(len(said))]
        rows = {"the right one alone": said, "the right one first, then 4 others": [", ".join(g) for g in guesses],
                "4 others, the right one last": [", ".join([*g[1:], g[0]]) for g in guesses]}
        print(f"\nthe list guard (hedge_guard) on the {len(chosen)} val {name}")
        print("| answer | reward, no hedge_guard | reward, hedge_guard |")
        print("|---|---|---|")
        for kind, answers in rows.items():
            completions = [stage2_target(["D1"], a) for a in answers]
            off = rewards.answer_reward(completions, hedge_guard=False, **columns(chosen))
            print(f"| {kind} | {mean(off)} | {mean(rewards.answer_reward(completions, **columns(chosen)))} |")
        flat = [g for row in guesses for g in row]
        at_random = rewards.answer_reward([stage2_target(["D1"], g) for g in flat],
                                          **columns([r for r in chosen for _ in range(5)]))
        print(f"committing to one of the same 5 at random: {mean(at_random)}")


def keywordless_table(refs: dict[str, dict]) -> None:
    print("\nkeyword_guard: image questions with their keywords blanked (the public train file has none)")
    print("category | n | echo the question (off -> on) | answer with the keyword (off -> on) | echo beats keyword (off -> on)")
    for qcate in ("Others", "choose", "YesNo", "color", "shape", "number"):
        chosen = [r for r in refs.values() if r["qcate"] == qcate and r["keywords"]]
        cols = dict(columns(chosen), keywords=[""] * len(chosen))
        scores = {}
        for guard in (False, True):
            for name, texts in (("echo", [r["question"] for r in chosen]), ("keyword", [r["keywords"] for r in chosen])):
                scores[name, guard] = rewards.answer_reward([stage2_target(["D1"], t) for t in texts],
                                                            keyword_guard=guard, **cols)
        beats = {g: sum(e > k for e, k in zip(scores["echo", g], scores["keyword", g])) / len(chosen) for g in (False, True)}
        print(f"{qcate} | {len(chosen)} | {mean(scores['echo', False])} -> {mean(scores['echo', True])} | "
              f"{mean(scores['keyword', False])} -> {mean(scores['keyword', True])} | {beats[False]:.2f} -> {beats[True]:.2f}")
    # the option a derived keyword names, against the option the real keyword names (where it names exactly one)
    chosen = [r for r in refs.values() if r["qcate"] == "choose" and r["keywords"]]
    normed = metrics.normalize_webqa_many([r["question"] for r in chosen] + [r["answer"][0] for r in chosen]
                                          + [r["keywords"] for r in chosen])
    n = len(chosen)
    agree = disagree = 0
    for q, a, kw in zip(normed[:n], normed[n:2 * n], normed[2 * n:]):
        pairs = [(x, y) for x, y, _ in rewards._word_pairs(q.split())]
        if not pairs:
            continue
        derived, keyword = set(rewards.derived_keyword(a, q, "choose").split()), set(kw.split())
        left, right = pairs[0]
        if bool(left & keyword) == bool(right & keyword) or not (left | right) & derived:
            continue  # the keyword names both or neither; or the derivation fell back to the whole answer
        agree += bool((left if left & keyword else right) & derived)
        disagree += bool((right if left & keyword else left) & derived)
    print(f"choose: the derived keyword names the real keyword's option in {agree} of {agree + disagree} questions "
          "(where both name one option of the first pair; pairs read in context only, as the reward reads them "
          "with alone-lemmatised forms too)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--webqa-val", type=Path, default=(shared_data_dir() or Path("../shared/data")) / "webqa-val")
    args = ap.parse_args()
    if not (args.webqa_val / "val_text_queries.tsv").exists():
        sys.exit(f"no WebQA val references under {args.webqa_val} (see ../shared/data/README.md)")
    started = time.perf_counter()
    refs = metrics.read_webqa_val_references(args.webqa_val)
    choose_table(refs, ("choose",))
    choose_table(refs, ("text", "Others"))
    comparative_table(refs)
    number_table(refs)
    length_table(refs)
    list_table(refs)
    keywordless_table(refs)
    print(f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
