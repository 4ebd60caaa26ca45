"""Tests of mmrag_lite.training: the stage-1/stage-2 GRPO datasets and the GRPOTrainer wiring.

Training tests run a *cold* miniature (built in a temp folder, no warm-up) with tiny batches and 1-3 steps: they
check the plumbing (LoRA weights move, adapters and logs land where docs/CONTRACTS.md says, resume works), not
learning. The data are a hand-made Mini-WebQA fixture, so nothing here depends on the synthetic world.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from mmrag_lite import data, modeling, prompts, training
from mmrag_lite.config import get_preset

PRESET = get_preset("cpu-tiny")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small GRPO batches for speed: 2 prompts x 4 generations, a few tokens; still a mixed text/image batch.
FAST = {
    "stage1.grpo.per_device_train_batch_size": 8, "stage1.grpo.num_generations": 4,
    "stage1.grpo.max_completion_length": 6, "stage1.grpo.save_steps": 1,
    "stage2.grpo.per_device_train_batch_size": 4, "stage2.grpo.num_generations": 4,
    "stage2.grpo.max_completion_length": 10,
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 30)}


def mini_rows(n: int = 12, pool: int = 6) -> list[dict]:
    """Hand-made Mini-WebQA rows: image and text questions, 1-2 gold per pool, images of varying sizes."""
    rows = []
    for q in range(n):
        image_q = q % 2 == 0
        colour = list(COLOURS)[q % 3]
        n_gold = 1 + q % 2
        cands = []
        for j in range(pool):
            gold = j < n_gold
            if (j % 2 == 0) == image_q or j == 0:
                cands.append({"id": str(3_000_000 + 100 * q + j), "modality": "image", "title": f"place {q}-{j}",
                              "text": f"A {colour} building.", "image": Image.new("RGB", (40 + j, 30 + q), COLOURS[colour]),
                              "is_gold": gold})
            else:
                cands.append({"id": f"g{q}_{j}", "modality": "text", "title": f"place {q}-{j}",
                              "text": f"Built in {1900 + j}.", "image": None, "is_gold": gold})
        rows.append({"guid": f"g{q}", "question": f"What colour is place {q}?", "answer": colour, "keywords": colour,
                     "qcate": "color" if image_q else "text", "topic": "t", "candidates": cands,
                     "gold_ids": [c["id"] for c in cands if c["is_gold"]]})
    return rows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modeling.build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "tiny-vlm")


def _load(tiny_dir: Path, adapter: Path | None = None):
    return modeling.load_model_and_processor(PRESET, model_path=tiny_dir, adapter_path=adapter, for_training=True)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    return _load(tiny_dir)[1]


# ------------------------------------------------------------------------------------------------ config
def test_grpo_config_kwargs_follow_the_preset(tmp_path: Path) -> None:
    from trl import GRPOConfig

    kw = training.grpo_config_kwargs(PRESET, 1)  # two positional arguments: the API-drift test's call
    g = PRESET.stage1.grpo
    assert kw["use_cpu"] and not kw["bf16"] and not kw["fp16"]
    assert kw["report_to"] == [] and kw["remove_unused_columns"] is False and kw["logging_steps"] == 1
    assert (kw["max_steps"], kw["num_generations"], kw["learning_rate"]) == (g.max_steps, g.num_generations, g.learning_rate)
    assert kw["reward_weights"] == [PRESET.stage1.weights["format"], PRESET.stage1.weights["relevance"]]
    assert training.grpo_config_kwargs(PRESET, 2)["reward_weights"] == [PRESET.stage2.weights[c] for c in ("format", "ranking", "answer")]
    assert training.grpo_config_kwargs(PRESET, 1, tmp_path, max_steps=3)["max_steps"] == 3
    t4 = training.grpo_config_kwargs(get_preset("colab-t4"), 1)
    a100 = training.grpo_config_kwargs(get_preset("a100"), 2)
    assert t4["fp16"] and not t4["bf16"] and not t4["use_cpu"] and a100["bf16"] and not a100["fp16"]
    cfg = GRPOConfig(**{**kw, "output_dir": str(tmp_path)})
    assert cfg.use_cpu and cfg.save_steps == g.save_steps
    with pytest.raises(ValueError):
        training.grpo_config_kwargs(PRESET, 3)


@pytest.mark.parametrize("stage", [1, 2])
def test_every_grpo_knob_of_the_preset_reaches_the_config(stage: int) -> None:
    """A knob set through the preset or ``--set`` (beta, temperature, ...) must reach GRPOConfig, not be dropped:
    the values differ from TRL's defaults and from each other, so a hard-coded one cannot pass."""
    import dataclasses

    from mmrag_lite.config import GRPOSettings

    at = f"stage{stage}.grpo"
    p = PRESET.with_overrides(**{f"{at}.beta": 0.123, f"{at}.temperature": 0.7, f"{at}.loss_type": "grpo",
                                 f"{at}.max_completion_length": 17, f"{at}.gradient_accumulation_steps": 3,
                                 f"{at}.logging_steps": 2, f"{at}.save_steps": 7})
    g = (p.stage1 if stage == 1 else p.stage2).grpo
    kw = training.grpo_config_kwargs(p, stage)
    for f in dataclasses.fields(GRPOSettings):
        assert kw[f.name] == getattr(g, f.name), f.name


@pytest.mark.parametrize("name", ["cpu-tiny", "colab-t4", "l4", "a100"])
def test_grpo_samples_and_scores_without_dropout(name: str, tmp_path: Path) -> None:
    """TRL samples completions in train mode: LoRA dropout (0.05 on the GPU presets) would perturb the sampling
    policy and the log-probs of its own samples (trl#3000). TRL's switch zeroes every nn.Dropout, LoRA's included."""
    kw = training.grpo_config_kwargs(get_preset(name), 1)
    assert kw["disable_dropout"] is True
    if name == "cpu-tiny":  # GPU configs cannot be built on a CPU box (fp16/bf16 device checks)
        from trl import GRPOConfig

        assert GRPOConfig(**{**kw, "output_dir": str(tmp_path)}).disable_dropout


def test_disabling_dropout_is_a_no_op_for_cpu_tiny_and_zeroes_lora_dropout(tiny_dir: Path, tmp_path: Path) -> None:
    """cpu-tiny's recorded results must not move: its LoRA dropout is 0 (nn.Identity) and the miniature has no
    nn.Dropout at all. With a GPU preset's LoRA dropout, the trainer's LoRA dropout layers end up at p=0."""
    from peft import get_peft_model
    from trl.trainer.utils import disable_dropout_in_model

    assert PRESET.lora.dropout == 0.0
    model, proc = _load(tiny_dir)
    model = get_peft_model(model, modeling.lora_config(PRESET))
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]  # nothing for TRL to change
    assert model.base_model.model.config.text_config.attention_dropout == 0.0  # functional, untouched by TRL anyway
    disable_dropout_in_model(model)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    dropped = PRESET.with_overrides(**FAST, **{"lora.dropout": 0.05})
    ds = training.build_stage1_dataset(mini_rows(), dropped, seed=0)
    model, proc = _load(tiny_dir)
    trainer, _ = training.build_trainer(dropped, 1, ds, tmp_path, model=model, processor=proc)
    lora = [m for n, m in trainer.model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert lora and all(m.p == 0 for m in lora)


# ------------------------------------------------------------------------------------------------ stage 1 data
def test_stage1_dataset_is_balanced_and_follows_the_contract() -> None:
    rows = mini_rows()
    ds = training.build_stage1_dataset(rows, PRESET, seed=0)
    assert set(ds.column_names) == {"prompt", "images", "label", "guid", "candidate_id", "modality"}
    counts = Counter(ds["label"])
    n_pos = sum(len(r["gold_ids"]) for r in rows)
    assert counts["yes"] == n_pos and counts["no"] == n_pos  # positive_fraction 0.5, limited by the positives
    for row in ds:
        n_parts = sum(p["type"] == "image" for m in row["prompt"] for p in m["content"])
        assert n_parts == len(row["images"]) == (1 if row["modality"] == "image" else 0)
        assert all(im.size == (PRESET.model.image_size,) * 2 for im in row["images"])
        assert row["prompt"][-1]["role"] == "user"
    capped = training.build_stage1_dataset(rows, PRESET.with_overrides(**{"stage1.max_examples": 10}), seed=0)
    assert len(capped) == 10 and Counter(capped["label"]) == {"yes": 5, "no": 5}
    skewed = training.build_stage1_dataset(rows, PRESET.with_overrides(**{"stage1.positive_fraction": 0.25}), seed=0)
    assert Counter(skewed["label"])["no"] == 3 * Counter(skewed["label"])["yes"]
    again = training.build_stage1_dataset(rows, PRESET, seed=0)
    assert again["candidate_id"] == ds["candidate_id"]  # deterministic by seed
    only_gold = [{**r, "candidates": [c for c in r["candidates"] if c["is_gold"]]} for r in rows]
    for split, counts in ((only_gold, f"{n_pos} gold and 0 distractor"), ([], "0 gold and 0 distractor")):
        with pytest.raises(ValueError, match=counts):  # not datasets' schema error that names neither
            training.build_stage1_dataset(split, PRESET, seed=0)


# ------------------------------------------------------------------------------------------------ stage 2 data
def test_stage2_dataset_permutes_and_maps_gold_short_ids(processor) -> None:
    rows = mini_rows()
    ds, report = training.build_stage2_dataset(rows, PRESET, processor=processor, seed=0)
    perms = PRESET.stage2.permutations
    assert report.rows == len(ds) == len(rows) * perms and report.questions_used == len(rows)
    by_row = {r["guid"]: r for r in rows}
    orders: dict[str, set[tuple[str, ...]]] = {}
    for ex in ds:
        src = by_row[ex["guid"]]
        k = len(ex["candidate_ids"])
        assert ex["candidate_ids"] == prompts.short_ids(k) and k == PRESET.stage1.k
        gold_src = {sid: cid for sid, cid in zip(ex["candidate_ids"], ex["source_ids"]) if cid in src["gold_ids"]}
        assert sorted(ex["gold_ids"]) == sorted(gold_src) and set(gold_src.values()) == set(src["gold_ids"])
        n_parts = sum(p["type"] == "image" for m in ex["prompt"] for p in m["content"])
        assert n_parts == len(ex["images"]) and all(im.size == (PRESET.model.image_size,) * 2 for im in ex["images"])
        assert modeling.prompt_token_count(processor, ex["prompt"], ex["images"]) <= PRESET.stage2.max_prompt_tokens
        orders.setdefault(ex["guid"], set()).add(tuple(ex["source_ids"]))
        # what the answer reward scores against during GRPO: the source row's, untouched
        assert (ex["answer"], ex["keywords"], ex["qcate"], ex["question"]) == (
            src["answer"], src["keywords"], src["qcate"], src["question"])
    assert all(len(o) == perms for o in orders.values())  # the copies really are in different orders
    assert "max_examples" not in str(report)  # every question was read
    capped = PRESET.with_overrides(**{"stage2.max_examples": 2 * perms})
    _, cap_report = training.build_stage2_dataset(rows, capped, processor=processor, seed=0)
    assert cap_report.questions_used == 2 and cap_report.split_questions == len(rows)
    assert f"read the first 2 of the split's {len(rows)} questions: max_examples={2 * perms}" in str(cap_report)


def test_stage2_rows_carry_the_question_and_the_answer_reward_is_unchanged(processor) -> None:
    """The answer reward's guards read the question's options; a ``question`` column saves parsing it from TRL's
    prompts and must give the same rewards (cpu-tiny's recorded figures depend on them)."""
    rows = mini_rows(4)
    rows[0] = {**rows[0], "question": "Is place 0 red or blue?", "qcate": "choose", "answer": "Place 0 is red.",
               "keywords": "red"}
    ds, _ = training.build_stage2_dataset(rows, PRESET, processor=processor, seed=0)
    by_guid = {r["guid"]: r["question"] for r in rows}
    assert ds["question"] == [by_guid[g] for g in ds["guid"]]
    funcs, _ = training.reward_funcs_for(PRESET, 2)
    answer = next(f for f in funcs if f.__name__ == "answer")
    think = "<think>so</think>" if PRESET.stage2.reasoning else ""
    said = ["red", "red or blue", "Is place 0 red or blue?", "blue", "green"]
    for ex in (ex for ex in ds if ex["guid"] in ("g0", "g1")):
        completions = [[{"role": "assistant", "content": f"{think}<sources>D1</sources><answer>{a}</answer>"}]
                       for a in said]
        columns = {k: [v] * len(said) for k, v in ex.items() if k not in ("prompt", "images")}
        with_column = answer(completions, prompts=[ex["prompt"]] * len(said), **columns)
        columns.pop("question")
        assert answer(completions, prompts=[ex["prompt"]] * len(said), **columns) == with_column
        if ex["guid"] == "g0":  # the choose guard is at work: naming both options is worth less than the answer
            assert with_column[1] < with_column[0] and with_column[0] > 0


def test_stage2_dataset_uses_kept_ids_and_counts_missing(processor) -> None:
    rows = mini_rows(4)
    kept = {"g0": [rows[0]["candidates"][3]["id"], rows[0]["candidates"][0]["id"]], "g1": [rows[1]["candidates"][5]["id"]]}
    ds, report = training.build_stage2_dataset(rows, PRESET, processor=processor, kept_ids=kept, seed=0)
    assert report.questions_without_kept_ids == 2 and report.questions_used == 2
    assert {frozenset(ex["source_ids"]) for ex in ds if ex["guid"] == "g0"} == {frozenset(kept["g0"])}
    assert all(ex["gold_ids"] == [] for ex in ds if ex["guid"] == "g1")  # the filter lost the gold: no gold to find
    stale = dict(kept, g2=["no-such-id"])  # scores from another build of g2's pool
    ds, report = training.build_stage2_dataset(rows, PRESET, processor=processor, kept_ids=stale, seed=0)
    assert report.questions_without_kept_ids == 2 and report.questions_used == 2
    assert all(len(ex["candidate_ids"]) >= 1 for ex in ds) and "g2" not in set(ds["guid"])


def test_stage2_report_counts_questions_without_gold_and_can_skip_them(processor) -> None:
    rows = mini_rows(4)
    gold = [[c["id"] for c in r["candidates"] if c["is_gold"]] for r in rows]
    other = [[c["id"] for c in r["candidates"] if not c["is_gold"]] for r in rows]
    # the stage-1 filter kept gold for g0 and g3 but lost every gold of g1 and g2
    kept = {"g0": gold[0] + other[0][:1], "g1": other[1][:2], "g2": other[2][:1], "g3": gold[3]}
    ds, report = training.build_stage2_dataset(rows, PRESET, processor=processor, kept_ids=kept, seed=0)
    no_gold = [ex for ex in ds if ex["gold_ids"] == []]
    assert {ex["guid"] for ex in no_gold} == {"g1", "g2"} and report.questions_used == 4  # kept by default
    assert report.questions_without_gold == 2 and report.rows_without_gold == len(no_gold) > 0
    assert report.questions_skipped_without_gold == 0
    assert "2 questions" in str(report) and "no gold" in str(report) and "nothing dropped" not in str(report)
    assert report.to_dict()["questions_without_gold"] == 2
    ds, report = training.build_stage2_dataset(rows, PRESET, processor=processor, kept_ids=kept, seed=0,
                                               skip_questions_without_gold=True)
    assert set(ds["guid"]) == {"g0", "g3"} and all(ex["gold_ids"] for ex in ds)
    assert (report.questions_without_gold, report.questions_skipped_without_gold, report.rows_without_gold) == (2, 2, 0)
    assert report.questions_used == 2 and "skipped 2 questions that show no gold" in str(report)
    _, report = training.build_stage2_dataset(rows, PRESET, processor=processor, seed=0)  # no filter: gold shown
    assert report.questions_without_gold == 0 and "nothing dropped" in str(report)


def test_stage2_over_long_prompts_shrink_or_drop_never_truncate(processor) -> None:
    rows = mini_rows(6)
    full, _ = training.build_stage2_dataset(rows, PRESET, processor=processor, seed=0)
    lengths = [modeling.prompt_token_count(processor, ex["prompt"], ex["images"]) for ex in full]
    limit = min(lengths) - 1  # every full prompt is over: each question must lose candidates
    tight = PRESET.with_overrides(**{"stage2.max_prompt_tokens": limit})
    ds, report = training.build_stage2_dataset(rows, tight, processor=processor, seed=0)
    assert report.questions_shrunk + report.questions_dropped_too_long == len(rows)
    assert report.candidates_dropped >= report.questions_shrunk and "shrunk" in str(report)
    for ex in ds:
        assert len(ex["source_ids"]) < PRESET.stage1.k
        assert modeling.prompt_token_count(processor, ex["prompt"], ex["images"]) <= limit
        n_parts = sum(p["type"] == "image" for m in ex["prompt"] for p in m["content"])
        assert n_parts == len(ex["images"])  # whole candidates removed, image parts and images together
    # a question dropped whole does not count its lost gold against the questions that were kept
    long_gold = {**rows[1], "guid": "long", "candidates": [  # both gold snippets far over any budget
        dict(c, text="word " * 2000) if c["is_gold"] else c for c in rows[1]["candidates"]]}
    roomy = PRESET.with_overrides(**{"stage2.max_prompt_tokens": max(lengths)})
    _, mixed = training.build_stage2_dataset([long_gold, rows[2]], roomy, processor=processor, seed=0)
    assert len(long_gold["gold_ids"]) == 2 and mixed.questions_dropped_too_long == 1
    assert mixed.questions_shrunk == 0 and mixed.gold_dropped == 0
    impossible = PRESET.with_overrides(**{"stage2.max_prompt_tokens": 20})
    none_ds, none_report = training.build_stage2_dataset(rows, impossible, processor=processor, seed=0)
    assert len(none_ds) == 0 and none_report.questions_dropped_too_long == len(rows) and "dropped" in str(none_report)


# ------------------------------------------------------------------------------------------------ callbacks
def test_reward_curve_callback_reads_components_and_trend() -> None:
    logs = {"reward": 0.5, "rewards/format/mean": 1.0, "rewards/format/std": 0.0, "rewards/relevance/mean": 0.25, "loss": 0.1}
    assert training.RewardCurveCallback.components(logs) == {"reward": 0.5, "format": 1.0, "relevance": 0.25}
    history = [{"reward": r, "step": i} for i, r in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])]
    assert training.reward_trend(history) == pytest.approx((0.15, 0.95))
    assert training.reward_trend([{"loss": 1.0}]) == (None, None)
    per_component = [{"reward": 1.0 + i, "rewards/format/mean": i / 9, "rewards/relevance/mean": 0.5, "step": i}
                     for i in range(10)]
    trends = training.component_trends(per_component)
    assert list(trends) == ["format", "relevance", "total"]
    assert trends["format"] == pytest.approx((1 / 18, 17 / 18)) and trends["relevance"] == (0.5, 0.5)
    assert trends["total"] == pytest.approx((1.5, 9.5)) and training.component_trends([]) == {}
    text = training.describe_trends(per_component)
    assert "    format: first 0.056 -> last 0.944" in text and "first / last 20%" in text
    assert training.describe_trends([]) == "no reward logged"
    assert "no signal" not in text  # a history without TRL's diagnostics prints none
    diagnosed = [{**e, "frac_reward_zero_std": 1.0 - i / 9, "completions/clipped_ratio": 0.25} for i, e in
                 enumerate(per_component)]
    lines = training.describe_trends(diagnosed).splitlines()
    assert lines[-2].startswith(" no signal: first 0.944 -> last 0.056  (share of groups")
    assert lines[-1].startswith("   cut off: first 0.250 -> last 0.250  (share of completions cut")


# ------------------------------------------------------------------------------------------------ GRPO runs
def _text_length(completions, **_: object) -> list[float]:
    """A reward with variance even for a cold model (TRL's own tests do the same): GRPO needs non-zero advantages."""
    return [len(c[-1]["content"] if isinstance(c, list) else c) / 50.0 for c in completions]


@pytest.fixture
def varied_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset's rewards plus ``_text_length``: a cold model scores 0 on all of them, and 0 everywhere trains nothing."""
    real = training.reward_funcs_for

    def with_length(preset, stage):
        funcs, weights = real(preset, stage)
        return [*funcs, _text_length], [*weights, 1.0]

    monkeypatch.setattr(training, "reward_funcs_for", with_length)


class _StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters() if "lora_" in k}


def _lora_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(folder / "adapter_model.safetensors").values()}


class _AtTrainBegin(TrainerCallback):
    """Snapshots what ``train()`` starts from, after it restored a checkpoint: the adapter's state dict and dtypes."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.dtypes: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        self.dtypes = _lora_dtypes(model)


def test_stage1_grpo_step_trains_lora_saves_and_resumes(tiny_dir: Path, tmp_path: Path, varied_rewards: None) -> None:
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    assert len(set(ds["modality"])) == 2  # mixed text/image batches (a TRL trap, docs/modeling.md)
    model, proc = _load(tiny_dir)
    # A run of 3 steps "interrupted" after step 2 (as a killed kernel would be, but with the adapter saved).
    res = training.train_stage1(preset, ds, tmp_path, max_steps=3, model=model, processor=proc, verbose=False,
                                callbacks=[_StopAfter(2)])
    out = tmp_path / "stage1"
    assert res.global_step == 2 and (out / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    history = json.loads((out / "log_history.json").read_text())
    assert any("rewards/relevance/mean" in e for e in history) and set(res.curves) >= {"reward", "format", "relevance"}
    lora_b = {k: v for k, v in _lora_state(res.model).items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: the step moved it
    trained = _lora_state(res.model)

    # Resume from checkpoint-2 with a fresh model and finish step 3.
    model2, proc2 = _load(tiny_dir)
    begin = _AtTrainBegin()
    res2 = training.train_stage1(preset, ds, tmp_path, max_steps=3, resume=True, model=model2, processor=proc2,
                                 verbose=False, callbacks=[begin])
    assert res2.global_step == 3
    # the resumed run really starts from checkpoint-2's adapter, not from a fresh LoRA (whose lora_B is all zero)
    from safetensors.torch import load_file

    ckpt = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert begin.state.keys() == ckpt.keys()
    assert all(torch.equal(begin.state[k], ckpt[k]) for k in ckpt)
    assert any(v.abs().sum() > 0 for k, v in begin.state.items() if "lora_B" in k)
    steps = [e.get("step") for e in res2.log_history if "reward" in e]
    assert steps == [1, 2, 3]  # the old log history came back with the checkpoint
    resumed = _lora_state(res2.model)
    assert any(not torch.equal(trained[k], resumed[k]) for k in trained)
    reloaded, _ = _load(tiny_dir, adapter=out / "adapter")
    saved = _lora_state(reloaded)
    assert all(torch.allclose(saved[k], resumed[k], atol=1e-6) for k in saved)  # the adapter is the resumed one,
    assert any(not torch.allclose(saved[k], trained[k], atol=1e-6) for k in saved)  # not the step-2 one


def test_text_only_micro_batches_cut_from_a_batch_with_images_train(tiny_dir: Path, tmp_path: Path,
                                                                    varied_rewards: None) -> None:
    # Gradient accumulation (every GPU preset) makes TRL cut each generation batch into micro-batches and slice the
    # vision inputs to match: a micro-batch of text-only rows gets *empty* pixel_values, which Qwen2-VL's vision
    # tower cannot read. Found by the first real-size run on a GPU (benchmarks/RESULTS.md).
    preset = PRESET.with_overrides(**{**FAST, "stage1.grpo.per_device_train_batch_size": 2,
                                      "stage1.grpo.num_generations": 2, "stage1.grpo.gradient_accumulation_steps": 4})
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    image_rows = [i for i, m in enumerate(ds["modality"]) if m == "image"]
    text_rows = [i for i, m in enumerate(ds["modality"]) if m != "image"]
    ds = ds.select(image_rows[:1] + text_rows[:3])  # 4 prompts x 2 completions, 4 micro-batches of 2: >= 2 text-only
    model, proc = _load(tiny_dir)
    seen_empty = []

    def spy(module, args, kwargs):  # prepended: sees what TRL really passes, before the fix's own hook
        pv = kwargs.get("pixel_values")
        seen_empty.append(isinstance(pv, torch.Tensor) and pv.shape[0] == 0)

    fixed = [m for m in model.modules() if getattr(m, "_mmrag_empty_vision_safe", False)]
    assert fixed  # load_model_and_processor applied the fix
    handles = [m.register_forward_pre_hook(spy, with_kwargs=True, prepend=True) for m in fixed]
    try:
        res = training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    finally:
        for h in handles:
            h.remove()
    assert res.global_step == 1 and any(seen_empty)  # the trap was met, and the step still ran
    assert all(math.isfinite(e["loss"]) for e in res.log_history if "loss" in e)


def test_empty_vision_inputs_read_as_a_batch_without_images(tiny_dir: Path, processor) -> None:
    model, _ = modeling.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=False)
    enc = processor(text=["What colour is place 3?"], return_tensors="pt")
    width = model.config.vision_config.in_channels * model.config.vision_config.temporal_patch_size * (
        model.config.vision_config.patch_size ** 2)
    with torch.no_grad():
        plain = model(**enc).logits
        empty = model(**enc, pixel_values=torch.empty(0, width), image_grid_thw=torch.empty(0, 3, dtype=torch.long)).logits
    assert torch.equal(plain, empty)
    before = sum(len(m._forward_pre_hooks) for m in model.modules())
    modeling.make_model_mixed_batch_safe(model)  # idempotent: no second hook
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before


def test_lora_weights_stay_float32_on_the_4bit_model_through_a_step_and_a_resume(
        tiny_dir: Path, tmp_path: Path, varied_rewards: None) -> None:
    # TRL casts a quantized model's trainable weights to bf16 in GRPOTrainer.__init__; build_trainer undoes it
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    assert getattr(model, "is_loaded_in_4bit", False)  # the QLoRA path, where TRL's cast applies
    trainer, curve = training.build_trainer(preset, 1, ds, tmp_path / "built", model=model, processor=proc,
                                            plot_title="a named run")
    assert _lora_dtypes(trainer.model) == {torch.float32} and trainer.optimizer is None  # optimizer made in train()
    # one curve callback, titled as asked (a second one made transformers warn in notebook 05's retrained ablations)
    assert [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, training.RewardCurveCallback)] == [curve]
    assert curve.title == "a named run"
    memory = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, training.CudaMemoryCallback)]
    assert [cb.expected_gb for cb in memory] == [preset.expected_memory_gb]  # the banner knows the preset's estimate
    model, proc = _load(tiny_dir)
    res = training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    assert res.global_step == 1 and _lora_dtypes(res.model) == {torch.float32}
    out = tmp_path / "stage1"
    assert _saved_dtypes(out / "adapter") == _saved_dtypes(out / "checkpoint-1") == {torch.float32}
    model, proc = _load(tiny_dir)
    begin = _AtTrainBegin()
    with pytest.warns(UserWarning, match="schedule is recomputed over 2 steps"):  # planned for 1 step, extended
        res = training.train_stage1(preset, ds, tmp_path, max_steps=2, resume=True, model=model, processor=proc,
                                    verbose=False, callbacks=[begin])
    assert res.global_step == 2 and begin.dtypes == {torch.float32} and _lora_dtypes(res.model) == {torch.float32}
    assert res.resumed_from_step == 1 and "steps 2-2 (resumed at step 1)" in res.summary()  # one step ran, not two
    assert _saved_dtypes(out / "adapter") == {torch.float32}
    assert [step for step, _ in res.curves["reward"]] == [1, 2]  # the curves cover the steps before the resume too


def test_one_progress_display_in_a_terminal_and_in_a_notebook(tiny_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.trainer
    from transformers.utils.notebook import NotebookProgressCallback

    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)

    def progress_kinds() -> list[str]:
        model, proc = _load(tiny_dir)
        trainer, _ = training.build_trainer(preset, 1, ds, tmp_path / "built", model=model, processor=proc)
        return [type(cb).__name__ for cb in trainer.callback_handler.callbacks if "Progress" in type(cb).__name__]

    assert progress_kinds() == ["QuietProgressCallback"]  # tqdm without the log dicts
    monkeypatch.setattr(transformers.trainer, "DEFAULT_PROGRESS_CALLBACK", NotebookProgressCallback)  # as in Jupyter
    assert progress_kinds() == ["NotebookProgressCallback"]  # its saved table, no second bar


def test_resuming_a_finished_run_trains_nothing_and_keeps_the_adapter(tiny_dir: Path, tmp_path: Path,
                                                                     varied_rewards: None) -> None:
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    first = training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    out = tmp_path / "stage1"
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    log = (out / "log_history.json").read_text()
    assert json.loads((out / training.RUN_SETTINGS_FILE).read_text()) == preset.to_dict()  # what resume compares
    model, proc = _load(tiny_dir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = training.train_stage1(preset, ds, tmp_path, max_steps=1, resume=True, model=model, processor=proc,
                                      verbose=False)
    assert not [w for w in seen if "other settings" in str(w.message)]  # the same settings: no warning
    assert again.global_step == 1 and "already reached max_steps=1" in again.note and "nothing trained" in again.summary()
    assert again.summary().count("already reached") == 1
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1"}  # no step 2
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (out / "log_history.json").read_text() == log and again.log_history == first.log_history
    assert again.curves == first.curves
    trained = _lora_state(first.model)  # the returned model is the trained one, ready for scoring
    restored = _lora_state(again.model)
    assert trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)
    assert _lora_dtypes(again.model) == {torch.float32}
    model, proc = _load(tiny_dir)
    hotter = preset.with_overrides(**{"stage1.grpo.learning_rate": 1e-2})
    started = re.escape(str(preset.stage1.grpo.learning_rate))  # the preset's own rate, whatever it is
    with pytest.warns(UserWarning, match=rf"other settings .*stage1\.grpo\.learning_rate: {started} -> 0\.01"):
        training.train_stage1(hotter, ds, tmp_path, max_steps=1, resume=True, model=model, processor=proc,
                              verbose=False)
    # the file keeps the settings the run started with: a resume never rewrites it
    assert json.loads((out / training.RUN_SETTINGS_FILE).read_text()) == preset.to_dict()


def test_what_counts_as_a_changed_setting_on_resume() -> None:
    base = PRESET.to_dict()
    same = PRESET.with_overrides(**{"stage1.grpo.max_steps": 99, "stage2.grpo.max_steps": 99, "stage1.grpo.save_steps": 7,
                                    "evaluation.questions": 3, "expected_memory_gb": 9.0})
    assert training.changed_on_resume(base, same, 1) == {} and training.changed_on_resume(base, same, 2) == {}
    changed = PRESET.with_overrides(**{"stage1.grpo.learning_rate": 1e-2, "stage1.k": 3, "stage2.weights.answer": 2.0,
                                       "lora.r": 4, "seed": 1})
    assert set(training.changed_on_resume(base, changed, 1)) == {"stage1.grpo.learning_rate", "stage1.k", "lora.r", "seed"}
    # stage 2 does not train stage 1's GRPO, but its pools are stage 1's top-k
    assert set(training.changed_on_resume(base, changed, 2)) == {"stage1.k", "stage2.weights.answer", "lora.r", "seed"}
    assert training.changed_on_resume(base, changed, 2)["stage2.weights.answer"] == (base["stage2"]["weights"]["answer"], 2.0)


def test_resuming_with_another_max_steps_says_the_lr_schedule_is_recomputed(tiny_dir: Path, tmp_path: Path,
                                                                           varied_rewards: None) -> None:
    """The linear decay runs over max_steps and a checkpoint saves no schedule: extending a run restarts the decay
    from the new total's rate at the saved step. Not silent; resuming an interrupted run as planned says nothing."""
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    training.train_stage1(preset, ds, tmp_path, max_steps=2, model=model, processor=proc, verbose=False,
                          callbacks=[_StopAfter(1)])  # interrupted after step 1 of 2
    assert training.last_checkpoint(tmp_path / "stage1") == tmp_path / "stage1" / "checkpoint-1"
    model, proc = _load(tiny_dir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        training.train_stage1(preset, ds, tmp_path, max_steps=2, resume=True, model=model, processor=proc,
                              verbose=False)
    assert not [w for w in seen if "schedule" in str(w.message)]  # the same plan: the same schedule
    model, proc = _load(tiny_dir)
    lr = preset.stage1.grpo.learning_rate
    # linear decay: the old plan is at 0 after step 2 of 2, the new one at half the peak (step 2 of 4)
    with pytest.warns(UserWarning, match=rf"planned for max_steps=2 with max_steps=4.*linear schedule is recomputed "
                                         rf"over 4 steps from step 2 \(the learning rate at step 2 goes from 0 to "
                                         rf"{lr / 2:.3g}\)"):
        res = training.train_stage1(preset, ds, tmp_path, max_steps=4, resume=True, model=model, processor=proc,
                                    verbose=False, callbacks=[_StopAfter(3)])
    assert res.global_step == 3


def test_resuming_a_finished_run_replaces_an_earlier_runs_adapter_and_log(tiny_dir: Path, tmp_path: Path,
                                                                          varied_rewards: None) -> None:
    # a fresh run replaces the folder's adapter and log only when it ends: killed after its last checkpoint, the
    # folder still holds the earlier run's, and "resume" must not keep them (found by a review)
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    training.train_stage1(preset, ds, tmp_path / "earlier", max_steps=1, model=model, processor=proc, verbose=False)
    model, proc = _load(tiny_dir)
    this = training.train_stage1(preset, ds, tmp_path, max_steps=2, model=model, processor=proc, verbose=False)
    out, earlier = tmp_path / "stage1", tmp_path / "earlier" / "stage1"
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(out / "adapter")
    shutil.copytree(earlier / "adapter", out / "adapter")
    shutil.copy(earlier / "log_history.json", out / "log_history.json")
    model, proc = _load(tiny_dir)
    again = training.train_stage1(preset, ds, tmp_path, max_steps=2, resume=True, model=model, processor=proc,
                                  verbose=False)
    assert "already reached max_steps=2" in again.note
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert [step for step, _ in again.curves["reward"]] == [step for step, _ in this.curves["reward"]] == [1, 2]
    assert training.load_log_history(tmp_path, 1)[-1]["step"] == 2


def test_resume_refuses_a_checkpoint_with_fewer_lora_layers(tiny_dir: Path, tmp_path: Path,
                                                            varied_rewards: None) -> None:
    # a checkpoint trained on a subset of the target modules would load with the rest left fresh: refused instead
    from safetensors.torch import load_file, save_file

    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    weights = tmp_path / "stage1" / "checkpoint-1" / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = min(tensors).split(".lora_")[0]  # one LoRA layer (its A and B) goes
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}, weights)
    model, proc = _load(tiny_dir)
    with pytest.raises(ValueError, match="does not fit this model's adapter"):
        training.train_stage1(preset, ds, tmp_path, max_steps=1, resume=True, model=model, processor=proc,
                              verbose=False)


def test_a_fresh_run_removes_an_earlier_runs_checkpoints(tiny_dir: Path, tmp_path: Path, varied_rewards: None) -> None:
    # an earlier, longer run left checkpoint-7; had a rerun been interrupted before saving twice, resume would take
    # the highest step, the old run's, and silently "finish" it (found by an audit)
    out = tmp_path / "stage1"
    stale = out / "checkpoint-7"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1"}
    assert training.last_checkpoint(out) == out / "checkpoint-1"


def test_stage2_grpo_step_from_stage1_adapter(tiny_dir: Path, tmp_path: Path, processor, varied_rewards: None) -> None:
    # the GPU presets continue from stage 1 (cpu-tiny starts from the base model; see config.py)
    preset = PRESET.with_overrides(**FAST, **{"stage2.init_from": "stage1"})
    s1 = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    training.train_stage1(preset, s1, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    init = training.stage2_init_adapter(preset, tmp_path)
    assert init == tmp_path / "stage1" / "adapter"
    s2, _ = training.build_stage2_dataset(mini_rows(), preset, processor=processor, seed=0)
    model, proc = _load(tiny_dir, adapter=init)
    before = _lora_state(model)
    res = training.train_stage2(preset, s2, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    assert res.global_step == 1 and (tmp_path / "stage2" / "adapter" / "adapter_config.json").is_file()
    assert set(res.curves) >= {"reward", "format", "ranking", "answer"}
    after = _lora_state(res.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_build_trainer_refuses_arguments_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        training.build_trainer(PRESET, 1, [], tmp_path, model=object())  # a model without its processor
    with pytest.raises(ValueError, match="init_adapter"):
        training.build_trainer(PRESET, 2, [], tmp_path, model=object(), processor=object(), init_adapter=tmp_path)


def test_build_trainer_makes_a_model_from_elsewhere_read_empty_vision_inputs(tiny_dir: Path, processor,
                                                                             tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    raw = AutoModelForImageTextToText.from_pretrained(tiny_dir)  # not through the course's loader
    assert not any(getattr(m, "_mmrag_empty_vision_safe", False) for m in raw.modules())
    ds = training.build_stage1_dataset(mini_rows(), PRESET.with_overrides(**FAST), seed=0)
    trainer, _ = training.build_trainer(PRESET.with_overrides(**FAST), 1, ds, tmp_path, model=raw, processor=processor)
    assert any(getattr(m, "_mmrag_empty_vision_safe", False) for m in trainer.model.modules())


def test_build_trainer_makes_a_processor_from_elsewhere_read_mixed_batches_and_pad_left(tiny_dir: Path,
                                                                                        tmp_path: Path) -> None:
    """TRL hands a text-only prompt's images as None, which a plain processor rejects (TypeError), and batched
    generation needs left padding: a processor passed in gets the loader's fixes too."""
    from transformers import AutoProcessor

    raw = AutoProcessor.from_pretrained(tiny_dir)  # not through the course's loader
    raw.tokenizer.padding_side = "right"
    image = Image.new("RGB", (56, 56), COLOURS["red"])
    texts = ["<|vision_start|><|image_pad|><|vision_end|>an image", "text only"]
    with pytest.raises(TypeError):
        raw(text=texts, images=[[image], None], padding=True, return_tensors="pt")
    model, _ = _load(tiny_dir)
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    trainer, _ = training.build_trainer(preset, 1, ds, tmp_path, model=model, processor=raw)
    proc = trainer.processing_class
    assert proc.tokenizer.padding_side == "left" and proc.tokenizer.pad_token is not None
    enc = proc(text=texts, images=[[image], None], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] == 2 and enc["attention_mask"][1, 0] == 0  # the short row is padded on the left


def test_stage2_init_adapter_follows_the_preset(tmp_path: Path) -> None:
    adapter = tmp_path / "stage1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert training.stage2_init_adapter(PRESET.with_overrides(**{"stage2.init_from": "stage1"}), tmp_path) == adapter
    assert training.stage2_init_adapter(PRESET.with_overrides(**{"stage2.init_from": "base"}), tmp_path) is None
    assert training.stage2_init_adapter(PRESET.with_overrides(**{"stage2.init_from": "stage1"}), tmp_path / "none") is None


def test_only_the_main_process_writes_the_adapter_and_log(tiny_dir: Path, tmp_path: Path, varied_rewards: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import trl

    monkeypatch.setenv("RANK", "1")
    assert not training.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert training.is_main_process()
    # A non-zero rank under `accelerate launch`: it trains its share but leaves the files to rank 0.
    monkeypatch.setattr(trl.GRPOTrainer, "is_world_process_zero", lambda self: False)
    preset = PRESET.with_overrides(**FAST)
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0)
    model, proc = _load(tiny_dir)
    res = training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    assert res.global_step == 1 and res.log_history
    assert not (tmp_path / "stage1" / "adapter").exists() and not (tmp_path / "stage1" / "log_history.json").exists()


def test_load_log_history_reads_a_run_and_is_empty_without_one(tmp_path: Path) -> None:
    history = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.75}]
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "log_history.json").write_text(json.dumps(history))
    assert training.load_log_history(tmp_path, 2) == history
    assert training.reward_trend(training.load_log_history(tmp_path, 2)) == (0.5, 0.75)
    assert training.load_log_history(tmp_path, 1) == []  # never trained
    (tmp_path / "stage2" / "log_history.json").write_text("{truncated")
    assert training.load_log_history(tmp_path, 2) == []  # a half-written file is not a crash


def test_an_empty_training_set_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    from datasets import Dataset

    with pytest.raises(ValueError, match="stage-2 training set is empty"):
        training.train_stage2(PRESET, Dataset.from_dict({"prompt": []}), tmp_path, verbose=False)
    assert not (tmp_path / "stage2").exists()


def test_a_training_set_smaller_than_one_generation_batch_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """TRL drops a partial generation batch: one row where two prompts make a batch trained 0 steps, and the
    untrained adapter (for stage 2: stage 1's) was saved as the run's (found by an audit)."""
    preset = PRESET.with_overrides(**FAST)  # 8 completions per batch / 4 generations = 2 prompts
    ds = training.build_stage1_dataset(mini_rows(), preset, seed=0).select(range(1))
    earlier = tmp_path / "stage1" / "checkpoint-5"  # an earlier run's: a refused run must not delete it
    earlier.mkdir(parents=True)
    model, proc = _load(tiny_dir)
    with pytest.raises(ValueError, match=r"1 row\(s\); one generation batch takes 2 distinct prompts"):
        training.train_stage1(preset, ds, tmp_path, max_steps=1, model=model, processor=proc, verbose=False)
    assert not (tmp_path / "stage1" / "adapter").exists() and earlier.is_dir()


def _random_adapter(tiny_dir: Path, folder: Path) -> Path:
    """A saved LoRA adapter with float32 weights that bfloat16 cannot hold exactly."""
    from peft import get_peft_model

    model = get_peft_model(_load(tiny_dir)[0], modeling.lora_config(PRESET))
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.0123
    model.save_pretrained(str(folder))
    return folder


def test_stage2_starts_from_the_stage1_adapter_exactly(tiny_dir: Path, tmp_path: Path, processor,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPOTrainer casts a 4-bit model's LoRA to bfloat16 when it is built; casting back to float32 kept the rounding,
    so stage 2's step 0 was not the stage-1 model (max error 4.8e-4). The adapter is loaded again, exactly."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = _random_adapter(tiny_dir, tmp_path / "stage1" / "adapter")
    real = modeling.load_model_and_processor
    monkeypatch.setattr(modeling, "load_model_and_processor",
                        lambda preset, **kw: real(preset, model_path=tiny_dir, **kw))
    preset = PRESET.with_overrides(**FAST)
    s2, _ = training.build_stage2_dataset(mini_rows(), preset, processor=processor, seed=0)
    trainer, _ = training.build_trainer(preset, 2, s2, tmp_path / "stage2", init_adapter=adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    now = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == now.keys()
    assert all(now[k].dtype == torch.float32 and torch.equal(now[k], saved[k]) for k in saved)


def test_a_model_passed_in_keeps_its_adapter_exactly(tiny_dir: Path, tmp_path: Path, processor) -> None:
    """The init_adapter error tells users to load the adapter onto the model they pass; TRL's bf16 cast then rounded
    that adapter (only init_adapter was reloaded from disk). Both routes now start from the exact float32 weights."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = _random_adapter(tiny_dir, tmp_path / "stage1" / "adapter")
    model, proc = modeling.load_model_and_processor(PRESET, model_path=tiny_dir, adapter_path=adapter, for_training=True)
    preset = PRESET.with_overrides(**FAST)
    s2, _ = training.build_stage2_dataset(mini_rows(), preset, processor=processor, seed=0)
    trainer, _ = training.build_trainer(preset, 2, s2, tmp_path / "stage2", model=model, processor=proc)
    saved = load_file(adapter / "adapter_model.safetensors")
    now = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == now.keys()
    assert all(now[k].dtype == torch.float32 and torch.equal(now[k], saved[k]) for k in saved)


def test_an_adapter_of_another_rank_is_named_as_such(tiny_dir: Path, tmp_path: Path) -> None:
    """torch refuses another rank's shapes even with strict=False; that surfaced as its RuntimeError, not as the
    promised question about the preset's LoRA rank."""
    other = _random_adapter(tiny_dir, tmp_path / "rank8")
    wider = PRESET.with_overrides(**{"lora.r": PRESET.lora.r * 2, "lora.alpha": PRESET.lora.alpha * 2})
    from peft import get_peft_model

    model = get_peft_model(_load(tiny_dir)[0], modeling.lora_config(wider))
    with pytest.raises(ValueError, match=r"rank8 does not fit this model's adapter \(.*size mismatch.*another preset's LoRA rank"):
        training._load_adapter_weights(model, other)


def test_a_finished_run_restores_into_a_model_with_trls_ref_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    """With beta > 0 and an init adapter TRL adds a frozen "ref" adapter, which no checkpoint holds: its keys are
    not "missing" from the active adapter's file."""
    from types import SimpleNamespace

    from peft import get_peft_model_state_dict
    from transformers import TrainerState

    checkpoint = _random_adapter(tiny_dir, tmp_path / "checkpoint-3")
    TrainerState(global_step=3, log_history=[{"step": 3, "loss": 0.0}]).save_to_json(str(checkpoint / "trainer_state.json"))
    model = modeling.load_model_and_processor(PRESET, model_path=tiny_dir, adapter_path=checkpoint, for_training=True)[0]
    model.add_adapter("ref", modeling.lora_config(PRESET))
    trainer = SimpleNamespace(model=model, state=None)
    assert training._restore_finished(trainer, str(checkpoint)) == [{"step": 3, "loss": 0.0}]
    assert trainer.state.global_step == 3 and get_peft_model_state_dict(model, adapter_name="ref")


def test_saved_splits_decode_only_the_images_the_examples_use(processor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Iterating a saved split decodes every candidate's image: stage 1 held the whole train split's pixels to pick
    max_examples of them (tens of GB on real WebQA), and stage 2 decoded every row without scores. The rows built
    are the same as from plain rows."""
    from datasets import Dataset
    from datasets.features import Image as ImageFeature

    rows = mini_rows(n=12)
    saved = Dataset.from_list(rows, features=data.mini_webqa_features())
    decoded = []
    real = ImageFeature.decode_example
    monkeypatch.setattr(ImageFeature, "decode_example", lambda self, value, **kw: decoded.append(1) or real(self, value, **kw))
    images = sum(c["image"] is not None for r in rows for c in r["candidates"])
    small = PRESET.with_overrides(**{"stage1.max_examples": 4})
    s1 = training.build_stage1_dataset(saved, small, seed=0)
    assert len(decoded) <= 4 * max(len(r["candidates"]) for r in rows) < images  # at most the chosen rows' images
    assert [(r["guid"], r["candidate_id"], r["label"]) for r in s1] == [
        (r["guid"], r["candidate_id"], r["label"]) for r in training.build_stage1_dataset(rows, small, seed=0)]
    decoded.clear()
    kept = {"g3": [c["id"] for c in rows[3]["candidates"][:2]]}  # one scored question of twelve
    s2, report = training.build_stage2_dataset(saved, PRESET, kept_ids=kept, processor=processor, seed=0)
    assert 0 < len(decoded) <= len(rows[3]["candidates"])
    plain, plain_report = training.build_stage2_dataset(rows, PRESET, kept_ids=kept, processor=processor, seed=0)
    assert [r["source_ids"] for r in s2] == [r["source_ids"] for r in plain] and report == plain_report
    assert report.questions_without_kept_ids == 11 and report.questions_used == 1


def test_streamed_and_transformed_splits_build_the_same_rows_as_plain_ones(processor) -> None:
    """The index-based reading took any object with ``with_format`` for a saved split: a streaming IterableDataset
    (no length, no index) failed, and a split with a transform was labelled from the stored pools while its rows
    came through the transform (a reversed pool: 7 of 10 labels wrong)."""
    from datasets import Dataset

    rows = mini_rows(n=12)
    saved = Dataset.from_list(rows, features=data.mini_webqa_features())

    def reversed_pools(batch):
        batch["candidates"] = [list(reversed(c)) for c in batch["candidates"]]
        return batch

    transformed = saved.with_transform(reversed_pools)
    plain_reversed = [dict(r, candidates=list(reversed(r["candidates"]))) for r in rows]
    small = PRESET.with_overrides(**{"stage1.max_examples": 10})

    def labels(ds):
        return [(r["guid"], r["candidate_id"], r["label"]) for r in ds]

    assert labels(training.build_stage1_dataset(saved.to_iterable_dataset(), small, seed=0)) == labels(
        training.build_stage1_dataset(rows, small, seed=0))
    assert labels(training.build_stage1_dataset(transformed, small, seed=0)) == labels(
        training.build_stage1_dataset(plain_reversed, small, seed=0))
    gold_of = {(r["guid"], c["id"]): c["is_gold"] for r in rows for c in r["candidates"]}
    assert all((lab == prompts.YES) == gold_of[(g, c)] for g, c, lab in labels(training.build_stage1_dataset(transformed, small, seed=0)))
    kept = {"g3": [c["id"] for c in rows[3]["candidates"][:2]]}
    streamed, report = training.build_stage2_dataset(saved.to_iterable_dataset(), PRESET, kept_ids=kept, processor=processor, seed=0)
    assert report.questions_used == 1 and report.questions_without_kept_ids == 11 and len(streamed) == PRESET.stage2.permutations


def test_a_whole_datasetdict_instead_of_one_split_is_a_clear_error() -> None:
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"train": Dataset.from_list([{"guid": "g"}]), "test": Dataset.from_list([{"guid": "h"}])})
    with pytest.raises(TypeError, match=r"build_stage1_dataset takes one split, e\.g\. ds\['train'\].*\['test', 'train'\]"):
        training.build_stage1_dataset(dd, PRESET)
    with pytest.raises(TypeError, match="build_stage2_dataset takes one split"):
        training.build_stage2_dataset(dd, PRESET, processor=object())
    row = {"guid": "g1", "question": "q?", "candidates": [], "gold_ids": []}  # one row, not a list of rows
    with pytest.raises(TypeError, match=r"build_stage1_dataset takes one split \(a list of rows\); this is one row \('g1'\): pass \[row\]"):
        training.build_stage1_dataset(row, PRESET)


def test_last_checkpoint_is_the_highest_step_not_the_latest_name(tmp_path: Path) -> None:
    assert training.last_checkpoint(tmp_path / "absent") is None
    assert training.last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-1").mkdir()  # the only one, cut off while saving: said, not a silent fresh start
    with pytest.warns(UserWarning, match="checkpoint-1 .* no complete checkpoint"):
        assert training.last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-1").rmdir()
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-final").mkdir()  # not a step: ignored
    assert training.last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-11").mkdir()  # cut off while saving: transformers writes trainer_state.json last
    (tmp_path / "checkpoint-11" / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="checkpoint-11 .* incomplete .* resuming from checkpoint-10"):
        assert training.last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    # checkpoints pile up on Drive otherwise: the last two are kept (one to resume from, one in case it was cut off)
    assert training.grpo_config_kwargs(PRESET, 1, tmp_path / "run")["save_total_limit"] == training.CHECKPOINTS_KEPT == 2
    kw = {"init_adapter": None, "callbacks": (), "max_steps": None, "live_plot": False, "plot_title": None,
          "model": None, "processor": None, "verbose": False}
    with pytest.raises(ValueError, match="checkpoint-11 has no readable trainer_state.json"):
        training._train(1, PRESET, [{"x": 1}], tmp_path / "run", resume=tmp_path / "checkpoint-11", **kw)
    with pytest.raises(ValueError, match="max_steps=0 must be >= 1"):
        training.grpo_config_kwargs(PRESET, 1, max_steps=0)  # transformers would train one step anyway


def test_cuda_memory_callback_logs_the_steps_peak_tensors_and_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per log row: the largest per-step peak since the last row, for tensors and for the caching allocator."""
    from types import SimpleNamespace

    import torch

    from mmrag_lite.training import CudaMemoryCallback

    peaks = iter([(1.0, 2.0), (3.0, 2.5)])
    current: dict[str, float] = {}

    def next_step() -> None:
        current["a"], current["r"] = (v * 2**30 for v in next(peaks))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: next_step())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: current["a"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: current["r"])
    cb, state = CudaMemoryCallback(), SimpleNamespace(log_history=[{"loss": 1.0}])
    for _ in range(2):
        cb.on_step_begin(None, state, None)
        cb.on_step_end(None, state, None)
    cb.on_log(None, state, None)
    assert state.log_history[-1] == {"loss": 1.0, "memory/peak_gb": 3.0, "memory/reserved_gb": 2.5}
    state.log_history.append({"loss": 0.5})
    cb.on_log(None, state, None)  # no step since the last row: nothing new to report
    assert "memory/peak_gb" not in state.log_history[-1]


def test_cuda_memory_banner_states_the_presets_estimate_and_warns_on_a_smaller_card() -> None:
    from mmrag_lite.training import CudaMemoryCallback

    a100 = CudaMemoryCallback(get_preset("a100").expected_memory_gb)
    roomy = a100.banner("NVIDIA A100-SXM4-80GB", 79.2)
    assert "79.2 GiB" in roomy and f"~{get_preset('a100').expected_memory_gb:g} GiB" in roomy and "warning" not in roomy
    tight = a100.banner("Tesla T4", 14.6)
    assert "warning" in tight and "stage2.max_prompt_tokens" in tight
    assert "warning" not in CudaMemoryCallback().banner("Tesla T4", 14.6)  # no estimate given: nothing to compare


# ------------------------------------------------------------------------- what the model trains on (mutation run)
def test_stage1_class_balance_arithmetic_and_order() -> None:
    """The positive share, the shrink when negatives run out, and a shuffled order (GRPO batches mix both labels)."""
    rows = mini_rows()
    quarter = PRESET.with_overrides(**{"stage1.positive_fraction": 0.25, "stage1.max_examples": 8})
    assert Counter(training.build_stage1_dataset(rows, quarter, seed=0)["label"]) == {"yes": 2, "no": 6}
    scarce = mini_rows(pool=2)  # 18 gold, 6 distractors: the positives shrink to keep half and half
    assert Counter(training.build_stage1_dataset(scarce, PRESET, seed=0)["label"]) == {"yes": 6, "no": 6}
    labels = training.build_stage1_dataset(rows, PRESET, seed=0)["label"]
    assert "no" in labels[: len(labels) // 2] and "yes" in labels[len(labels) // 2:]


def _order(ex: dict, row: dict, k: int) -> tuple[int, ...]:
    shown = [c["id"] for c in training._default_shown(row, k)]
    return tuple(shown.index(s) for s in ex["source_ids"])


def test_stage2_orders_differ_between_questions_and_the_row_cap_holds(processor) -> None:
    rows = mini_rows()
    ds, _ = training.build_stage2_dataset(rows, PRESET, processor=processor, seed=0)
    by_row = {r["guid"]: r for r in rows}
    first: dict[str, tuple[int, ...]] = {}
    for ex in ds:
        first.setdefault(ex["guid"], _order(ex, by_row[ex["guid"]], PRESET.stage1.k))
    assert len(set(first.values())) > 1  # each question draws its own orders: no slot is the gold's by habit
    perms = PRESET.stage2.permutations
    capped = PRESET.with_overrides(**{"stage2.max_examples": perms + 1})
    assert len(training.build_stage2_dataset(rows, capped, processor=processor, seed=0)[0]) == perms + 1


def test_stage2_shows_every_gold_and_shrinks_distractors_first(processor) -> None:
    rows = mini_rows(4)
    k1 = PRESET.with_overrides(**{"stage1.k": 1})
    ds, _ = training.build_stage2_dataset(rows, k1, processor=processor, seed=0)
    assert all(len(ex["gold_ids"]) == len(rows[int(ex["guid"][1:])]["gold_ids"]) for ex in ds)  # k < gold: all shown
    row = rows[0]
    gold = [c["id"] for c in row["candidates"] if c["is_gold"]]
    other = [c["id"] for c in row["candidates"] if not c["is_gold"]]
    kept = {"g0": other[:3] + gold}  # stage 1 ranked the gold last
    full, _ = training.build_stage2_dataset([row], PRESET, processor=processor, kept_ids=kept, seed=0)
    exact = modeling.prompt_token_count(processor, full[0]["prompt"], full[0]["images"])
    at_limit = PRESET.with_overrides(**{"stage2.max_prompt_tokens": exact})
    _, report = training.build_stage2_dataset([row], at_limit, processor=processor, kept_ids=kept, seed=0)
    assert report.questions_shrunk == 0  # a prompt exactly at the limit fits
    tight = PRESET.with_overrides(**{"stage2.max_prompt_tokens": exact - 1})
    ds, report = training.build_stage2_dataset([row], tight, processor=processor, kept_ids=kept, seed=0)
    assert report.questions_shrunk == 1 and report.gold_dropped == 0
    assert all(set(gold) <= set(ex["source_ids"]) and len(ex["source_ids"]) == 3 for ex in ds)


def test_stage2_pools_from_saved_scores_hold_k_candidates(processor, tmp_path: Path) -> None:
    from mmrag_lite import scoring

    rows = mini_rows(4)
    scored = {r["guid"]: [(c["id"], 1.0 - j / 10) for j, c in enumerate(r["candidates"])] for r in rows}
    scoring.save_scores(scored, scoring.scores_path(tmp_path, "train"), meta={"preset": PRESET.name})
    ds, _ = training.stage2_dataset_for_run(PRESET, tmp_path, rows, processor=processor)
    k = PRESET.stage1.k
    assert all(sorted(ex["source_ids"]) == sorted(c for c, _ in scored[ex["guid"]][:k]) for ex in ds)


def test_stage2_shrinking_drops_the_lowest_ranked_distractor(processor) -> None:
    """Over the prompt cap, stage 2 drops distractors from the bottom of stage 1's ranking, never the gold."""
    row = mini_rows(4)[0]
    gold = [c["id"] for c in row["candidates"] if c["is_gold"]]
    other = [c["id"] for c in row["candidates"] if not c["is_gold"]]
    kept = {"g0": other[:3] + gold}
    full, _ = training.build_stage2_dataset([row], PRESET, processor=processor, kept_ids=kept, seed=0)
    exact = modeling.prompt_token_count(processor, full[0]["prompt"], full[0]["images"])
    tight = PRESET.with_overrides(**{"stage2.max_prompt_tokens": exact - 1})
    ds, _ = training.build_stage2_dataset([row], tight, processor=processor, kept_ids=kept, seed=0)
    assert len(ds) and all(set(ex["source_ids"]) == set(other[:2] + gold) for ex in ds)


def test_a_gpu_preset_without_a_stage1_adapter_is_refused_not_trained_short(tmp_path, monkeypatch):
    """Notebook 04's stand-in stage 1 costs most of an hour on a GPU preset: it refuses there with the fix."""
    def no_training(*_args, **_kw):
        raise AssertionError("trained a stand-in stage 1")

    monkeypatch.setattr(training, "train_stage1", no_training)
    t4 = get_preset("colab-t4")
    with pytest.raises(FileNotFoundError, match="run notebook 03 first") as err:
        training.ensure_stage1_adapter(t4, [], tmp_path)
    assert "short_stage1_if_missing = True" in str(err.value) and "Google Drive" in str(err.value)
    with pytest.raises(FileNotFoundError):
        training.ensure_stage1_adapter(get_preset("cpu-tiny"), [], tmp_path, short_if_missing=False)
    adapter = tmp_path / "stage1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert training.ensure_stage1_adapter(t4, [], tmp_path) == adapter  # present: nothing to train


def test_the_miniature_trains_a_short_stand_in_stage1_when_its_adapter_is_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "build_stage1_dataset", lambda rows, preset, seed=None: ("rows", seed))
    monkeypatch.setattr(training, "train_stage1", lambda preset, ds, wd, **kw: calls.append((ds, kw["max_steps"])))
    tiny = get_preset("cpu-tiny")
    training.ensure_stage1_adapter(tiny, [], tmp_path, verbose=False)
    assert calls == [(("rows", tiny.seed), max(2, tiny.stage1.grpo.max_steps // training.SHORT_STAGE1_FRACTION))]


# ---------------------------------------------------------------- by hand, with a made-up token count (mutation run 2)
@pytest.fixture
def ten_per_candidate(monkeypatch: pytest.MonkeyPatch):
    """Prompt length = 10 tokens per candidate shown + 5 per image: stage-2 building without a model."""
    def count(processor, messages, images) -> int:
        ids = [p for m in messages for p in m["content"] if p["type"] == "text" and re.fullmatch(r"D\d+: ", p["text"])]
        return 10 * len(ids) + 5 * len(images)

    monkeypatch.setattr(modeling, "prompt_token_count", count)


def test_stage2_report_arithmetic_by_hand(ten_per_candidate) -> None:
    rows = mini_rows(4)  # g0: image question, 1 gold; g1: text question, 2 gold
    r0, r1 = rows[0], rows[1]
    images = {r["guid"]: {c["id"] for c in r["candidates"] if c["image"] is not None} for r in rows}
    kept = {"g0": [c["id"] for c in r0["candidates"][:5]], "g1": [c["id"] for c in r1["candidates"][:3]]}
    cost = {g: 10 * len(ids) + 5 * len(images[g] & set(ids)) for g, ids in kept.items()}
    at_limit = PRESET.with_overrides(**{"stage2.max_prompt_tokens": max(cost.values())})
    ds, report = training.build_stage2_dataset(rows, at_limit, kept_ids=kept, processor=object(), seed=0)
    perms = PRESET.stage2.permutations
    assert len(ds) == report.rows == 2 * perms  # a prompt exactly at the limit is a row, in every order
    assert (report.questions_shrunk, report.rows_dropped_too_long, report.questions_without_kept_ids) == (0, 0, 2)
    assert report.prompt_tokens_max == max(cost.values())
    assert report.prompt_tokens_mean == (cost["g0"] + cost["g1"]) / 2
    per_question = {g: len(images[g] & set(ids)) for g, ids in kept.items()}
    assert per_question == {"g0": 3, "g1": 2} and report.images_per_prompt_max == 3  # the most, not the last row's


def test_stage2_shrinking_counts_by_hand(ten_per_candidate) -> None:
    rows = mini_rows(4)
    r1 = rows[1]  # two gold snippets/images first, then distractors
    gold = [c["id"] for c in r1["candidates"] if c["is_gold"]]
    other = [c["id"] for c in r1["candidates"] if not c["is_gold"]]
    assert len(gold) == 2
    img = {c["id"] for c in r1["candidates"] if c["image"] is not None}

    def cost(ids):
        return 10 * len(ids) + 5 * len(img & set(ids))

    # two distractors must go (the lowest-ranked two), the gold stays
    kept = {"g1": gold + other[:3]}
    tight = PRESET.with_overrides(**{"stage2.max_prompt_tokens": cost(gold + other[:1])})
    ds, report = training.build_stage2_dataset(rows, tight, kept_ids=kept, processor=object(), seed=0)
    assert (report.questions_shrunk, report.candidates_dropped, report.gold_dropped) == (1, 2, 0)
    assert all(set(ex["source_ids"]) == set(gold + other[:1]) for ex in ds)
    # only gold shown and room for one: the lower-ranked gold goes, the best one stays
    only_gold = {"g1": gold}
    one = PRESET.with_overrides(**{"stage2.max_prompt_tokens": cost(gold[:1])})
    ds, report = training.build_stage2_dataset(rows, one, kept_ids=only_gold, processor=object(), seed=0)
    assert (report.questions_shrunk, report.candidates_dropped, report.gold_dropped) == (1, 1, 1)
    assert all(ex["source_ids"] == [gold[0]] and ex["gold_ids"] == ["D1"] for ex in ds)


def test_stage1_sampling_follows_the_seed_and_draws_from_the_whole_split() -> None:
    rows = mini_rows()
    small = PRESET.with_overrides(**{"stage1.max_examples": 4})

    def picked(seed):
        return sorted((r["guid"], r["candidate_id"]) for r in training.build_stage1_dataset(rows, small, seed=seed))

    assert picked(None) == picked(PRESET.seed)  # no seed: the preset's
    assert len({tuple(picked(s)) for s in range(5)}) > 1  # the seed given decides the sample
    # 2 positives and 2 negatives out of the shuffled ones, not always the split's first gold and first distractors
    first_gold = {("g0", rows[0]["candidates"][0]["id"]), ("g1", rows[1]["candidates"][0]["id"])}
    first_other = [(r["guid"], c["id"]) for r in rows for c in r["candidates"] if not c["is_gold"]][:2]
    assert any({p for p in picked(s) if p in first_gold} != first_gold for s in range(5))
    assert any(not set(first_other) <= set(picked(s)) for s in range(5))


def test_stage1_scarce_negatives_shrink_the_positives_to_the_asked_fraction() -> None:
    """18 gold and 6 distractors at a quarter positive: 6 negatives carry 6 x 0.25 / 0.75 = 2 positives, not 6."""
    scarce = mini_rows(pool=2)
    quarter = PRESET.with_overrides(**{"stage1.positive_fraction": 0.25})
    assert Counter(training.build_stage1_dataset(scarce, quarter, seed=0)["label"]) == {"yes": 2, "no": 6}
