"""Matplotlib plots for the course notebooks (each function returns its figure, so notebooks can save or show it)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _fig_ax(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """The axes to draw on: the caller's, or a new figure of ``figsize``."""
    import matplotlib.pyplot as plt

    if ax is None:
        return plt.subplots(figsize=figsize)
    return ax.figure, ax


def _funnel_dict(report: Any) -> dict[str, Any]:
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, (str, Path)):
        path = Path(report)
        return json.loads((path / "funnel.json" if path.is_dir() else path).read_text())
    return dict(report)


def plot_funnel(report: Any, ax: Any = None, title: str | None = None) -> Figure:
    """The Mini-WebQA funnel: questions kept after each filter (bars) and how many it removed (labels).

    ``report`` is a ``data.FunnelReport``, its ``to_dict()``, or a path to ``funnel.json`` / the dataset folder.
    """
    data = _funnel_dict(report)
    steps = data.get("steps", [])
    if not steps:
        raise ValueError("the funnel report has no steps")
    names = ["read"] + [s["name"] for s in steps]
    kept = [steps[0]["before"]] + [s["kept"] for s in steps]
    removed = [0] + [s["removed"] for s in steps]
    fig, ax = _fig_ax(ax, (8, 0.45 * len(names) + 1.2))
    ys = list(range(len(names)))[::-1]
    ax.barh(ys, kept, color="#4c78a8", label="kept")
    ax.barh(ys, removed, left=kept, color="#e45756", label="removed")
    top = max(k + r for k, r in zip(kept, removed)) or 1
    for y, k, r in zip(ys, kept, removed):
        ax.text(k + r + top * 0.01, y, f"{k}" + (f"  (-{r})" if r else ""), va="center", fontsize=9)
    ax.set_yticks(ys)
    ax.set_yticklabels(names)
    ax.set_xlim(0, top * 1.2)
    ax.set_xlabel("questions")
    splits = data.get("splits") or {}
    default = "Mini-WebQA funnel" + (" — " + ", ".join(f"{k} {v}" for k, v in splits.items()) if splits else "")
    ax.set_title(title or default)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # beside the bars: inside, it hid a count
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ evaluation
def _as_float(v: Any) -> float | None:
    """A number to draw, or None (missing, a label, NaN: a NaN would also poison the y-limit's max)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return None
    return float(v)


def _unit_or_percent_ylim(ax: Any, values: list[float | None]) -> None:
    """0-1.05 for the 0-1 metrics; room for the tallest bar where a column is on a 0-100 scale (MMQA EM/F1)."""
    tallest = max((v for v in values if v is not None), default=0.0)
    ax.set_ylim(0, max(1.05, tallest * 1.05))


def plot_results(table: list[dict[str, Any]], metrics: tuple[str, ...] = ("Retr-F1", "QA-Acc"), ax: Any = None,
                 title: str = "systems x metrics", label: str = "system") -> Figure:
    """Grouped bars: one group per row (named by its ``label`` column), one bar per metric (non-numbers skipped)."""
    fig, ax = _fig_ax(ax, (7, 3.2))
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        vals = [_as_float(r.get(m)) for r in table]
        xs = [i + j * width for i, v in enumerate(vals) if v is not None]
        ax.bar(xs, [v for v in vals if v is not None], width=width, label=m)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(table))])
    ax.set_xticklabels([str(r.get(label, i)) for i, r in enumerate(table)], rotation=10)
    _unit_or_percent_ylim(ax, [_as_float(r.get(m)) for r in table for m in metrics])
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_ablation(rows: list[dict[str, Any]], x: str, ys: tuple[str, ...], ax: Any = None,
                  title: str | None = None) -> Figure:
    """Lines of ``ys`` against ``x`` (e.g. gold recall and Retr-F1 against k)."""
    missing = [i for i, r in enumerate(rows) if x not in r]
    if not rows or missing:  # checked before a figure exists: a failed call leaves no open figure behind
        raise ValueError(f"plot_ablation needs rows that all hold {x!r}" + (f"; rows {missing} do not" if missing else ""))
    fig, ax = _fig_ax(ax, (5, 3))
    xs = [r[x] for r in rows]
    for y in ys:
        ax.plot(xs, [_as_float(r.get(y)) for r in rows], marker="o", label=y)
    ax.set_xlabel(x)
    _unit_or_percent_ylim(ax, [_as_float(r.get(y)) for r in rows for y in ys])
    ax.set_title(title or f"ablation over {x}")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_robustness(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("Retr-F1", "QA-Acc"),
                    ax: Any = None) -> Figure:
    """Clean vs attacked metrics, one group per distractor kind."""
    return plot_results(rows, metrics, ax=ax, title="robustness: clean vs adversarial distractors", label="distractor")


# ------------------------------------------------------------------------------ GRPO reward curves, stage-1 k trade-off
def reward_curves_from_history(log_history: list[dict[str, Any]] | str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"reward": [(step, mean)], "<component>": [...]}`` from a trainer's log history, its log_history.json or
    the stage folder holding it (``training.curves_from_history``)."""
    from .training import curves_from_history  # lazy: plotting a funnel should not import torch and TRL

    if isinstance(log_history, (str, Path)):
        path = Path(log_history)
        path = path / "log_history.json" if path.is_dir() else path
        log_history = json.loads(path.read_text(encoding="utf-8"))
    return curves_from_history(log_history)


def plot_reward_curves(log_history: Any, title: str = "GRPO rewards", smooth: int = 1) -> Figure:
    """Reward curves from a log history, its JSON file (or the stage folder: ``run/stage1``), or ready
    ``{name: [(step, value)]}`` curves (one panel each)."""
    from .training import plot_reward_curves as plot_curves

    curves = log_history if isinstance(log_history, dict) else reward_curves_from_history(log_history)
    return plot_curves(curves, title=title, smooth=smooth)


def plot_k_tradeoff(report: list[dict[str, Any]], *, chosen_k: int | None = None, baseline: list[dict[str, Any]] | None = None,
                    title: str = "stage-1 filter: which k?") -> Figure:
    """Recall@k of the gold sources (left axis) against the share of stage-2 prompt tokens saved (right axis).

    ``report`` is ``scoring.filter_report``'s rows; ``baseline`` (e.g. the zero-shot judge's report) is drawn dashed.
    """
    import matplotlib.pyplot as plt

    if not report:
        raise ValueError("plot_k_tradeoff needs scoring.filter_report rows (one per k); got none: were any questions scored?")
    ks = [r["k"] for r in report]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(ks, [r["recall"] for r in report], marker="o", label="recall@k (trained)")
    ax.plot(ks, [r["all_gold"] for r in report], marker=".", lw=1, label="all gold kept")
    if baseline:
        ax.plot([r["k"] for r in baseline], [r["recall"] for r in baseline], ls="--", label="recall@k (before)")
    ax.set_xlabel("k (candidates kept for stage 2)")
    ax.set_ylabel("share of gold kept")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if "saved_fraction" in report[0]:
        ax2 = ax.twinx()
        ax2.bar(ks, [r["saved_fraction"] for r in report], alpha=0.2, color="gray", label="prompt tokens saved")
        ax2.set_ylabel("stage-2 prompt tokens saved")
        ax2.set_ylim(0, 1.05)
    if chosen_k is not None:
        ax.axvline(chosen_k, color="red", lw=1, ls=":", label=f"preset k = {chosen_k}")
    handles, labels = ax.get_legend_handles_labels()
    if "saved_fraction" in report[0]:  # the bars live on the twin axis: ax.legend() alone would leave them out
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=7, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_memory_floor(floors: list[Any], ax: Any = None, title: str | None = None, measured: Sequence[Any] = ()) -> Any:
    """Stacked bars of what weights, float32 parameters and LoRA + AdamW take per preset, against its estimate.

    ``floors`` are ``modeling.architectures.MemoryFloor``s. The gap between a bar and its marker is what only a GPU
    can measure: activations, logits, the KV cache of generation and the allocator's slack. ``measured``
    (``architectures.MeasuredStep``s) adds what a GPU did measure: each stage's peak held by the allocator, stage 2
    filled where every prompt was as long as the preset admits.
    """
    if not floors:
        raise ValueError("plot_memory_floor needs at least one MemoryFloor (one per GPU preset)")
    fig, ax = _fig_ax(ax, (8, 0.7 * len(floors) + 2.2))
    labels = [f"{f.preset}\n{f.model_id.split('/')[-1]}" for f in floors]
    parts = [("4-bit weights (NF4)", [f.quantized_gb for f in floors], "#4c72b0"),
             ("float32 (embeddings, norms, biases)", [f.full_precision_gb for f in floors], "#dd8452"),
             ("LoRA + gradients + AdamW", [f.lora_and_optimizer_gb for f in floors], "#55a868")]
    left = [0.0] * len(floors)
    for name, values, colour in parts:
        ax.barh(labels, values, left=left, label=name, color=colour)
        left = [a + b for a, b in zip(left, values)]
    ax.scatter([f.expected_memory_gb for f in floors], labels, marker="|", s=400, color="black",
               label="the preset's estimate of a whole step", zorder=3)
    row = {f.preset: label for f, label in zip(floors, labels)}
    kinds = ((1, False, "o", "white", "stage 1"), (2, False, "D", "white", "stage 2"),
             (2, True, "D", "crimson", "stage 2, every prompt at the cap"))
    for stage, at_cap, marker, face, what in kinds:
        steps = [m for m in measured if m.stage == stage and m.at_prompt_cap == at_cap and m.preset in row]
        if steps:
            devices = sorted({m.device.replace("NVIDIA ", "").split()[0] for m in steps})
            ax.scatter([m.peak_reserved_gb for m in steps], [row[m.preset] for m in steps], marker=marker, s=50,
                       facecolor=face, edgecolor="crimson", linewidth=1.5, zorder=4,
                       label=f"measured peak, {what} ({', '.join(devices)}, random weights)")
    ax.set_xlabel("GiB")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title or "Counted floor (no GPU needed) vs the presets' estimates")
    fig.tight_layout()
    return fig
