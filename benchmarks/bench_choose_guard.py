"""Does hedging between the options of a ``choose`` question pay more than committing? Real WebQA val questions.

    .venv/bin/python benchmarks/bench_choose_guard.py [--webqa-val DIR]   (default: ../shared/data/webqa-val)

``choose`` is scored by recall, so an answer that names both options holds the reference's words. ``choose_guard``
(``rewards`` module docstring) halves such answers. This script takes the val ``choose`` questions whose reference
names exactly one of the two options (an ``option_spans`` span found verbatim in it), writes for each an honest
committed sentence of both kinds (the reference, and the reference with the option swapped for the other one) and
four hedges, and prints the mean answer reward without and with the guard, plus how often each hedge beats
committing at random (the mean of the right and the swapped sentence), the bar a reward must set.
The length guard stays on, as in the presets. Takes about half a minute (spaCy).
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
        return {
            "right sentence": answer,
            "swapped sentence": re.sub(re.escape(right_span), wrong_span, answer, flags=re.IGNORECASE),
            "hedge: copy the question": question,
            "hedge: question less the word before 'or'": " ".join(words[:joint - 1] + words[joint:]),
            "hedge: question less the word after 'or'": " ".join(words[:joint + 1] + words[joint + 2:]),
            "hedge: 'X or Y'": f"{left} or {right}",
        }
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--webqa-val", type=Path, default=(shared_data_dir() or Path("../shared/data")) / "webqa-val")
    args = ap.parse_args()
    if not (args.webqa_val / "val_text_queries.tsv").exists():
        sys.exit(f"no WebQA val references under {args.webqa_val} (see ../shared/data/README.md)")
    started = time.perf_counter()
    refs = metrics.read_webqa_val_references(args.webqa_val)
    cases = []
    for ref in refs.values():
        if ref["qcate"] == "choose":
            answers = committed_and_hedged(ref["question"], ref["answer"][0])
            if answers is not None:
                cases.append((ref, answers))
    n_choose = sum(r["qcate"] == "choose" for r in refs.values())
    print(f"{len(cases)} of {n_choose} val choose questions have a reference that names exactly one option")
    scores: dict[tuple[str, bool], list[float]] = {}
    for kind in cases[0][1]:
        completions = [stage2_target(["D1"], answers[kind]) for _, answers in cases]
        columns = {"answer": [r["answer"][0] for r, _ in cases], "keywords": [r["keywords"] for r, _ in cases],
                   "qcate": ["choose"] * len(cases), "question": [r["question"] for r, _ in cases]}
        for guard in (False, True):
            scores[kind, guard] = rewards.answer_reward(completions, choose_guard=guard, **columns)
    print("| answer | reward, no choose_guard | beats committing | reward, choose_guard | beats committing |")
    print("|---|---|---|---|---|")
    for kind in cases[0][1]:
        cells = []
        for guard in (False, True):
            s = scores[kind, guard]
            coin = [(a + b) / 2 for a, b in zip(scores["right sentence", guard], scores["swapped sentence", guard])]
            beats = sum(x > c + 1e-9 for x, c in zip(s, coin))
            cells += [f"{sum(s) / len(s):.3f}", "" if "sentence" in kind else f"{beats} of {len(s)}"]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    for guard in (False, True):
        coin = [(a + b) / 2 for a, b in zip(scores["right sentence", guard], scores["swapped sentence", guard])]
        print(f"committing at random, choose_guard={guard}: {sum(coin) / len(coin):.3f}")
    print(f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
