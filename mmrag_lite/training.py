"""Stage-1 / stage-2 training sets and the GRPO wiring (TRL ``GRPOTrainer``; no hand-written RL loop).

GRPO (Shao et al. 2024, as used by MMRAG-RFT): for each prompt ``q`` the policy samples a *group* of ``G``
completions ``o_1..o_G``; each gets a rule-based reward ``r_i = sum_c w_c * r_c(o_i)`` (format, relevance, ranking,
answer: ``rewards.build_reward_funcs``); the advantage of a completion is its reward relative to its own group,

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G),

and the policy gradient pushes up the tokens of better-than-average completions (clipped ratio, optional KL to a
reference with weight ``beta``). No value model, no learned reward model: this is what makes it cheap enough for a
course. Everything GRPO is told comes from the preset (``grpo_config_kwargs``), so a notebook never hides a knob.

Stage 1 trains the point-wise judge on (question, one candidate) rows; stage 2 trains the list-wise reasoner on
(question, top-k candidates behind D1..Dk) rows, continuing from the stage-1 adapter on the GPU presets
(``stage2.init_from``; ``cpu-tiny`` starts from the warmed base model).
Run folders follow docs/CONTRACTS.md: ``<work_dir>/stage{1,2}/adapter/``, ``log_history.json``, ``checkpoint-*``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import prompts
from .atomic import atomic_dir, write_json_atomic
from .config import Preset, runs_dir, setting_changes
from .data import is_saved_split, one_split, pool_field, rows_by_guid

if TYPE_CHECKING:
    from datasets import Dataset
    from matplotlib.figure import Figure
    from trl import GRPOConfig

# Reported per-component reward keys look like "rewards/<name>/mean" in TRL's logs.
REWARD_KEY = "reward"
COMPONENT_PREFIX, COMPONENT_SUFFIX = "rewards/", "/mean"
CHECKPOINTS_KEPT = 2  # checkpoints are for resuming, not for model selection: keep the last two

REWARD_WINDOW_FRACTION = 0.2  # first/last mean reward averages this share of the logged steps (sampled rewards are noisy)


# =============================================================================================== config
def _stage_settings(preset: Preset, stage: int) -> Any:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return preset.stage1 if stage == 1 else preset.stage2


def reward_funcs_for(preset: Preset, stage: int) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The stage's reward functions and weights, exactly as the preset asks for them (``rewards`` owns the rules)."""
    from . import rewards

    _stage_settings(preset, stage)  # validates the stage number
    return rewards.reward_funcs_for_preset(preset, stage)


def _on_cpu(preset: Preset) -> bool:
    """The miniature trains on the CPU (its NF4 path is the CPU one); every other preset is a GPU preset.

    Decided by the preset, not by the machine, so the config is reproducible; ``modeling`` refuses a GPU preset
    without CUDA with a message pointing to cpu-tiny.
    """
    return preset.model.is_miniature


def grpo_config_kwargs(preset: Preset, stage: int, output_dir: str | Path | None = None, *,
                       max_steps: int | None = None) -> dict[str, Any]:
    """Everything passed to ``trl.GRPOConfig`` for a stage, derived from the preset (nothing else is set).

    ``output_dir`` defaults to ``runs/<preset>/stage<stage>``; ``max_steps`` overrides the preset's bound.
    """
    s = _stage_settings(preset, stage)
    g = s.grpo
    if max_steps is not None and max_steps < 1:  # transformers trains a step at 0, and by epochs below it
        raise ValueError(f"max_steps={max_steps!r} must be >= 1 (or None for the preset's {g.max_steps})")
    cpu = _on_cpu(preset)
    _, weights = reward_funcs_for(preset, stage)
    dtype = preset.model.compute_dtype
    return {
        "output_dir": str(output_dir if output_dir is not None else runs_dir() / preset.name / f"stage{stage}"),
        # --- the GRPO knobs of the preset
        "max_steps": int(max_steps if max_steps is not None else g.max_steps),
        "per_device_train_batch_size": g.per_device_train_batch_size,
        "gradient_accumulation_steps": g.gradient_accumulation_steps,
        "num_generations": g.num_generations,
        "max_completion_length": g.max_completion_length,
        "learning_rate": g.learning_rate,
        "beta": g.beta,
        "loss_type": g.loss_type,
        "temperature": g.temperature,
        "reward_weights": list(weights),
        # TRL samples completions in train mode, so LoRA dropout (0.05 on the GPU presets) would perturb the policy
        # that samples, and the old/new log-probs of one completion would differ by dropout noise (trl#3000). TRL sets
        # every nn.Dropout to p=0, peft's lora_dropout included; a no-op for cpu-tiny (LoRA dropout 0: nn.Identity,
        # and the miniature has no nn.Dropout). So on the GPU presets lora.dropout no longer acts in GRPO.
        "disable_dropout": True,
        # --- hardware: CPU runs in float32; GPUs in the preset's compute dtype (fp16 on a T4, bf16 elsewhere)
        "use_cpu": cpu,
        "bf16": (not cpu) and dtype == "bfloat16",
        "fp16": (not cpu) and dtype == "float16",
        # memory for compute: needed for a 2B VLM on 16 GB, a pure loss for the miniature
        "activation_checkpointing": not cpu,
        "activation_checkpointing_kwargs": None if cpu else {"use_reentrant": False},
        # --- bookkeeping
        "logging_steps": g.logging_steps,
        "save_strategy": "steps",
        "save_steps": g.save_steps,
        "save_total_limit": CHECKPOINTS_KEPT,
        "seed": preset.seed,
        "data_seed": preset.seed,
        "report_to": [],  # no wandb/tensorboard: the course plots its own curves from log_history
        "remove_unused_columns": False,  # the reward functions need label/gold_ids/answer/... columns
        "dataloader_num_workers": 0,  # PIL images in rows; worker processes cost more than they save here
    }


def grpo_config(preset: Preset, stage: int, output_dir: str | Path | None = None, **kw: Any) -> GRPOConfig:
    """A ``trl.GRPOConfig`` built from ``grpo_config_kwargs``."""
    from trl import GRPOConfig

    return GRPOConfig(**grpo_config_kwargs(preset, stage, output_dir, **kw))


# =============================================================================================== datasets
def _features(stage: int):
    """Explicit schema: prompts as message lists, images as a list of ``datasets.Image`` ([] for a snippet)."""
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    prompt = List({"role": Value("string"), "content": List(part)})
    common = {"prompt": prompt, "images": List(Image()), "guid": Value("string")}
    if stage == 1:
        return Features({**common, "label": Value("string"), "candidate_id": Value("string"), "modality": Value("string")})
    return Features({
        **common, "candidate_ids": List(Value("string")), "gold_ids": List(Value("string")),
        "source_ids": List(Value("string")), "answer": Value("string"), "keywords": Value("string"),
        "qcate": Value("string"), "question": Value("string"),
    })


def _with_prepared_image(candidate: Mapping[str, Any], preset: Preset) -> dict[str, Any]:
    """A copy of the candidate whose image is resized to the preset's fixed square (the mRoPE trap, docs/modeling.md)."""
    from .modeling import prepare_image

    c = dict(candidate)
    if c.get("image") is not None:
        c["image"] = prepare_image(c["image"], preset)
    return c


def build_stage1_dataset(split_ds: Iterable[Mapping[str, Any]], preset: Preset, *, seed: int | None = None) -> Dataset:
    """Point-wise GRPO rows (docs/CONTRACTS.md): one question + one candidate, label ``yes``/``no``.

    Why balanced: a pool holds ~1-2 gold among ~8-16 candidates, so an unbalanced set rewards "always no".
    ``preset.stage1.positive_fraction`` of the rows are gold (as close as the available positives allow), the
    total is capped at ``preset.stage1.max_examples``, and the rows are shuffled deterministically by ``seed``.
    """
    from datasets import Dataset

    s = preset.stage1
    rng = random.Random(preset.seed if seed is None else seed)
    split_ds = one_split(split_ds, "build_stage1_dataset")
    if not is_saved_split(split_ds):
        split_ds = list(split_ds)  # plain rows (or streamed ones): indexed like a saved split
    # (question, candidate) positions from the gold flags alone: only the chosen rows' images are decoded, later
    pos: list[tuple[int, int]] = []
    neg: list[tuple[int, int]] = []
    for qi, (_, gold) in enumerate(pool_field(split_ds, "is_gold")):
        for ci, is_gold in enumerate(gold):
            (pos if is_gold else neg).append((qi, ci))
    if not pos or not neg:  # Dataset.from_list([]) would fail with a schema error that names neither
        raise ValueError(f"stage 1 needs gold and distractor candidates to judge; this split has {len(pos)} gold and "
                         f"{len(neg)} distractor candidates (an empty split, or data.max_candidates="
                         f"{preset.data.max_candidates} keeping only the gold)")
    rng.shuffle(pos)
    rng.shuffle(neg)
    f = s.positive_fraction
    n_pos = min(len(pos), round(s.max_examples * f))
    n_neg = min(len(neg), s.max_examples - n_pos, round(n_pos * (1 - f) / f) if n_pos else s.max_examples)
    if n_neg < round(n_pos * (1 - f) / f):  # too few negatives: shrink the positives to keep the fraction
        n_pos = min(n_pos, round(n_neg * f / (1 - f)))
    chosen = [(q, c, prompts.YES) for q, c in pos[:n_pos]] + [(q, c, prompts.NO) for q, c in neg[:n_neg]]
    rng.shuffle(chosen)
    by_question: dict[int, list[tuple[int, int, str]]] = {}
    for at, (qi, ci, label) in enumerate(chosen):
        by_question.setdefault(qi, []).append((at, ci, label))
    rows: list[dict[str, Any]] = [{} for _ in chosen]
    for qi in sorted(by_question):  # each chosen question read (and its images decoded) once, in split order
        row = split_ds[qi]
        for at, ci, label in by_question[qi]:
            cand = _with_prepared_image(row["candidates"][ci], preset)
            rows[at] = {
                "prompt": prompts.stage1_messages(row["question"], cand, reasoning=s.reasoning),
                "images": prompts.stage1_images(cand),
                "label": label,
                "guid": row["guid"],
                "candidate_id": cand["id"],
                "modality": cand["modality"],
            }
    return Dataset.from_list(rows, features=_features(1))


@dataclass
class Stage2BuildReport:
    """What ``build_stage2_dataset`` did, so a shrunk or dropped prompt is never silent."""

    max_prompt_tokens: int
    max_examples: int = 0  # the row cap (preset.stage2.max_examples)
    split_questions: int | None = None  # questions in the split given (None: it has no length)
    questions_seen: int = 0  # read before the row cap was reached
    questions_used: int = 0
    rows: int = 0
    questions_without_kept_ids: int = 0  # no candidate to show (no kept ids for this guid, none in its pool): skipped
    questions_shrunk: int = 0  # over max_prompt_tokens: distractors removed until the prompt fit
    candidates_dropped: int = 0  # total candidates removed by shrinking
    gold_dropped: int = 0  # gold candidates removed (only after every distractor is gone)
    questions_dropped_too_long: int = 0  # still over the limit with a single candidate: row dropped
    rows_dropped_too_long: int = 0  # a permutation over the limit (tokens differ slightly by order): dropped
    # No gold among the candidates shown (the stage-1 filter, or shrinking, lost every gold): gold_ids == [], so the
    # ranking reward is 0 for every readable sources list, i.e. no ranking signal; the answer reward still trains.
    questions_without_gold: int = 0  # kept (their rows below) unless skip_questions_without_gold=True
    rows_without_gold: int = 0  # rows with gold_ids == [] in the dataset
    questions_skipped_without_gold: int = 0  # dropped because skip_questions_without_gold=True
    prompt_tokens_max: int = 0
    prompt_tokens_mean: float = 0.0
    images_per_prompt_max: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            (f"stage-2 dataset: {self.rows} rows from {self.questions_used} questions "
            f"(prompt tokens mean {self.prompt_tokens_mean:.0f}, max {self.prompt_tokens_max} <= "
            f"limit {self.max_prompt_tokens}; up to {self.images_per_prompt_max} images per prompt)"),
        ]
        if self.split_questions is not None and self.questions_seen < self.split_questions:
            lines.append(f"  read the first {self.questions_seen} of the split's {self.split_questions} questions: "
                         f"max_examples={self.max_examples} rows reached (raise stage2.max_examples to use more)")
        if self.questions_shrunk:
            lines.append(f"  shrunk {self.questions_shrunk} over-long prompts by dropping {self.candidates_dropped} "
                         f"candidates ({self.gold_dropped} of them gold)")
        if self.questions_dropped_too_long or self.rows_dropped_too_long:
            lines.append(f"  dropped {self.questions_dropped_too_long} questions and {self.rows_dropped_too_long} "
                         f"permuted rows still over {self.max_prompt_tokens} tokens")
        if self.questions_without_kept_ids:
            lines.append(f"  skipped {self.questions_without_kept_ids} questions with no candidate to show (no stage-1 "
                         "kept ids for them: stage 1 scores only the train questions stage 2 is expected to read, "
                         "scoring.questions_to_score; or none of their ids in the pool)")
        kept_without_gold = self.questions_without_gold - self.questions_skipped_without_gold
        if kept_without_gold:
            lines.append(f"  {kept_without_gold} questions ({self.rows_without_gold} rows, gold_ids=[]) show no gold "
                         "candidate (lost by the filter or by shrinking): no ranking signal, they still train the answer "
                         "(skip_questions_without_gold=True drops them)")
        if self.questions_skipped_without_gold:
            lines.append(f"  skipped {self.questions_skipped_without_gold} questions that show no gold candidate "
                         "(skip_questions_without_gold=True)")
        if len(lines) == 1:
            lines.append("  no prompt needed shrinking; nothing dropped; no prompt was truncated")
        return "\n".join(lines)


def _default_shown(row: Mapping[str, Any], k: int) -> list[Mapping[str, Any]]:
    """Without stage-1 scores: the gold candidates plus the first distractors of the pool, up to k."""
    cands = list(row["candidates"])
    gold = [c for c in cands if c["is_gold"]]
    rest = [c for c in cands if not c["is_gold"]]
    return (gold + rest)[: max(k, len(gold))]


def _fit(question: str, shown: list[Mapping[str, Any]], processor: Any, preset: Preset,
         report: Stage2BuildReport) -> tuple[list[Mapping[str, Any]], int] | None:
    """Shrink ``shown`` (best first) until its prompt fits: last distractor first, then last gold. None: cannot fit."""
    from .modeling import prompt_token_count

    limit = preset.stage2.max_prompt_tokens
    reasoning = preset.stage2.reasoning
    shown = list(shown)
    dropped = gold_dropped = 0
    while True:
        n = prompt_token_count(processor, prompts.stage2_messages(question, shown, reasoning=reasoning),
                               prompts.stage2_images(shown))
        if n <= limit:
            if dropped:  # counted only for questions that fit: a dropped question's losses are not a kept one's
                report.questions_shrunk += 1
                report.candidates_dropped += dropped
                report.gold_dropped += gold_dropped
            return shown, n
        if len(shown) <= 1:
            report.questions_dropped_too_long += 1
            return None
        idx = max((i for i, c in enumerate(shown) if not c["is_gold"]), default=len(shown) - 1)
        gold_dropped += int(shown[idx]["is_gold"])
        shown.pop(idx)
        dropped += 1


def _pool_shown(row: Mapping[str, Any], kept_ids: Mapping[str, Sequence[str]] | None, k: int) -> list[Any]:
    """The candidates stage 2 sees for ``row``, best first: the stage-1 filter's kept ones, or without a filter gold +
    first distractors up to k. Empty when the filter has no scores for the question, or only ids the pool lacks
    (scores from another build of the pool: stale)."""
    if kept_ids is None:
        return _default_shown(row, k)
    by_id = {c["id"]: c for c in row["candidates"]}
    return [by_id[i] for i in kept_ids.get(row["guid"], ()) if i in by_id]


def _stage2_row(row: Mapping[str, Any], ordered: Sequence[Mapping[str, Any]], messages: list[dict[str, Any]],
                images: list[Any]) -> dict[str, Any]:
    """One list-wise GRPO row (docs/CONTRACTS.md): short ids follow the shown order, gold ids are short ids."""
    sids = prompts.short_ids(len(ordered))
    return {
        "prompt": messages,
        "images": images,
        "candidate_ids": sids,
        "gold_ids": [sid for sid, c in zip(sids, ordered) if c["is_gold"]],
        "source_ids": [c["id"] for c in ordered],
        "answer": row["answer"],
        "keywords": row.get("keywords", "") or "",
        "qcate": row["qcate"],
        # the answer reward's guards read the question's options from it (else they parse it out of TRL's prompts)
        "question": row["question"],
        "guid": row["guid"],
    }


def build_stage2_dataset(
    split_ds: Iterable[Mapping[str, Any]],
    preset: Preset,
    *,
    kept_ids: Mapping[str, Sequence[str]] | None = None,
    seed: int | None = None,
    processor: Any = None,
    skip_questions_without_gold: bool = False,
) -> tuple[Any, Stage2BuildReport]:
    """List-wise GRPO rows (docs/CONTRACTS.md) and a report of what had to be shrunk or dropped.

    For each question: the candidates the stage-1 filter kept (``kept_ids[guid]``, best first) or, without a
    filter, gold + first distractors up to ``preset.stage1.k``. Images are resized to the preset's fixed square
    (same token count per image, within the pixel budget). Each prompt's length is measured with the processor
    *up front*; over ``preset.stage2.max_prompt_tokens`` the lowest-ranked distractors go first, then gold
    candidates, then the row —
    a prompt is never cut through its image tokens. Each question yields ``preset.stage2.permutations`` copies in
    different orders (``prompts.permutations``), short ids ``D1..Dk`` following the shown order, so ``gold_ids``
    are the short ids of the gold candidates *after* the permutation. Rows are capped at ``max_examples``.

    A question whose shown candidates hold no gold (the filter missed them all) has ``gold_ids == []``: every
    readable sources list then earns ranking reward 0, so it carries no ranking signal, but its answer reward still
    teaches. It is kept by default and counted (``report.questions_without_gold``); ``skip_questions_without_gold``
    drops it instead (training the ranking only on questions where it can be learned).
    """
    from datasets import Dataset

    from .modeling import load_processor, prompt_token_count

    if processor is None:
        processor = load_processor(preset)
    s = preset.stage2
    k = preset.stage1.k
    base_seed = preset.seed if seed is None else seed
    split_ds = one_split(split_ds, "build_stage2_dataset")
    report = Stage2BuildReport(max_prompt_tokens=s.max_prompt_tokens, max_examples=s.max_examples,
                               split_questions=len(split_ds) if hasattr(split_ds, "__len__") else None)
    rows: list[dict[str, Any]] = []
    lengths: list[int] = []
    for qi, row in rows_by_guid(split_ds, None if kept_ids is None else lambda guid: bool(kept_ids.get(guid))):
        if len(rows) >= s.max_examples:
            break
        report.questions_seen += 1
        shown = _pool_shown(row, kept_ids, k) if row is not None else []
        if not shown:
            report.questions_without_kept_ids += 1
            continue
        shown = [_with_prepared_image(c, preset) for c in shown]
        fitted = _fit(row["question"], shown, processor, preset, report)
        if fitted is None:
            continue
        shown, _ = fitted
        has_gold = any(c["is_gold"] for c in shown)
        if not has_gold:
            report.questions_without_gold += 1
            if skip_questions_without_gold:
                report.questions_skipped_without_gold += 1
                continue
        report.questions_used += 1
        for order in prompts.permutations(len(shown), s.permutations, seed=base_seed * 1_000_003 + qi):
            if len(rows) >= s.max_examples:
                break
            ordered = [shown[i] for i in order]
            messages = prompts.stage2_messages(row["question"], ordered, reasoning=s.reasoning)
            images = prompts.stage2_images(ordered)
            n = prompt_token_count(processor, messages, images)
            if n > s.max_prompt_tokens:
                report.rows_dropped_too_long += 1
                continue
            rows.append(_stage2_row(row, ordered, messages, images))
            lengths.append(n)
            report.rows_without_gold += int(not has_gold)
            report.images_per_prompt_max = max(report.images_per_prompt_max, len(images))
    report.rows = len(rows)
    features = _features(2)
    if not rows:  # every question dropped: still a dataset with the contract's columns
        return Dataset.from_dict({name: [] for name in features}, features=features), report
    if lengths:
        report.prompt_tokens_max = max(lengths)
        report.prompt_tokens_mean = sum(lengths) / len(lengths)
    return Dataset.from_list(rows, features=features), report


def stage2_dataset_for_run(preset: Preset, work_dir: str | Path, train_split: Iterable[Mapping[str, Any]], *,
                           processor: Any = None, verbose: bool = True,
                           skip_questions_without_gold: bool = False) -> tuple[Any, Stage2BuildReport]:
    """A run's stage-2 training rows: pools are the top-k of the run's saved stage-1 train scores when present.

    The one place the CLI and the retrained ablations build them, so each variant sees exactly the main run's pools.
    """
    from . import scoring

    path = scoring.scores_path(work_dir, "train")
    kept = scoring.top_k(scoring.load_scores(path), preset.stage1.k) if path.is_file() else None
    if verbose:
        print(f"stage-2 pools: top-{preset.stage1.k} of the stage-1 scores in {path}" if kept is not None else
              "note: no stage-1 scores for train (run stage 1 first): stage-2 pools are built without them")
    return build_stage2_dataset(train_split, preset, kept_ids=kept, seed=preset.seed, processor=processor,
                                skip_questions_without_gold=skip_questions_without_gold)


# =============================================================================================== callbacks
def _transformers_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def plot_reward_curves(curves: Mapping[str, Sequence[tuple[int, float]]], title: str = "GRPO rewards",
                       smooth: int = 1) -> Figure:
    """One panel per reward component (total first), each separately scaled: a component can move while the total
    hides it. ``smooth`` > 1 overlays a running mean over that many logged steps (sampled rewards are noisy)."""
    import matplotlib.pyplot as plt

    names = sorted((n for n in curves if curves[n]), key=lambda n: (n != REWARD_KEY, n))  # nothing logged yet: no panel
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*curves[name])
        ax.plot(steps, values, marker=".", lw=1, alpha=0.6 if smooth > 1 else 1.0)
        if smooth > 1 and len(values) >= smooth:
            run = [sum(values[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(values))]
            ax.plot(steps[smooth - 1:], run, lw=2, label=f"mean of {smooth}")
            ax.legend(fontsize=7)
        ax.set_title("total (weighted)" if name == REWARD_KEY else name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class RewardCurveCallback(_transformers_callback_base()):  # type: ignore[misc]
    """Records the total and per-component mean rewards at every log, and can live-plot them in a notebook.

    ``curves`` maps ``"reward"`` and each component name (``format``, ``relevance``, ...) to ``[(step, value)]``.
    With ``live=True`` (in IPython) one figure with one panel per curve is redrawn every ``plot_every`` logs.
    """

    def __init__(self, *, live: bool = False, plot_every: int = 1, title: str = "GRPO rewards") -> None:
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.live = live
        self.plot_every = max(1, plot_every)
        self.title = title
        self._n_logs = 0
        self._handle: Any = None

    @staticmethod
    def components(logs: Mapping[str, Any]) -> dict[str, float]:
        """``{"reward": total, "<name>": mean}`` read from one TRL log entry."""
        out: dict[str, float] = {}
        if isinstance(logs.get(REWARD_KEY), (int, float)):
            out[REWARD_KEY] = float(logs[REWARD_KEY])
        for key, value in logs.items():
            if key.startswith(COMPONENT_PREFIX) and key.endswith(COMPONENT_SUFFIX) and isinstance(value, (int, float)):
                out[key[len(COMPONENT_PREFIX):-len(COMPONENT_SUFFIX)]] = float(value)
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any) -> None:
        values = self.components(logs or {})
        if not values:
            return
        for name, value in values.items():
            self.curves.setdefault(name, []).append((int(state.global_step), value))
        self._n_logs += 1
        if self.live and self._n_logs % self.plot_every == 0:
            self._redraw()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.live and self.curves:
            self._redraw()

    def figure(self) -> Figure:
        """A matplotlib figure with one panel per curve (total first), for a notebook or a report."""
        return plot_reward_curves(self.curves, title=self.title)

    def _redraw(self) -> None:
        try:
            import matplotlib.pyplot as plt
            from IPython.display import display
        except ImportError:  # pragma: no cover - live plots are a notebook nicety
            return
        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)


def curves_from_history(log_history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"reward": [(step, mean)], "<component>": [...]}`` from a trainer's log history, read entry by entry exactly
    as the live ``RewardCurveCallback`` reads each log (entries without a step are skipped)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if entry.get("step") is None:
            continue
        for name, value in RewardCurveCallback.components(entry).items():
            curves.setdefault(name, []).append((int(entry["step"]), value))
    return curves


class CudaMemoryCallback(_transformers_callback_base()):  # type: ignore[misc]
    """On CUDA: a banner with the device at the start, and the peak memory of each step in the log history.

    ``memory/peak_gb`` is what tensors held at most (``max_memory_allocated``); ``memory/reserved_gb`` what PyTorch's
    caching allocator held from the card (``max_memory_reserved``: what nvidia-smi shows and what runs out first).
    With the preset's ``expected_memory_gb`` the banner also says what a step may take, and warns when the card is
    smaller: an explicitly chosen preset is not checked against the card the way ``preset="auto"`` is.
    """

    def __init__(self, expected_gb: float | None = None) -> None:
        self.peaks_gb: list[tuple[float, float]] = []
        self.expected_gb = expected_gb

    def banner(self, name: str, total_gb: float) -> str:
        text = f"[memory] {name}: {total_gb:.1f} GiB"
        if self.expected_gb is not None:
            text += f"; this preset's steps are estimated to need up to ~{self.expected_gb:g} GiB (expected_memory_gb)"
        text += "; peak memory is logged as memory/peak_gb (tensors) and memory/reserved_gb (allocator)"
        if self.expected_gb is not None and total_gb < self.expected_gb:
            text += ("\n[memory] warning: this card is smaller than the preset's estimate, so long prompts may run "
                     "out of memory; lower stage2.max_prompt_tokens, stage1.k, model.image_size or "
                     "stage{1,2}.grpo.per_device_train_batch_size through overrides, or pick a smaller preset")
        return text

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(self.banner(p.name, p.total_memory / 2**30))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        if torch.cuda.is_available():
            self.peaks_gb.append((torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30))

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any) -> None:
        if self.peaks_gb and state.log_history:
            state.log_history[-1]["memory/peak_gb"] = round(max(a for a, _ in self.peaks_gb), 3)
            state.log_history[-1]["memory/reserved_gb"] = round(max(r for _, r in self.peaks_gb), 3)
            self.peaks_gb.clear()


def _quiet_progress_callback():
    """transformers' tqdm progress bar, without printing every log dict under it (the reward plot shows them)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgressCallback(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any) -> None:
            if self.training_bar is not None and logs and REWARD_KEY in logs:
                self.training_bar.set_postfix(reward=f"{logs[REWARD_KEY]:.3f}", refresh=False)

    return QuietProgressCallback


# =============================================================================================== training
@dataclass
class TrainResult:
    """What a training run produced: where the adapter is, the log history, and the reward trend."""

    stage: int
    output_dir: Path
    adapter_dir: Path
    global_step: int
    seconds: float
    log_history: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    first_reward: float | None = None  # mean reward over the first REWARD_WINDOW_FRACTION of logged steps
    last_reward: float | None = None  # ... and over the last
    model: Any = field(default=None, repr=False)  # the trained PeftModel, still in memory (for scoring right away)
    processor: Any = field(default=None, repr=False)
    note: str = ""  # e.g. why nothing was trained (a resumed run that had already reached max_steps)
    resumed_from_step: int = 0  # the checkpoint's step when this run continued one (0: trained from the start)

    def summary(self) -> str:
        trend = (f"mean reward first {self.first_reward:.3f} -> last {self.last_reward:.3f}"
                 if self.first_reward is not None and self.last_reward is not None else "no reward logged")
        if self.note:
            return f"stage {self.stage}: nothing trained; {trend}; adapter kept in {self.adapter_dir} ({self.note})"
        steps = (f"steps {self.resumed_from_step + 1}-{self.global_step} (resumed at step {self.resumed_from_step})"
                 if self.resumed_from_step else f"{self.global_step} steps")
        return f"stage {self.stage}: {steps} in {self.seconds:.1f}s; {trend}; adapter saved to {self.adapter_dir}"


def reward_trend(log_history: Sequence[Mapping[str, Any]], fraction: float = REWARD_WINDOW_FRACTION,
                 key: str = REWARD_KEY) -> tuple[float | None, float | None]:
    """Mean logged ``key`` (default: the total reward) over the first and last ``fraction`` of steps (at least one
    step each): a window, because one GRPO step's mean reward is noisy."""
    values = [float(e[key]) for e in log_history if isinstance(e.get(key), (int, float))]
    if not values:
        return None, None
    w = max(1, math.ceil(len(values) * fraction))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def component_trends(log_history: Sequence[Mapping[str, Any]],
                     fraction: float = REWARD_WINDOW_FRACTION) -> dict[str, tuple[float, float]]:
    """``reward_trend`` of every reward component TRL logged (``rewards/<name>/mean``) and of the total:
    which component moved is the question a rising total cannot answer."""
    names = list(dict.fromkeys(k[len(COMPONENT_PREFIX):-len(COMPONENT_SUFFIX)] for e in log_history for k in e
                               if k.startswith(COMPONENT_PREFIX) and k.endswith(COMPONENT_SUFFIX)))
    out: dict[str, tuple[float, float]] = {}
    for name in [*names, "total"]:
        key = REWARD_KEY if name == "total" else f"{COMPONENT_PREFIX}{name}{COMPONENT_SUFFIX}"
        first, last = reward_trend(log_history, fraction, key)
        if first is not None and last is not None:
            out[name] = (first, last)
    return out


# What TRL logs beside the rewards that says why a curve may not move: a group whose completions all earn one reward
# has no advantage, so it teaches nothing; a completion cut at max_completion_length misses its closing tags.
GRPO_DIAGNOSTICS = {
    "frac_reward_zero_std": ("no signal", "share of groups whose completions all earned one reward: no gradient"),
    "completions/clipped_ratio": ("cut off", "share of completions cut at max_completion_length"),
}


def describe_trends(log_history: Sequence[Mapping[str, Any]], fraction: float = REWARD_WINDOW_FRACTION) -> str:
    """``component_trends`` as lines a notebook prints under its reward curves, then ``GRPO_DIAGNOSTICS``'s."""
    trends = component_trends(log_history, fraction)
    if not trends:
        return "no reward logged"
    lines = [f"{name:>10}: first {first:.3f} -> last {last:.3f}" for name, (first, last) in trends.items()]
    lines.append(f"(means over the first / last {fraction:.0%} of logged steps)")
    for key, (label, meaning) in GRPO_DIAGNOSTICS.items():
        first, last = reward_trend(log_history, fraction, key)
        if first is not None and last is not None:
            lines.append(f"{label:>10}: first {first:.3f} -> last {last:.3f}  ({meaning})")
    return "\n".join(lines)


def load_log_history(work_dir: str | Path, stage: int) -> list[dict[str, Any]]:
    """A run's saved ``stage{N}/log_history.json``; ``[]`` when that stage was never trained (or the file is unreadable)."""
    try:
        return json.loads((Path(work_dir) / f"stage{stage}" / "log_history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder of a run, or None.

    transformers writes ``trainer_state.json`` last: a run killed while saving (or a full disk) leaves a newer
    folder without it, which resuming cannot read. That one is skipped, with a warning, for the one before it.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    skipped = []
    for folder in sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True):
        if checkpoint_step(folder) is not None:
            if skipped:
                warnings.warn(f"{', '.join(skipped)} in {output_dir} is incomplete (no readable trainer_state.json: cut "
                              f"off while saving?): resuming from {folder.name}", stacklevel=2)
            return folder
        skipped.append(folder.name)
    if skipped:
        warnings.warn(f"{', '.join(skipped)} in {output_dir}: no complete checkpoint (no readable trainer_state.json: "
                      "cut off while saving?), so nothing to resume from", stacklevel=2)
    return None


def keep_trainable_in_float32(model: Any) -> int:
    """Cast every trainable floating-point parameter (the LoRA A/B matrices) to float32; returns how many moved.

    Why: ``GRPOTrainer.__init__`` casts the trainable parameters of a 4-bit model to bfloat16 (TRL follows the
    QLoRA paper, whose learning rates were ~1e-4 and above). That hurts here, two ways:

    * at the GPU presets' learning rate 1e-5 an Adam step (~lr per entry) is below half a bf16 ulp of most
      ``lora_A`` entries (|w| ~ 1e-2, ulp ~ 6e-5), so ~85 % of those updates round away to nothing;
    * ``colab-t4`` computes in float16 on a card without bf16, and its fp16 ``GradScaler`` expects fp32 master
      weights;

    A resumed run is built the same way, so it goes on in float32 too: ``Trainer`` reloads the checkpoint with PEFT's
    ``load_adapter``, which copies the saved weights into the existing parameters and keeps their dtype.

    Standard QLoRA keeps the few adapter weights in float32 (a 2B model's LoRA is ~1 % of its memory) and computes
    in the compute dtype: PEFT's LoRA layers cast their input to the adapter's dtype and the result back to the
    base layer's, and under mixed precision the matmuls run in fp16/bf16 anyway. Call it after ``GRPOTrainer`` is
    built and before ``train()`` creates the optimizer (it is built from these very parameters).
    """
    import torch

    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    return moved


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The ``global_step`` a checkpoint was saved at (its ``trainer_state.json``), or None when unreadable."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _restore_finished(trainer: Any, checkpoint: str) -> list[dict[str, Any]]:
    """Put a finished run's checkpoint into ``trainer`` without training: its LoRA weights and its log history.

    Why not ``trainer.train(resume_from_checkpoint=...)``: transformers' loop runs one step before it checks
    ``max_steps``, so resuming a run that already reached it trains a step too many and overwrites the adapter.
    The weights are copied into the existing (float32) parameters, so ``TrainResult.model`` is the trained model.
    """
    from transformers import TrainerState

    _load_adapter_weights(trainer.model, checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return list(trainer.state.log_history)


def _load_adapter_weights(model: Any, folder: str | Path) -> None:
    """Copy a saved adapter's weights into ``model``'s active adapter, exactly (float32 kept), or refuse a mismatch.

    Only the active adapter's keys count: with ``beta > 0`` TRL adds a frozen ``ref`` adapter the file never holds.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    name = getattr(model, "active_adapter", "default")
    try:
        loaded = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"), adapter_name=name)
    except RuntimeError as exc:  # another LoRA rank: torch refuses the shapes even with strict=False
        if "size mismatch" not in str(exc):
            raise
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line and "copying" in line), str(exc))
        raise ValueError(f"{folder} does not fit this model's adapter ({detail[:300]}): was it trained with another "
                         "preset's LoRA rank or target modules?") from None
    missing = [k for k in loaded.missing_keys if "lora_" in k and f".{name}." in k]  # base weights: never in the file
    if loaded.unexpected_keys or missing:  # another LoRA layout (rank, targets) than this preset's: never half-load
        odd = loaded.unexpected_keys[:3] or missing[:3]
        raise ValueError(f"{folder} does not fit this model's adapter ({'unexpected' if loaded.unexpected_keys else 'missing'} "
                         f"{odd}...): was it trained with another preset's LoRA rank or target modules?")
    keep_trainable_in_float32(model)


def _trainable_copy(model: Any) -> dict[str, Any]:
    """The trainable parameters (an adapter a run continues from), copied to the CPU in float32."""
    import torch

    return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _restore_trainable(model: Any, copies: Mapping[str, Any]) -> None:
    """Put ``_trainable_copy``'s weights back, exactly and in float32, into the same parameters."""
    params = dict(model.named_parameters())
    lost = sorted(set(copies) - set(params))
    if lost:  # GRPOTrainer renamed or replaced the model's parameters: not what TRL does today
        raise RuntimeError(f"GRPOTrainer changed the model's trainable parameters ({lost[:3]}...): cannot restore them")
    for name, saved in copies.items():
        params[name].data = saved.to(params[name].device)


def build_trainer(
    preset: Preset,
    stage: int,
    dataset: Any,
    output_dir: str | Path,
    *,
    model: Any = None,
    processor: Any = None,
    init_adapter: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    max_steps: int | None = None,
    live_plot: bool = False,
    plot_title: str | None = None,
    quiet_progress: bool = True,
) -> tuple[Any, RewardCurveCallback]:
    """A ``GRPOTrainer`` for one stage: model + processor from ``modeling``, LoRA from the preset, rewards by rule.

    With ``init_adapter`` the model continues from a saved (trainable) adapter instead of a fresh LoRA; a ``model``
    passed in comes with its processor and already carries whatever adapter it should continue from; both get the
    loader's fixes (TRL hands a text-only prompt's images as ``None``: ``prepare_processor``, left padding too). The
    LoRA weights are trained in float32 whatever the compute dtype (``keep_trainable_in_float32``). The trainer
    carries one ``RewardCurveCallback`` (returned with it); ``plot_title`` names its figure.
    """
    from transformers.trainer_callback import ProgressCallback
    from trl import GRPOTrainer

    from .modeling import (
        freeze_vision_tower,
        load_model_and_processor,
        lora_config,
        make_model_mixed_batch_safe,
        prepare_processor,
    )

    if (model is None) != (processor is None):
        raise ValueError("pass model and processor together (or neither, to load both from the preset)")
    if model is not None and init_adapter is not None:
        raise ValueError("init_adapter is loaded only with the preset's model: load the adapter onto the model you "
                         "pass (modeling.load_model_and_processor(..., adapter_path=...)) or pass no model")
    if model is None or processor is None:
        model, processor = load_model_and_processor(preset, adapter_path=init_adapter, for_training=True)
        peft_config = None if init_adapter is not None else lora_config(preset)
    else:
        peft_config = None if hasattr(model, "peft_config") else lora_config(preset)
    make_model_mixed_batch_safe(model)  # a model passed in may come from elsewhere (idempotent)
    prepare_processor(processor)  # the same for its processor: mixed text/image batches, left padding (idempotent)
    if preset.lora.freeze_vision:
        freeze_vision_tower(model)  # the same: no vision backward under gradient checkpointing (idempotent)
    funcs, _ = reward_funcs_for(preset, stage)
    args = grpo_config(preset, stage, output_dir, max_steps=max_steps)
    curve = RewardCurveCallback(live=live_plot, title=plot_title or f"stage {stage} GRPO rewards ({preset.name})")
    carried = _trainable_copy(model) if peft_config is None else {}  # the adapter the model continues from
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[curve, CudaMemoryCallback(preset.expected_memory_gb), *callbacks],
    )
    keep_trainable_in_float32(trainer.model)  # undo TRL's bf16 cast of a 4-bit model's LoRA (see its docstring)
    _restore_trainable(trainer.model, carried)  # that cast rounded the adapter continued from: its exact weights back
    if quiet_progress and any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        # a terminal: tqdm, without the log dicts. In a notebook transformers shows its own table instead, which is
        # saved in its final state with the notebook; a second (tqdm widget) bar would only duplicate it.
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_quiet_progress_callback())
    return trainer, curve


RUN_SETTINGS_FILE = "preset.json"  # in stage{N}/: the preset a run started with, for resume's comparison
# preset fields a resumed run may change without changing what it trains (the step bound is what resume extends)
_FREE_ON_RESUME = ("name", "description", "expected_memory_gb", "expected_seconds_per_step", "measured", "evaluation.")


def changed_on_resume(saved: Mapping[str, Any], preset: Preset, stage: int) -> dict[str, tuple[Any, Any]]:
    """Settings of ``stage`` that differ between the run's saved preset and the one resuming it.

    Why: GRPO continues from the checkpoint's step and optimizer state whatever the new settings say, so a changed
    learning rate or reward weight silently makes one run of two recipes. Other stages' settings do not count (stage
    2's pool size, ``stage1.k``, does), nor the step bound, checkpoint interval and estimates.
    """
    other = "stage2." if stage == 1 else "stage1."
    free = (*_FREE_ON_RESUME, f"stage{stage}.grpo.max_steps", f"stage{stage}.grpo.save_steps")

    def counts(key: str) -> bool:
        if stage == 2 and key == "stage1.k":
            return True
        return not key.startswith(other) and not any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)

    return {k: v for k, v in setting_changes(saved, preset.to_dict()).items() if counts(k)}


def _check_resume_settings(out: Path, preset: Preset, stage: int, checkpoint: str) -> None:
    """Warn, naming each change, when a run resumes with other settings than it started with."""
    try:
        saved = json.loads((out / RUN_SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a run from before the file existed, or a damaged one: nothing to compare
        return
    changes = changed_on_resume(saved, preset, stage)
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        warnings.warn(f"resuming {Path(checkpoint).name} with other settings than the run started with "
                      f"({out / RUN_SETTINGS_FILE}): {listed}. Training continues from the checkpoint's step and "
                      "optimizer state under the new values; to train with them from the start, run without resume "
                      "(which replaces this run's checkpoints).", UserWarning, stacklevel=4)


def _lr_at(args: Any, step: int, total: int) -> float | None:
    """The learning rate ``args``' scheduler (transformers' ``get_scheduler``, as ``Trainer`` builds it) gives at
    ``step`` of a ``total``-step run; None for a scheduler without a per-step factor."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    factors = getattr(scheduler, "lr_lambdas", None)
    return float(args.learning_rate * factors[0](step)) if factors else None


def _check_resume_schedule(args: Any, checkpoint: str) -> str | None:
    """Warn (and return the message) when a run resumes with another ``max_steps`` than its checkpoint was planned for.

    Why: the learning rate decays linearly to 0 over ``max_steps`` (transformers' default schedule; the presets set
    none), and a checkpoint saves the scheduler's step, not its length: resumed with a new ``max_steps``, the schedule
    is recomputed over the new total from the saved step. Extending a finished 300-step run to 600 steps restarts at
    half the peak rate and decays again; the result is neither the old run nor a 600-step one.
    """
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        planned, step = int(state["max_steps"]), int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):  # no state to compare with: nothing to say
        return None
    total = int(args.max_steps)
    if planned == total or step >= total:
        return None
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    before, after = _lr_at(args, step, planned), _lr_at(args, step, total)
    rates = (f" (the learning rate at step {step} goes from {before:.3g} to {after:.3g})"
             if before is not None and after is not None else "")
    msg = (f"resuming {Path(checkpoint).name} of a run planned for max_steps={planned} with max_steps={total}: a "
           f"checkpoint holds no learning-rate schedule, so the {kind} schedule is recomputed over {total} steps "
           f"from step {step}{rates}. The {step} step(s) already trained followed the old plan; for one schedule over "
           f"all {total} steps, train from the start (no resume).")
    warnings.warn(msg, UserWarning, stacklevel=4)
    return msg


def _refuse_less_than_one_batch(trainer: Any, dataset: Any, stage: int) -> None:
    """TRL's sampler drops a partial generation batch, so fewer rows than one batch's prompts train nothing at all
    (transformers only warns at step 0), and stage 2 would then save stage 1's adapter as its own."""
    args = trainer.args
    needed = args.generation_batch_size // args.num_generations
    if len(dataset) < needed:
        raise ValueError(
            f"the stage-{stage} training set has {len(dataset)} row(s); one generation batch takes {needed} distinct "
            f"prompts (generation batch {args.generation_batch_size} / {args.num_generations} generations) and TRL "
            f"drops a partial batch, so nothing would train. Build more rows (more questions, stage{stage}.max_examples"
            f"{', stage2.permutations' if stage == 2 else ''}) or lower stage{stage}.grpo.per_device_train_batch_size")


def _clear_stale_checkpoints(out: Path, *, verbose: bool) -> None:
    """A fresh run replaces the folder's earlier run: delete its ``checkpoint-*``. Left there, a later ``resume``
    would take the newest step number, which can be the old run's (rotation removes old checkpoints only after the
    new run has saved twice), and silently continue or "finish" the wrong run."""
    if not is_main_process():  # one writer under `accelerate launch`; a fresh run's processes never read them
        return
    stale = [p for p in out.glob("checkpoint-*") if p.is_dir()]
    for folder in stale:
        shutil.rmtree(folder)
    if stale and verbose:
        print(f"a fresh run: removed {len(stale)} checkpoint(s) of an earlier run in {out} (resume=True continues a run)")


def _train(stage: int, preset: Preset, dataset: Any, work_dir: str | Path, *, init_adapter: str | Path | None,
           resume: bool | str | Path, callbacks: Sequence[Any], max_steps: int | None, live_plot: bool,
           plot_title: str | None, model: Any, processor: Any, verbose: bool) -> TrainResult:
    if len(dataset) == 0:  # GRPOTrainer would stop at step 0 and save an untrained adapter as if it had trained
        raise ValueError(f"the stage-{stage} training set is empty: nothing to train on. For stage 2, read the build "
                         "report (too-long prompts dropped? stale stage-1 scores whose guids no longer match?)")
    if isinstance(resume, (str, Path)) and checkpoint_step(resume) is None:  # before a model is loaded for nothing
        raise ValueError(f"{resume} has no readable trainer_state.json (cut off while saving?): resume from an earlier "
                         "checkpoint, or with resume=True, which picks the newest complete one")
    out = Path(work_dir) / f"stage{stage}"
    out.mkdir(parents=True, exist_ok=True)
    trainer, curve = build_trainer(preset, stage, dataset, out, model=model, processor=processor,
                                   init_adapter=init_adapter, callbacks=callbacks, max_steps=max_steps,
                                   live_plot=live_plot, plot_title=plot_title)
    _refuse_less_than_one_batch(trainer, dataset, stage)  # before anything of an earlier run is deleted
    if not resume:
        _clear_stale_checkpoints(out, verbose=verbose)
    checkpoint: str | None = None
    done_step: int | None = None
    note = ""
    if resume:
        found = Path(resume) if isinstance(resume, (str, Path)) else last_checkpoint(out)
        checkpoint = str(found) if found else None
        done_step = checkpoint_step(checkpoint) if checkpoint else None
        if done_step is not None and done_step >= trainer.args.max_steps:
            note = (f"{Path(checkpoint).name} already reached max_steps={trainer.args.max_steps}: nothing trained, "
                    "the checkpoint's adapter is restored (raise max_steps to train further)")
        if checkpoint:
            _check_resume_settings(out, preset, stage, checkpoint)
            if not note:  # training continues: say how a changed step bound changes the learning-rate schedule
                _check_resume_schedule(trainer.args, checkpoint)
        if verbose and not note:  # a finished run's note is in the summary printed below
            print(f"resuming from {checkpoint}" if checkpoint else f"no checkpoint in {out}: starting fresh")
    if checkpoint is None and is_main_process():  # a run from its start: what a later resume compares against
        write_json_atomic(out / RUN_SETTINGS_FILE, preset.to_dict(), indent=1)
    adapter_dir = out / "adapter"
    t0 = time.perf_counter()
    if note:  # a finished run: train() would take one step past max_steps and overwrite the adapter
        history = _restore_finished(trainer, checkpoint)
        saved = load_log_history(work_dir, stage)
        if saved and saved[-1].get("step") == done_step:  # this run's own log, which ends with its summary
            history = saved
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
        history = list(trainer.state.log_history)
        if trainer.state.global_step <= (done_step or 0):  # transformers only warns; the adapter would be untrained
            raise RuntimeError(f"stage {stage} trained no step (global_step {trainer.state.global_step}): the data "
                               f"loader yielded no batch; the adapter in {adapter_dir} was not written")
    curve.curves = curves_from_history(history)  # every step of the run, also those before a resume
    seconds = time.perf_counter() - t0
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`; the other processes wait below
        # Written on the finished path too: the folder's adapter and log may be an earlier run's (a fresh run
        # replaces them only when it ends) or missing (killed after its last checkpoint, before writing them).
        with atomic_dir(adapter_dir) as tmp:  # a crash never leaves half an adapter
            trainer.model.save_pretrained(str(tmp))
        write_json_atomic(out / "log_history.json", history, indent=1, default=str)
    trainer.accelerator.wait_for_everyone()
    first, last = reward_trend(history)
    result = TrainResult(stage=stage, output_dir=out, adapter_dir=adapter_dir, global_step=trainer.state.global_step,
                         seconds=seconds, log_history=history, curves=curve.curves, first_reward=first,
                         last_reward=last, model=trainer.model, processor=trainer.processing_class, note=note,
                         resumed_from_step=0 if note else (done_step or 0))
    if verbose:
        print(result.summary())
    return result


def train_stage1(
    preset: Preset,
    dataset: Any,
    work_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    callbacks: Sequence[Any] = (),
    max_steps: int | None = None,
    live_plot: bool = False,
    plot_title: str | None = None,
    model: Any = None,
    processor: Any = None,
    verbose: bool = True,
) -> TrainResult:
    """Stage 1: GRPO on point-wise rows; saves ``<work_dir>/stage1/adapter/`` and ``log_history.json``.

    ``resume=True`` continues from the newest ``stage1/checkpoint-*`` (or a given checkpoint path; a fresh run first
    removes the checkpoints an earlier run left in the folder, so they are always this run's); ``max_steps``
    overrides the preset's bound (the total step count, so resuming to a larger value trains the difference, under
    a learning-rate schedule recomputed over the new total: the linear decay restarts from the rate the new total
    gives at the saved step, and a ``UserWarning`` says so; resuming a run whose checkpoint already reached it trains
    nothing and keeps the saved adapter, ``result.note``).
    """
    return _train(1, preset, dataset, work_dir, init_adapter=None, resume=resume, callbacks=callbacks,
                  max_steps=max_steps, live_plot=live_plot, plot_title=plot_title, model=model, processor=processor,
                  verbose=verbose)


SHORT_STAGE1_FRACTION = 6  # a stand-in stage 1 runs 1/6 of the preset's steps (at least 2): weaker, and minutes on CPU


def ensure_stage1_adapter(preset: Preset, train_split: Iterable[Mapping[str, Any]], work_dir: str | Path, *,
                          short_if_missing: bool | None = None, verbose: bool = True) -> Path:
    """The run's stage-1 adapter, trained short (``SHORT_STAGE1_FRACTION`` of the steps) when it is missing.

    ``short_if_missing=None`` trains the stand-in on the miniature only: on a GPU preset even a short stage 1 costs
    most of an hour, and a missing adapter there usually means the run folder was left behind (Colab without Drive),
    so it refuses with the fix instead. ``True`` trains it anyway, ``False`` always refuses.
    """
    path = Path(work_dir) / "stage1" / "adapter"
    if is_adapter_dir(path):
        return path
    short = max(2, preset.stage1.grpo.max_steps // SHORT_STAGE1_FRACTION)
    if not (preset.model.is_miniature if short_if_missing is None else short_if_missing):
        raise FileNotFoundError(
            f"no stage-1 adapter in {path} (no adapter_config.json). Stage 2's pools are the stage-1 top-k: run notebook "
            "03 first with the same preset and run folder. On Colab each notebook runs on a fresh machine, so the run "
            "folder must be on Google Drive (keep_on_drive = True in the first cell). To train a short stand-in stage 1 "
            f"here instead ({short} of {preset.stage1.grpo.max_steps} steps, about "
            f"{short * preset.expected_seconds_per_step / 60:.0f} min at the preset's per-step figure, a weaker judge), set "
            "short_stage1_if_missing = True in the parameters cell.")
    if verbose:
        print(f"note: no stage-1 adapter in {path} (notebook 03 skipped?): training a short stage 1 ({short} steps)")
    train_stage1(preset, build_stage1_dataset(train_split, preset, seed=preset.seed), work_dir, max_steps=short,
                 verbose=verbose)
    return path


def is_main_process() -> bool:
    """True on one process per job: the only one under ``accelerate launch`` that scores and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved PEFT adapter: an empty or half-written folder (a crashed save) is none."""
    return (Path(path) / "adapter_config.json").is_file()


def stage2_init_adapter(preset: Preset, work_dir: str | Path) -> Path | None:
    """The adapter stage 2 starts from: the stage-1 adapter when ``preset.stage2.init_from == "stage1"`` and it exists."""
    if preset.stage2.init_from != "stage1":
        return None
    path = Path(work_dir) / "stage1" / "adapter"
    return path if is_adapter_dir(path) else None


def train_stage2(
    preset: Preset,
    dataset: Any,
    work_dir: str | Path,
    *,
    init_adapter: str | Path | None = None,
    resume: bool | str | Path = False,
    callbacks: Sequence[Any] = (),
    max_steps: int | None = None,
    live_plot: bool = False,
    plot_title: str | None = None,
    model: Any = None,
    processor: Any = None,
    verbose: bool = True,
) -> TrainResult:
    """Stage 2: GRPO on list-wise rows; saves ``<work_dir>/stage2/adapter/`` and ``log_history.json``.

    Starts from ``init_adapter`` when given, else from the stage-1 adapter when the preset says
    ``init_from="stage1"`` (and it exists; otherwise a fresh LoRA, with a note).
    """
    if init_adapter is None and model is None:
        init_adapter = stage2_init_adapter(preset, work_dir)
        if verbose and preset.stage2.init_from == "stage1":
            print(f"stage 2 starts from {init_adapter}" if init_adapter else
                  "note: no stage-1 adapter found; stage 2 starts from a fresh LoRA on the base model")
    return _train(2, preset, dataset, work_dir, init_adapter=init_adapter, resume=resume, callbacks=callbacks,
                  max_steps=max_steps, live_plot=live_plot, plot_title=plot_title, model=model, processor=processor,
                  verbose=verbose)


__all__ = [
    "RUN_SETTINGS_FILE", "CudaMemoryCallback", "RewardCurveCallback", "Stage2BuildReport", "TrainResult",
    "build_stage1_dataset", "build_stage2_dataset", "build_trainer", "changed_on_resume", "checkpoint_step",
    "component_trends", "curves_from_history",
    "describe_trends", "ensure_stage1_adapter", "grpo_config", "grpo_config_kwargs", "is_adapter_dir", "is_main_process", "keep_trainable_in_float32",
    "last_checkpoint", "load_log_history", "plot_reward_curves",
    "reward_funcs_for", "reward_trend", "stage2_dataset_for_run", "stage2_init_adapter", "train_stage1",
    "train_stage2",
]
