"""The course's plots read back from their figures: each shows the numbers it is given, where and in the order a reader
looks for them, with the labels and legend that say which is which. Hand-made inputs; matplotlib's Agg backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mmrag_lite import viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def top_down(ax) -> list[str]:
    """The y tick labels of a horizontal bar chart as the reader sees them, from the top."""
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    bottom, top = ax.get_ylim()
    return [ticks[y] for y in sorted(ticks, reverse=bool(top > bottom))]


def row_of(ax, y: float) -> str:
    """The y tick label of the row at ``y``."""
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    return ticks[min(ticks, key=lambda tick: abs(tick - y))]


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# ------------------------------------------------------------------------------------------------ funnel
FUNNEL = {
    "steps": [{"name": "no_gold", "reason": "", "before": 100, "removed": 10, "kept": 90, "examples": []},
              {"name": "answer_misses", "reason": "", "before": 90, "removed": 0, "kept": 90, "examples": []},
              {"name": "duplicate", "reason": "", "before": 90, "removed": 20, "kept": 70, "examples": []}],
    "splits": {"train": 50, "val": 10, "test": 10},
}


def test_funnel_shows_each_steps_kept_and_removed_counts_from_the_top(tmp_path):
    """Read first, then each filter in order, top down: kept (blue) and what the step removed stacked after it."""
    fig = viz.plot_funnel(FUNNEL)
    ax = fig.axes[0]
    assert top_down(ax) == ["read", "no_gold", "answer_misses", "duplicate"]
    kept, removed = ax.containers
    assert [row_of(ax, p.get_y() + p.get_height() / 2) for p in kept.patches] == top_down(ax)  # each bar on its row
    assert [p.get_width() for p in kept.patches] == [100, 90, 90, 70]
    assert [(p.get_x(), p.get_width()) for p in removed.patches] == [(100, 0), (90, 10), (90, 0), (70, 20)]
    assert legend(ax) == ["kept", "removed"]
    assert [(row_of(ax, t.get_position()[1]), t.get_text()) for t in ax.texts] == [
        ("read", "100"), ("no_gold", "90  (-10)"), ("answer_misses", "90"), ("duplicate", "70  (-20)")]  # no "(-0)"
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    assert all(t.get_window_extent(renderer).x1 <= inside.x1 for t in ax.texts)  # every count inside the axes
    assert ax.get_title() == "Mini-WebQA funnel — train 50, val 10, test 10"
    assert viz.plot_funnel(FUNNEL, title="mine").axes[0].get_title() == "mine"
    (tmp_path / "funnel.json").write_text(json.dumps(FUNNEL))
    assert [p.get_width() for p in viz.plot_funnel(tmp_path).axes[0].containers[0].patches] == [100, 90, 90, 70]
    with pytest.raises(ValueError, match="no steps"):
        viz.plot_funnel({"steps": []})


# --------------------------------------------------------------------------------------------- results
def test_results_bars_stand_in_their_rows_group_one_per_metric_and_skip_non_numbers():
    """Each metric's bar sits in its row's group at that metric's offset; a cell that is no number (a dash, a flag,
    NaN) leaves a gap instead of shifting the later bars; the tick names the group's centre."""
    table = [{"system": "base", "Retr-F1": 0.25, "QA-Acc": 0.5},
             {"system": "ours", "Retr-F1": "—", "QA-Acc": True},
             {"system": "full", "Retr-F1": 0.75, "QA-Acc": float("nan")},
             {"system": "best", "Retr-F1": 0.875, "QA-Acc": 0.125}]
    fig = viz.plot_results(table, ("Retr-F1", "QA-Acc"), title="mine")
    ax = fig.axes[0]
    width = 0.4
    drawn = {m: [(round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in c.patches]
             for m, c in zip(legend(ax), ax.containers)}
    assert drawn == {"Retr-F1": [(0.0, 0.25), (2.0, 0.75), (3.0, 0.875)],
                     "QA-Acc": [(0.0 + width, 0.5), (3.0 + width, 0.125)]}
    assert all(round(p.get_width(), 6) == width for p in ax.patches)  # side by side, not on top of each other
    assert [round(x, 6) for x in ax.get_xticks()] == [0.2, 1.2, 2.2, 3.2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "ours", "full", "best"]
    assert ax.get_title() == "mine" and ax.get_ylim() == (0, 1.05)  # every 0-1 plot on one scale
    mine, axes = plt.subplots()
    assert viz.plot_results(table, ("Retr-F1",), ax=axes) is mine and len(axes.patches) == 3  # drawn where asked


def test_robustness_groups_its_bars_by_distractor_kind():
    """Notebook 05's robustness table is keyed by ``distractor``, not ``system``."""
    rows = [{"distractor": "clean", "Retr-F1": 0.8, "QA-Acc": 0.6}, {"distractor": "same title", "Retr-F1": 0.4}]
    ax = viz.plot_robustness(rows).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "same title"]
    assert ax.get_title() == "robustness: clean vs adversarial distractors"


# -------------------------------------------------------------------------------------------- ablation
def test_ablation_draws_each_metric_against_the_given_x():
    """Points at the given x values (k = 1, 2, 4 is not 0, 1, 2), one named line per metric."""
    rows = [{"k": 1, "Retr-F1": 0.5, "MMQA F1": 40.0}, {"k": 2, "Retr-F1": 0.75, "MMQA F1": 55.0},
            {"k": 4, "Retr-F1": 0.25, "MMQA F1": 61.5}]
    ax = viz.plot_ablation(rows, "k", ("Retr-F1", "MMQA F1")).axes[0]
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines] == [
        ("Retr-F1", [1, 2, 4], [0.5, 0.75, 0.25]), ("MMQA F1", [1, 2, 4], [40.0, 55.0, 61.5])]
    assert legend(ax) == ["Retr-F1", "MMQA F1"] and ax.get_xlabel() == "k" and ax.get_title() == "ablation over k"
    assert ax.get_ylim()[1] >= 61.5  # a 0-100 column is not cut off
    assert viz.plot_ablation(rows, "k", ("Retr-F1",), title="mine").axes[0].get_title() == "mine"
    opened = plt.get_fignums()
    with pytest.raises(ValueError, match="needs rows"):
        viz.plot_ablation([], "k", ("Retr-F1",))
    assert plt.get_fignums() == opened  # the refused call opened no figure


# ------------------------------------------------------------------------------------------- stage-1 k
def test_k_tradeoff_draws_recall_all_gold_the_baseline_the_saving_and_the_chosen_k():
    """Notebook 03 picks k from this plot: each line must be its own column, the baseline at its own ks."""
    report = [{"k": k, "recall": r, "all_gold": a, "saved_fraction": s}
              for k, r, a, s in ((2, 0.6, 0.4, 0.8), (4, 0.8, 0.7, 0.6), (8, 0.95, 0.9, 0.2))]
    before = [{"k": 2, "recall": 0.3}, {"k": 8, "recall": 0.7}]
    fig = viz.plot_k_tradeoff(report, chosen_k=4, baseline=before)
    ax, twin = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert lines == {"recall@k (trained)": ([2, 4, 8], [0.6, 0.8, 0.95]), "all gold kept": ([2, 4, 8], [0.4, 0.7, 0.9]),
                     "recall@k (before)": ([2, 8], [0.3, 0.7]), "preset k = 4": ([4, 4], [0, 1])}
    assert ax.lines[2].get_linestyle() == "--"  # the baseline is the dashed one
    assert [(round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in twin.patches] == [(2, 0.8), (4, 0.6),
                                                                                                  (8, 0.2)]


# ------------------------------------------------------------------------------------------ memory floor
def test_memory_floor_stacks_each_presets_parts_on_its_row_beside_its_estimate_and_measurements():
    """Presets top down in the order given; each row's three parts end to end; the estimate and the GPU's measured
    peaks marked on that preset's row (not another's)."""
    floors = [SimpleNamespace(preset="gpu-a", model_id="org/model-a", quantized_gb=1.0, full_precision_gb=0.5,
                              lora_and_optimizer_gb=0.25, expected_memory_gb=3.0),
              SimpleNamespace(preset="gpu-b", model_id="org/model-b", quantized_gb=4.0, full_precision_gb=2.0,
                              lora_and_optimizer_gb=1.0, expected_memory_gb=11.0)]
    measured = [SimpleNamespace(preset="gpu-b", stage=1, at_prompt_cap=False, device="NVIDIA H100 80GB", peak_reserved_gb=9.0),
                SimpleNamespace(preset="gpu-b", stage=2, at_prompt_cap=True, device="NVIDIA H100 80GB", peak_reserved_gb=10.5),
                SimpleNamespace(preset="other", stage=1, at_prompt_cap=False, device="NVIDIA L4", peak_reserved_gb=99.0)]
    fig = viz.plot_memory_floor(floors, measured=measured)
    ax = fig.axes[0]
    assert top_down(ax) == ["gpu-a\nmodel-a", "gpu-b\nmodel-b"]
    by_row = {}
    for part in ax.containers:
        for p in part.patches:
            by_row.setdefault(row_of(ax, p.get_y() + p.get_height() / 2), []).append((p.get_x(), p.get_width()))
    assert by_row == {"gpu-a\nmodel-a": [(0, 1.0), (1.0, 0.5), (1.5, 0.25)],
                      "gpu-b\nmodel-b": [(0, 4.0), (4.0, 2.0), (6.0, 1.0)]}
    marks = {c.get_label(): [(x, row_of(ax, y)) for x, y in c.get_offsets()] for c in ax.collections}
    assert marks == {"the preset's estimate of a whole step": [(3.0, "gpu-a\nmodel-a"), (11.0, "gpu-b\nmodel-b")],
                     "measured peak, stage 1 (H100, random weights)": [(9.0, "gpu-b\nmodel-b")],
                     "measured peak, stage 2, every prompt at the cap (H100, random weights)": [(10.5, "gpu-b\nmodel-b")]}


# ----------------------------------------------------------------------------------------- reward curves
def test_reward_curves_take_the_title_and_smoothing_asked_for(tmp_path):
    """Notebooks 03 and 04 pass ``smooth=5`` and their own title through ``viz`` (it imports ``training``: slow cold)."""
    curves = {"reward": [(1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0)], "format": [(1, 0.5), (2, 0.5)]}
    fig = viz.plot_reward_curves(curves, title="stage-2 rewards", smooth=2)
    assert fig.get_suptitle() == "stage-2 rewards"
    total = fig.axes[0]
    assert total.get_title() == "total (weighted)"
    assert [list(line.get_ydata()) for line in total.lines] == [[0.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5]]  # + running mean
    (tmp_path / "log_history.json").write_text(json.dumps([{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.75}]))
    assert [list(line.get_ydata()) for line in viz.plot_reward_curves(tmp_path).axes[0].lines] == [[0.5, 0.75]]
