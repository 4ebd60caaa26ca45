"""Hardware presets for the course, as data.

One preset per hardware tier. Every value that the paper leaves open (k, reward weights, generations, permutations)
lives here with a one-line reason, never as a literal buried in code. A preset is a frozen dataclass tree;
``get_preset(name, **overrides)`` returns a validated copy, and ``Preset.from_dict`` / ``load_preset_yaml``
read the same shape from plain data (unknown keys are an error, not silently ignored).

Memory and step-time figures are *estimates* until a benchmark measures them on the preset's own card; ``measured``
says which. What a GPU did measure (an H100 running the presets' real-size architectures) sits beside the estimates
it informed (``modeling.architectures.MEASURED_STEPS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

ComputeDtype = Literal["float32", "float16", "bfloat16"]
RankingMetric = Literal["ndcg", "f1"]
# The loss types the pinned TRL's GRPOConfig supports (trl 1.16: grpo_config.py, loss_type's help); anything else
# passes GRPOConfig and fails with "Unknown loss type" only inside the first training step.
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
# transformers' attention backends (modeling_utils: "eager" + ALL_ATTENTION_FUNCTIONS); sdpa is its default
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]
GRPO_LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)
ATTN_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AttnImplementation)


class ConfigError(ValueError):
    """A preset or override that cannot work; the message says which field and why."""


# --------------------------------------------------------------------------------------------- paths
def env_path(name: str) -> Path | None:
    """The path an environment variable names, ``~`` expanded and absolute (a ``.env`` file or ``os.environ`` expands
    no ``~``; a relative one would mean another folder in a kernel started elsewhere), or None when unset."""
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def project_root() -> Path:
    """The repo root of a source checkout (``MMRAG_HOME`` overrides), so notebooks run from any working directory.

    A package installed into site-packages (the Colab pip line) has no checkout around it: then the current
    directory (``/content`` on Colab), so ``data/`` and ``runs/`` never land inside site-packages.
    """
    return env_path("MMRAG_HOME") or _checkout() or Path.cwd().resolve()


def _checkout() -> Path | None:
    """The source checkout this package runs from, or None for an install into site-packages."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else None


def data_dir() -> Path:
    """Where generated data, tiny models and caches go (gitignored)."""
    return project_root() / "data"


def runs_dir() -> Path:
    """Where training runs and executed notebooks go (gitignored)."""
    return project_root() / "runs"


def shared_data_dir() -> Path | None:
    """The real benchmark samples in ``../shared/data`` (``MMRAG_SHARED_DATA`` overrides), or None when absent.

    Next to the checkout even when ``MMRAG_HOME`` moves ``data/`` and ``runs/`` elsewhere (a Drive folder must not
    switch off the real-data checks); next to ``project_root()`` for an installed package.
    """
    path = env_path("MMRAG_SHARED_DATA") or (_checkout() or project_root()).parent / "shared" / "data"
    return path if path.is_dir() else None


# ------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelSettings:
    model_id: str  # hub id, or "tiny" for the offline miniature built by modeling.build_tiny_vlm
    load_in_4bit: bool  # NF4 + double quant through bitsandbytes (QLoRA)
    compute_dtype: ComputeDtype  # 4-bit compute / activation dtype
    image_size: int  # every image is resized to image_size x image_size: fixed token count, no mRoPE mismatch
    min_pixels: int  # Qwen-VL processor pixel budget per image
    max_pixels: int
    attn_implementation: AttnImplementation = "sdpa"

    @property
    def is_miniature(self) -> bool:
        """The offline miniature (built locally, trained on the CPU), not a hub model that needs a GPU."""
        return self.model_id == MINIATURE_MODEL_ID


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]  # language-model projections only: a subset of LM_PROJECTIONS
    # True: the vision tower stays frozen (no LoRA, run under no_grad): cheaper, and judging needs the LM most.
    # False: LoRA also on every vision block's attention and MLP (modeling.VISION_BLOCK_LINEARS: Qwen2-VL's qkv, proj,
    # fc1, fc2; Qwen2.5-VL's qkv, proj, gate/up/down_proj), and the tower backpropagates: more memory and time
    freeze_vision: bool = True


@dataclass(frozen=True)
class GRPOSettings:
    max_steps: int
    per_device_train_batch_size: int  # completions per micro-batch; a step samples this x accumulation (a multiple of G)
    gradient_accumulation_steps: int
    num_generations: int  # group size G: rewards are compared within a group
    max_completion_length: int
    learning_rate: float
    beta: float  # KL weight; 0 skips the reference pass. Else the reference is the base with a fresh LoRA off, or
    # TRL's frozen "ref" copy of a continued adapter (stage 2 from stage 1; saved in the adapter folder as ref/)
    loss_type: LossType  # TRL loss: "dapo" (the presets), "grpo", "dr_grpo", "bnpo", ... (GRPO_LOSS_TYPES)
    temperature: float = 1.0
    logging_steps: int = 1
    save_steps: int = 50


@dataclass(frozen=True)
class Stage1Settings:
    grpo: GRPOSettings
    reasoning: bool  # <think> before the verdict; off for cheap judging and for the tiny model
    weights: Mapping[str, float]  # reward component -> weight
    positive_fraction: float  # share of gold candidates in the point-wise training set (class balance)
    balance_classes: bool  # relevance reward re-weights rare positives instead of (or on top of) sampling
    max_examples: int  # cap on point-wise training examples
    k: int  # candidates kept for stage 2
    min_think_words: int = 0  # with reasoning, the format reward also asks for this many words inside <think> (0: none)
    # Our choice: the task reward (relevance) is paid whatever the format, R1-style independent components. True pays
    # it only where the format reward pays (a malformed completion then earns nothing from it): benchmarks/RESULTS.md
    task_needs_format: bool = False


@dataclass(frozen=True)
class Stage2Settings:
    grpo: GRPOSettings
    reasoning: bool
    weights: Mapping[str, float]
    ranking_metric: RankingMetric  # ndcg rewards order; f1 rewards the selected set (= Retrieval-F1)
    permutations: int  # shuffled copies of each candidate list, against position bias
    init_from: Literal["stage1", "base"]  # continue from the stage-1 adapter or start from the base model
    max_examples: int
    max_prompt_tokens: int  # prompts longer than this are shrunk (fewer candidates) or dropped, never cut
    answer_guards: bool  # the answer reward's choose_guard + hedge_guard + length_guard + keyword_guard (rewards docstring)
    min_think_words: int = 0  # as in Stage1Settings: an empty <think> is the cheapest way to earn the format reward
    # As in Stage1Settings, for ranking and answer: a completion whose answer never closes still earns the ranking
    # reward from its <sources>, so GRPO can trade the format point for it (measured; benchmarks/RESULTS.md)
    task_needs_format: bool = False


@dataclass(frozen=True)
class DataSettings:
    world_questions: int  # questions in the synthetic WebQA-format world
    world_image_size: int  # side of the synthetic images in pixels (below a GPU preset's model.image_size: upscaled)
    max_candidates: int  # candidates per question kept in Mini-WebQA (gold always kept)
    # Where Mini-WebQA's test split comes from. "pooled": WebQA's train and val questions are pooled and cut by
    # MiniWebQAFilters.split_fractions (the default: all splits alike). "webqa_val": test = WebQA's own val questions
    # (minus any linked to a train question), train / validation cut from its train questions: a model trained on it
    # can be scored on the official val split. Our choice; the paper does not say how it split Mini-WebQA.
    test_split: Literal["pooled", "webqa_val"] = "pooled"


@dataclass(frozen=True)
class EvalSettings:
    questions: int  # held-out Mini-WebQA questions evaluated in notebook 05
    retrain_ablations: bool  # retrain stage 2 once per ablation variant (no ranking / no answer reward, reasoning
    # flipped): about a minute for all three on cpu-tiny, hours each on a GPU, where it is opt-in
    generation_batch_size: int = 8  # stage-2 prompts per generate call, at most
    # ... and at most this many prompt tokens per call (prompts x the longest one, as left padding makes them), so
    # long prompts share a call with fewer others: a real VLM's memory grows with the call's tokens (0: no cap)
    generation_max_batch_tokens: int = 0
    mmqa_questions: int = 0  # MMQA dev questions evaluated; 0: as many as WebQA questions
    # Longest stage-2 prompt when answering, never below stage2.max_prompt_tokens (0: stage 2's). Training's cap bounds
    # training memory (a backward pass through every prompt token); answering's memory is bounded per call by the
    # token cap above, so a zero-shot model can be shown a real WebQA pool whole (16 candidates, 10 images: 3,405
    # tokens at 448 px)
    max_prompt_tokens: int = 0


# ------------------------------------------------------------------------------------- prompt budget
QWEN_VL_PATCH_SIZE = 14  # Qwen2-VL / Qwen2.5-VL vision patch side in pixels (the miniature uses the same)
QWEN_VL_MERGE_SIZE = 2  # 2x2 patches merge into one language-model token
IMAGE_WRAPPER_TOKENS = 2  # <|vision_start|> and <|vision_end|> around each image's <|image_pad|> run

MINIATURE_MODEL_ID = "tiny"  # model_id of the offline miniature (modeling.build_tiny_vlm) instead of a hub id

# the named reward components of each stage; a preset's weights may name only these (rewards builds them)
STAGE_COMPONENTS: dict[int, tuple[str, ...]] = {1: ("format", "relevance"), 2: ("format", "ranking", "answer")}
# Room a stage-2 prompt needs for text besides its images, for the budget check only (an estimate, not a limit):
PROMPT_TEXT_FIXED_TOKENS = 128  # system prompt, chat template and question; 90 on a real WebQA question, real Qwen2 vocabulary
PROMPT_TEXT_TOKENS_PER_CANDIDATE = 48  # "D3: Image titled '...': <caption>"; real WebQA: captions 47, snippets 42 on average
# (benchmarks/real_prompt_lengths.py: the budget check's estimate covered all 600 drawn real top-k prompts)
# The smallest image side the Qwen-VL processor makes: one 2x2 merge of 14 px patches (smart_resize's ``factor``).
MIN_IMAGE_SIDE = QWEN_VL_PATCH_SIZE * QWEN_VL_MERGE_SIZE
# The language model's projections in every decoder layer of Qwen2-VL, Qwen2.5-VL and the miniature
# (model.language_model.layers.N.self_attn.{q,k,v,o}_proj, ...mlp.{gate,up,down}_proj): what lora.target_modules
# may name. Any other name would match no module of the language model and be dropped without a word.
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A preset name becomes the run folder runs/<name>: a plain folder name, never a path (no "/", "..", leading ".").
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _model_problems(model: ModelSettings) -> list[str]:
    """What makes ``model``'s image settings unusable (the pixel arithmetic of ``image_tokens`` divides by them)."""
    problems = []
    floor, area = MIN_IMAGE_SIDE, MIN_IMAGE_SIDE * MIN_IMAGE_SIDE
    if model.image_size < floor:
        problems.append(f"model.image_size={model.image_size!r} must be >= {floor} px (one {QWEN_VL_MERGE_SIZE}x"
                        f"{QWEN_VL_MERGE_SIZE} merge of {QWEN_VL_PATCH_SIZE} px patches, the smallest image the "
                        "processor makes)")
    for key in ("min_pixels", "max_pixels"):
        if getattr(model, key) < area:
            problems.append(f"model.{key}={getattr(model, key)!r} must be >= {area} ({floor}x{floor} px, one image token)")
    if model.min_pixels > model.max_pixels:
        problems.append(f"model.min_pixels={model.min_pixels!r} must be <= model.max_pixels={model.max_pixels!r}")
    return problems


def lora_targets_problem(target_modules: Any) -> str | None:
    """What is wrong with ``lora.target_modules`` names outside ``LM_PROJECTIONS`` (None: nothing): PEFT would drop
    each one without a word (it only complains when *no* name matches), so ``lm_head``, ``embed_tokens`` or a vision
    layer's ``qkv`` would look adapted and not be."""
    if unknown := [m for m in target_modules if m not in LM_PROJECTIONS]:
        return (f"lora.target_modules names {unknown}, which match no language-model projection and would get no "
                f"adapter; valid names: {', '.join(LM_PROJECTIONS)} (lora.freeze_vision=False adds the vision "
                "tower's attention and MLP)")
    return None


def check_preset_name(name: Any) -> str:
    """``name`` if it is a plain folder name (it becomes ``runs/<name>``), else a ConfigError."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ConfigError(_name_problem(name))
    return name


def _name_problem(name: Any) -> str:
    return (f"name={name!r} must be a plain folder name (it becomes runs/<name>): a letter or digit, then letters, "
            "digits, '-', '_' or '.' (so no '/', '\\', '.' or '..')")


def image_tokens(model: ModelSettings) -> int:
    """Language-model tokens one image costs at the preset's fixed ``image_size`` and pixel budget, wrappers included.

    Mirrors the Qwen2-VL image processor's ``smart_resize`` (sides rounded to multiples of patch x merge, then
    scaled into ``[min_pixels, max_pixels]``), so a preset can be checked without loading a processor. At 448 px:
    16x16 merged patches = 256 tokens + 2 wrappers.
    """
    if problems := _model_problems(model):  # a ConfigError here, not a ZeroDivisionError below
        raise ConfigError("model settings are invalid:\n  - " + "\n  - ".join(problems))
    factor = QWEN_VL_PATCH_SIZE * QWEN_VL_MERGE_SIZE
    side = model.image_size  # modeling.prepare_image makes every image this square
    h = w = max(factor, round(side / factor) * factor)
    if h * w > model.max_pixels:
        beta = math.sqrt(side * side / model.max_pixels)
        h = w = max(factor, math.floor(side / beta / factor) * factor)
    elif h * w < model.min_pixels:
        beta = math.sqrt(model.min_pixels / (side * side))
        h = w = math.ceil(side * beta / factor) * factor
    return (h // factor) * (w // factor) + IMAGE_WRAPPER_TOKENS


def stage2_prompt_tokens_needed(preset: Preset, candidates: int | None = None) -> int:
    """Estimated tokens of a stage-2 prompt showing ``candidates`` (default ``stage1.k``) image candidates (images
    dominate: text is cheaper)."""
    k = preset.stage1.k if candidates is None else candidates
    return PROMPT_TEXT_FIXED_TOKENS + k * (image_tokens(preset.model) + PROMPT_TEXT_TOKENS_PER_CANDIDATE)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelSettings
    lora: LoraSettings
    stage1: Stage1Settings
    stage2: Stage2Settings
    data: DataSettings
    evaluation: EvalSettings
    expected_memory_gb: float  # peak accelerator memory per step
    expected_seconds_per_step: float
    measured: bool = False  # False: the two figures above are estimates
    seed: int = 0

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> Preset:
        """``self``, or one ConfigError listing every problem as ``key=value must be <allowed range>``."""
        problems: list[str] = []

        def at_least(key: str, value: Any, low: float, why: str = "") -> None:
            if value < low:
                problems.append(f"{key}={value!r} must be >= {low:g}{why}")

        def positive(key: str, value: Any, why: str = "") -> None:
            if not value > 0:
                problems.append(f"{key}={value!r} must be > 0{why}")

        if not _PLAIN_NAME.fullmatch(self.name):
            problems.append(_name_problem(self.name))
        problems += _literal_problems(self, "")
        for stage_name in ("stage1", "stage2"):
            stage = getattr(self, stage_name)
            g, at = stage.grpo, f"{stage_name}.grpo"
            at_least(f"{at}.num_generations", g.num_generations, 2, " (GRPO compares completions within a group)")
            for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                        "max_completion_length", "logging_steps", "save_steps"):
                at_least(f"{at}.{key}", getattr(g, key), 1)
            global_batch = g.per_device_train_batch_size * g.gradient_accumulation_steps
            if g.num_generations >= 2 and global_batch >= 1 and global_batch % g.num_generations:
                problems.append(
                    f"{at}: per_device_train_batch_size*gradient_accumulation_steps ({global_batch}) "
                    f"must be a multiple of num_generations ({g.num_generations})"
                )
            positive(f"{at}.learning_rate", g.learning_rate)
            at_least(f"{at}.beta", g.beta, 0, " (0 drops the reference model)")
            positive(f"{at}.temperature", g.temperature, " (sampling temperature; 1.0 samples the model as it is)")
            at_least(f"{stage_name}.max_examples", stage.max_examples, 1)
            at_least(f"{stage_name}.min_think_words", stage.min_think_words, 0, " (0: an empty <think> is well formed)")
            known = STAGE_COMPONENTS[1 if stage_name == "stage1" else 2]
            if not stage.weights:
                problems.append(f"{stage_name}.weights={{}} must name at least one of {', '.join(known)}")
            if negative := {k: w for k, w in stage.weights.items() if w < 0}:
                problems.append(f"{stage_name}.weights {negative} must be >= 0")
            elif stage.weights and not any(w > 0 for w in stage.weights.values()):
                problems.append(f"{stage_name}.weights={dict(stage.weights)}: at least one reward component must have "
                                "a positive weight (all zero gives every completion the same reward: nothing to learn)")
            if unknown := sorted(set(stage.weights) - set(known)):
                problems.append(f"{stage_name}.weights has unknown components {unknown}; known: {', '.join(known)}")
        if not 0 < self.stage1.positive_fraction < 1:
            problems.append(f"stage1.positive_fraction={self.stage1.positive_fraction!r} must be in (0, 1)")
        at_least("data.max_candidates", self.data.max_candidates, 2,
                 " (a pool of its gold alone has no distractor: nothing for stage 1 to tell apart)")
        if self.stage1.k < 1 or self.stage1.k > self.data.max_candidates:
            problems.append(f"stage1.k={self.stage1.k!r} must be in [1, data.max_candidates={self.data.max_candidates}]")
        at_least("stage2.permutations", self.stage2.permutations, 1)
        at_least("stage2.max_prompt_tokens", self.stage2.max_prompt_tokens, 1)
        at_least("evaluation.questions", self.evaluation.questions, 1)
        at_least("evaluation.generation_batch_size", self.evaluation.generation_batch_size, 1)
        at_least("evaluation.generation_max_batch_tokens", self.evaluation.generation_max_batch_tokens, 0, " (0: no cap)")
        at_least("evaluation.mmqa_questions", self.evaluation.mmqa_questions, 0, " (0: as many as WebQA questions)")
        at_least("evaluation.max_prompt_tokens", self.evaluation.max_prompt_tokens, 0, " (0: stage 2's)")
        call_cap = self.evaluation.generation_max_batch_tokens
        if call_cap and self.answer_prompt_tokens > call_cap:
            problems.append(f"the longest answering prompt ({self.answer_prompt_tokens} tokens: evaluation.max_prompt_tokens "
                            f"or stage2.max_prompt_tokens) is over evaluation.generation_max_batch_tokens={call_cap}, "
                            "the per-call memory cap: raise that cap or lower the prompt caps")
        at_least("data.world_questions", self.data.world_questions, 1)
        at_least("data.world_image_size", self.data.world_image_size, MIN_IMAGE_SIDE,
                 f" px (one merged {MIN_IMAGE_SIDE} px patch; a smaller synthetic scene shows nothing)")
        problems += _model_problems(self.model)
        at_least("lora.r", self.lora.r, 1)
        positive("lora.alpha", self.lora.alpha, " (the LoRA update is scaled by alpha / r)")
        if not 0 <= self.lora.dropout < 1:
            problems.append(f"lora.dropout={self.lora.dropout!r} must be in [0, 1)")
        if not self.lora.target_modules or not all(self.lora.target_modules):
            problems.append(f"lora.target_modules={list(self.lora.target_modules)!r} must name at least one module, "
                            "e.g. [q_proj, v_proj]")
        elif problem := lora_targets_problem(self.lora.target_modules):
            problems.append(problem)
        at_least("expected_memory_gb", self.expected_memory_gb, 0)
        at_least("expected_seconds_per_step", self.expected_seconds_per_step, 0)
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed={self.seed!r} must be in [0, 2**32 - 1] (numpy's seed range)")
        if problems:
            raise ConfigError(f"preset {self.name!r} is invalid:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def answer_prompt_tokens(self) -> int:
        """The longest stage-2 prompt answering may build (``pipeline.run_pipeline``): evaluation's cap, never below
        stage 2's, so a trained stage 2 always sees the whole top-k it was trained on."""
        return max(self.evaluation.max_prompt_tokens, self.stage2.max_prompt_tokens)

    def check_prompt_budget(self) -> Preset:
        """Reject a preset whose ``stage1.k`` image candidates cannot fit ``stage2.max_prompt_tokens`` with room for text.

        Why: stage 2 shrinks an over-long pool below k rather than cut it (``training.build_stage2_dataset``), so a
        budget too small for k images silently turns every pool into fewer than k candidates. ``get_preset``,
        ``resolve_preset`` and ``load_preset_yaml`` (what notebooks, the CLI and YAML go through) run this check;
        ``validate``/``with_overrides`` do not, so a test can build a deliberately tight budget to exercise shrinking.
        """
        needed = stage2_prompt_tokens_needed(self)
        limit = self.stage2.max_prompt_tokens
        if needed > limit:
            per_image = image_tokens(self.model)
            raise ConfigError(
                f"preset {self.name!r}: stage2.max_prompt_tokens={limit} cannot hold stage1.k={self.stage1.k} image "
                f"candidates at model.image_size={self.model.image_size} ({per_image} tokens each) plus text: about "
                f"{needed} tokens needed ({PROMPT_TEXT_FIXED_TOKENS} + k x ({per_image} + "
                f"{PROMPT_TEXT_TOKENS_PER_CANDIDATE})). Raise stage2.max_prompt_tokens to >= {needed}, lower stage1.k, "
                "or lower model.image_size / model.max_pixels."
            )
        return self

    # -- plain-data round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preset:
        return _from_plain(cls, data, "preset").validate()

    def with_overrides(self, **overrides: Any) -> Preset:
        """Copy with dotted overrides, e.g. ``with_overrides(**{"stage1.grpo.max_steps": 5, "stage1.k": 3})``.

        ``__`` also separates (``stage1__k=3``), for callers that want plain keyword arguments. A mapping given for a
        section updates only the keys it names (``stage1={"k": 3}`` is ``stage1.k=3``); a mapping *value* such as
        ``stage2.weights`` is replaced whole (a component left out is not computed).
        """
        data = self.to_dict()
        for dotted, value in _expand_sections(self, overrides).items():
            node: Any = data
            parts = dotted.replace("__", ".").split(".")
            for i, part in enumerate(parts):
                where = ".".join(parts[:i]) or None  # the section being looked into; None: the top level
                if not isinstance(node, dict):
                    raise ConfigError(f"unknown config key {dotted!r}: {where!r} is a value, not a section")
                if part not in node:
                    raise ConfigError(_unknown_key_message(dotted, value, parts[:i], part, node, data))
                if i < len(parts) - 1:
                    node = node[part]
            node[parts[-1]] = value
        return Preset.from_dict(data)


def _expand_sections(preset: Preset, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides with each mapping aimed at a settings section (a dataclass) spread into dotted keys, recursively."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = key.replace("__", ".")
        target: Any = preset
        for part in dotted.split("."):
            target = getattr(target, part, None) if is_dataclass(target) else None
        if isinstance(value, Mapping) and is_dataclass(target):
            out.update(_expand_sections(preset, {f"{dotted}.{k}": v for k, v in value.items()}))
        else:
            out[key] = value
    return out


def setting_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The values that differ between two ``Preset.to_dict()`` trees, by dotted key: ``{key: (before, after)}``
    (a key only one side has pairs with ``None``)."""
    def leaves(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {prefix + key: value})
        return out

    old, new = leaves(before), leaves(after)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def preset_overrides(base: Preset, preset: Preset) -> dict[str, Any]:
    """Dotted overrides that turn ``base`` into ``preset`` (``base.with_overrides(**them) == preset``), as plain
    data: how a ``Preset`` object reaches a notebook, whose parameters are a preset name and overrides."""
    def changes(a: Any, b: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(a):
            old, new = getattr(a, f.name), getattr(b, f.name)
            if old == new:
                continue
            if is_dataclass(old) and is_dataclass(new):
                out.update(changes(old, new, f"{prefix}{f.name}."))
            else:  # a value, a mapping value (stage weights) included: replaced whole
                out[prefix + f.name] = _to_plain(new)
        return out

    return changes(base, preset, "")


def _dotted_keys(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a ``to_dict()`` tree: sections and their values (weights' components included)."""
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _unknown_key_message(dotted: str, value: Any, section: list[str], part: str, node: Mapping[str, Any],
                         data: Mapping[str, Any]) -> str:
    """``unknown config key ...``, with the section's valid keys and the closest known key(s)."""
    where = ".".join(section)
    head = f"unknown config key {dotted!r}" + (f" (no {part!r} in section {where!r})" if section else "")
    all_keys = _dotted_keys(data)
    flat = {k.replace(".", "_"): k for k in all_keys}
    if "." not in dotted and dotted in flat:  # get_preset(name, stage1_k=3): underscores where dots belong
        key = flat[dotted]
        return (f"{head}; did you mean {key!r}? Dotted keys are not Python names: pass them as "
                f"get_preset(name, **{{{key!r}: {value!r}}}) or with double underscores "
                f"({key.replace('.', '__')}={value!r}); on the command line, --set {key}={value}")
    close = _closest_keys(dotted.replace("__", "."), all_keys)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{head}; keys of {('section ' + repr(where)) if section else 'a preset'}: {', '.join(sorted(node))}{hint}"


def _closest_keys(key: str, all_keys: list[str], limit: int = 3) -> list[str]:
    """The dotted keys a user probably meant: those that end with ``key`` (``k`` -> ``stage1.k``; ``grpo.max_steps``
    -> both stages'), else the closest spellings, all of them when several are equally close."""
    ends = [k for k in all_keys if k.endswith("." + key)]
    if ends:
        return ends[:limit]
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in all_keys), key=lambda s: -s[0])
    best = scored[0][0] if scored else 0.0
    return [k for ratio, k in scored if ratio == best and ratio >= 0.6][:limit]


def _literal_problems(obj: Any, prefix: str) -> list[str]:
    """Fields declared as a ``Literal`` holding another value (a preset built in code skips ``_coerce``)."""
    problems = []
    hints = _resolved_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if is_dataclass(value):
            problems += _literal_problems(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            problems.append(f"{prefix}{f.name}={value!r} must be one of {', '.join(map(repr, typing.get_args(hint)))}")
    return problems


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    hints = _resolved_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"missing key {name!r} in {where}")
            continue
        value, hint = data[name], hints[name]
        if is_dataclass(hint):
            value = _from_plain(hint, value, f"{where}.{name}")
        else:
            value = _coerce(value, hint, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's declared type, or a ConfigError naming the field.

    Values from YAML or ``--set`` may arrive as text (``"2e-3"``, ``"false"``), so unambiguous text is converted;
    anything else of the wrong type is an error here, not a ``TypeError`` deep inside training.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where} must be {expected}, got {value!r}")

    if origin is typing.Literal:
        if value not in args:
            raise bad("one of " + ", ".join(map(repr, args)))
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if type(value) is int and value in (0, 1):  # YAML reads `--set stage1.reasoning=1` as the number, not "1"
            return value == 1
        raise bad("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad("a whole number")
    if hint is float:
        try:
            number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("text")
    if origin is tuple:  # tuple[str, ...]: a list of names
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad("a list of names, e.g. [q_proj, v_proj]")
    if origin in (Mapping, dict) or hint is Mapping:  # Mapping[str, float]: reward component -> weight
        if not isinstance(value, Mapping):
            raise bad("a mapping of component -> weight")
        return {str(k): _coerce(v, args[1] if args else float, f"{where}.{k}") for k, v in value.items()}
    return value


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ------------------------------------------------------------------------------------------- presets
_QWEN_LM_PROJECTIONS = LM_PROJECTIONS  # LoRA on every projection of the language model
_GPU_MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # 2B class: fits a T4 in 4-bit with room for G completions

_CPU_TINY = Preset(
    name="cpu-tiny",
    description="Offline, 2 CPU cores, minutes: a randomly initialised miniature Qwen2-VL (a plumbing check, not a real VLM).",
    model=ModelSettings(
        model_id=MINIATURE_MODEL_ID,  # built locally by modeling.build_tiny_vlm; no download
        load_in_4bit=True,  # bitsandbytes runs NF4 on the CPU, so CI exercises the real QLoRA path
        compute_dtype="float32",  # CPUs have no fast fp16 matmul
        image_size=56,  # 4x4 patches of 14 px -> 4 image tokens after the 2x2 merge: tiny and fixed
        min_pixels=56 * 56,
        max_pixels=56 * 56,
        attn_implementation="eager",
    ),
    lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    stage1=Stage1Settings(
        grpo=GRPOSettings(
            max_steps=50,  # ~60-140 s on 2 cores; the course's warm model: reward 1.01 -> 1.57 (format 0.33 -> 0.94)
            per_device_train_batch_size=32,  # 4 prompts x 8 generations: one prompt per step stayed flat in tests
            gradient_accumulation_steps=1,
            num_generations=8,
            max_completion_length=16,  # "<think>..</think><answer>yes</answer>": a handful of tokens
            learning_rate=2e-3,  # LoRA on a 1 M-parameter model needs a large step, but not too large: 5e-3 rose
            # on six warm models and collapsed to reward 0 on a seventh (the world of 2026-11-28), 1e-2 collapsed on
            # one; 2e-3 rose in all eight runs on four warm models (benchmarks/RESULTS.md, bench_stage1_robustness.py)
            beta=0.0,  # no reference model: halves the forward passes on CPU
            loss_type="dapo",
            save_steps=10,
        ),
        reasoning=True,  # the <think> format; the miniature writes no real reasoning, but learning the format is
        # the part of stage-1 RL it can show on a CPU (its warm-up shows <think> on few examples, see modeling), so
        # its empty <think> counts as well formed (min_think_words=0; the GPU presets ask for 1)
        weights={"format": 1.0, "relevance": 1.0},  # R1-style: format and task rewards summed with equal weight
        positive_fraction=0.5,  # balanced sampling: ~1-2 gold vs ~6 distractors per pool otherwise
        balance_classes=False,  # already balanced by sampling
        max_examples=512,
        k=4,  # 1-2 gold among ~8: half the pool, short stage-2 prompts; the miniature's recall@4 is ~0.5-0.8 (notebook 03)
    ),
    stage2=Stage2Settings(
        grpo=GRPOSettings(
            max_steps=20,
            per_device_train_batch_size=16,  # 4 prompts x 4 generations
            gradient_accumulation_steps=1,
            num_generations=4,
            max_completion_length=24,
            learning_rate=3e-3,  # measured over 10 GRPO seeds: rose on 9 (2e-3: 7, 4e-3: 8); 1e-2 collapsed the
            # 24-token completions to reward 0 within 20 steps; on a weaker warm model 5 of 10 (2e-3: 7, 5e-3: 4, a
            # 32-token cap: 5), so the warm model counts as much as the rate (benchmarks/bench_stage2_robustness.py)
            beta=0.0,
            loss_type="dapo",
            save_steps=10,
        ),
        reasoning=False,  # the miniature writes "<sources>..</sources><answer>..</answer>" only
        weights={"format": 1.0, "ranking": 1.0, "answer": 1.0},  # R1-style equal weights; each component logged
        ranking_metric="f1",  # equals Retrieval-F1, the metric the course reports
        permutations=2,
        init_from="base",  # measured: the miniature's one small LoRA forgets the stage-2 format during stage 1
        # (format reward 0 from the stage-1 adapter); a real VLM keeps both, so the GPU presets continue from stage 1
        max_examples=256,
        max_prompt_tokens=512,
        answer_guards=True,  # the official QA-Acc pays a pasted question (choose), "yes or no" (YesNo) and padding: never reward that
    ),
    data=DataSettings(world_questions=400, world_image_size=56, max_candidates=8),
    # 3 extra 20-step stage-2 runs: ~1 min; the miniature is overhead-bound, so big generation batches are faster;
    # MMQA's long text-only pools cost the most time, so 20 of them
    evaluation=EvalSettings(questions=40, retrain_ablations=True, generation_batch_size=64, mmqa_questions=20),
    expected_memory_gb=0.5,  # host RAM, not GPU
    expected_seconds_per_step=1.0,
)

_T4 = Preset(
    name="colab-t4",
    description="Colab T4 (16 GB, no bf16): Qwen2-VL-2B in NF4 4-bit with fp16 compute, small images, 4 generations.",
    model=ModelSettings(
        model_id=_GPU_MODEL_ID,
        load_in_4bit=True,
        compute_dtype="float16",  # T4 (sm75) has no bf16
        image_size=336,  # 24x24 patches -> 144 image tokens per image: 15 candidates fit in a T4
        min_pixels=256 * 28 * 28 // 4,
        max_pixels=336 * 336,
    ),
    lora=LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=_QWEN_LM_PROJECTIONS),
    stage1=Stage1Settings(
        grpo=GRPOSettings(
            max_steps=300, per_device_train_batch_size=4, gradient_accumulation_steps=4, num_generations=4,
            max_completion_length=128, learning_rate=1e-5, beta=0.0, loss_type="dapo", save_steps=50,
        ),
        # the judge is trained to think first, but stage-1 scoring reads P(yes) under the no-reasoning prompt with
        # <answer> prefilled; that this prompt scores best was measured on the miniature only (which its warm-up
        # trained on), never on a hub model: benchmarks/bench_scorer_prompt.py on a GPU run checks it (docs/modeling.md)
        reasoning=True,
        weights={"format": 1.0, "relevance": 1.0},
        positive_fraction=0.5,
        balance_classes=False,
        # more point-wise examples than 300 steps read (4 prompts a step: 1,200), so none is seen twice
        max_examples=4000,
        # our choice, not tuned: WebQA has 1-2 gold, so 5 leaves 3 slots for the judge's misses, and 5 of the T4's
        # 144-token images stay far under stage 2's 2,048-token cap (the budget check allows up to 9 here, 6 on l4's
        # 448 px images). Notebook 03's recall@k table on validation is where to choose it for a real model.
        k=5,
        min_think_words=1,  # an empty <think> would earn the format reward with no explanation (cpu-tiny allows it)
    ),
    stage2=Stage2Settings(
        grpo=GRPOSettings(
            max_steps=300, per_device_train_batch_size=4, gradient_accumulation_steps=4, num_generations=4,
            max_completion_length=256, learning_rate=1e-5, beta=0.0, loss_type="dapo", save_steps=50,
        ),
        reasoning=True,
        weights={"format": 1.0, "ranking": 1.0, "answer": 1.0},
        ranking_metric="f1",
        permutations=2,  # RAMQA's trick against position bias; 2 orders of 1,000 questions, our choice
        init_from="stage1",
        max_examples=2000,  # 300 steps read 1,200 prompts (4 a step): no example repeats
        max_prompt_tokens=2048,
        answer_guards=True,
        min_think_words=1,  # the reasoning is the explanation: an empty one earns no format reward
    ),
    # The synthetic world draws 224 px scenes, but model.image_size (336 here, 448 on l4 / a100) is sized for real
    # WebQA photos: on the synthetic default every image is upscaled 1.5x (2x) per side and costs 146 (258) tokens
    # instead of the 66 a 224 px image needs, 2.2x (3.9x), with no detail added. The memory and step figures below
    # (and MEASURED_STEPS, measured on this world) are those of real photos at image_size; a synthetic-only run may
    # override model.image_size=224, model.max_pixels=50176 (docs/modeling.md) and then runs below them.
    data=DataSettings(world_questions=2000, world_image_size=224, max_candidates=16),
    # opt in to the retrained ablations: 3 more stage-2 runs of ~3 h each. Answering, measured on an H100 (real-size
    # random weights, 256-token answers): a generate call of 32 top-k prompts took 12.2 s, one of 8 took 10.5 s, so
    # 32 a call answered 3.4x faster per question; memory grew by ~0.21 MiB per padded prompt token of the call
    # (8.8 GiB at 32 x 950 tokens, 15.6 at 32 x 2,046: too much for a T4). The cap keeps a call near 6.4 GiB with
    # the model (notebook 05's ModelBank shares one 4-bit base between base, stage 1 and stage 2), leaving room for
    # an active LoRA's float32 pass: 21 top-k prompts a call, 10 of the longest. Measured since with both adapters
    # loaded and one on: 8.3 GiB held at the cap, under the 9.0 counted; the LoRA adds 13-41 % a question
    # (benchmarks/RESULTS.md, "Answering on a GPU" and "Notebook 05's adapters"). Answering prompts may reach 3,328
    # tokens (16 image candidates: 3,232 by the budget estimate), so zero-shot shows a whole pool; the call cap
    # still bounds memory (l4's every-candidate prompts, up to 3,567 tokens, held 7.1 GiB at it)
    evaluation=EvalSettings(questions=300, retrain_ablations=False, generation_batch_size=32,
                            generation_max_batch_tokens=20_480, max_prompt_tokens=3_328),
    # Measured on an H100 (benchmarks/RESULTS.md, modeling.architectures.MEASURED_STEPS; real-size random weights,
    # completions always full length): allocator peak 3.8 GiB in stage 1, 8.0 GiB in stage 2 at 801-token prompts
    # and 10.7 GiB with every prompt filled to the 2,048-token cap. 12 covers the cap with room for the allocator;
    # not yet measured on a T4 itself (15 GiB).
    expected_memory_gb=12.0,
    # estimate: the H100 took 16 s (stage 1) / 29 s (stage 2) a step; a step is mostly token-by-token generation,
    # whose per-token overhead a slower card does not multiply by its 10x smaller bandwidth, so ~2x the H100's
    expected_seconds_per_step=60.0,
)

_L4 = replace(
    _T4,
    name="l4",
    description="L4 (24 GB, bf16): Qwen2-VL-2B in NF4 4-bit with bf16 compute, 6 generations.",
    model=replace(_T4.model, compute_dtype="bfloat16", image_size=448, max_pixels=448 * 448),
    stage1=replace(_T4.stage1, grpo=replace(_T4.stage1.grpo, per_device_train_batch_size=6, num_generations=6)),
    stage2=replace(_T4.stage2, grpo=replace(_T4.stage2.grpo, per_device_train_batch_size=6, num_generations=6)),
    # every candidate (16 images at 448 px: 5,024 tokens by the budget estimate) fits an answering prompt
    evaluation=replace(_T4.evaluation, max_prompt_tokens=5_120),
    # H100, real-size random weights: allocator peak 5.1 GiB in stage 1, 14.1 GiB in stage 2 at 1,249-token prompts
    # and 15.4 GiB at the 2,048-token cap; 18 covers the cap (not measured on an L4 itself, 22 GiB)
    expected_memory_gb=18.0,
    # estimate: the H100 took 18 s (stage 1) / 31 s (stage 2) a step; an L4 has about twice a T4's compute
    expected_seconds_per_step=60.0,
)

_A100 = replace(
    _T4,
    name="a100",
    description="A100 40/80 GB or H100 (bf16): Qwen2.5-VL-3B in NF4 4-bit, bf16 compute, 8 generations, larger images.",
    model=replace(_T4.model, model_id="Qwen/Qwen2.5-VL-3B-Instruct", compute_dtype="bfloat16", image_size=448, max_pixels=448 * 448),
    lora=replace(_T4.lora, r=64, alpha=128),
    # 8 x 2 = 16 completions a step in groups of 8: 2 prompts per optimizer step (colab-t4 and l4 see 4; the
    # miniature stayed flat at 1 and learned at 4). gradient_accumulation_steps=4 would give 4, but TRL generates a
    # step's whole generation batch in one call, which the H100 figures below did not measure: not changed unmeasured
    stage1=replace(_T4.stage1, grpo=replace(_T4.stage1.grpo, per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=2), k=8),  # k: more room for the judge's misses where 8 images fit the 3,072 cap below (our choice, not tuned)
    stage2=replace(
        _T4.stage2,
        grpo=replace(_T4.stage2.grpo, per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=2, max_completion_length=384),
        permutations=3,  # one more order than colab-t4: 8 slots have more positions to learn a habit on (our choice)
        max_prompt_tokens=3072,  # k=8 images at 448 px are 8 x 258 = 2,064 tokens alone (an 8-image prompt measured 2,280)
    ),
    # 300 questions, as on a T4 (was 1,000): an H100 answered a100's prompts in 6.1 s a question at 8 a call (random
    # weights, full 384-token answers), so notebook 05's 14 answering runs over 1,000 questions would take about a
    # day; {"evaluation.questions": 1000} still asks for them. A 40 GB card has room for more tokens a call than a
    # T4: ~13 GiB at the 2B's 0.21 MiB a token (the 3B measured less, 0.1, at 8 prompts) beside the 4-bit 3B (2.8 GiB)
    # and its two adapters. A call of 8 took 48.5 s, one of 32 took 50.5 s (another H100): as flat as the 2B's.
    # Measured at this cap (one call of 21 every-candidate prompts, 97 % of it, both adapters loaded; the prompts were
    # then cut at 3,072 tokens, today's 5,120 puts ~18 in a call): 16.6 GiB of tensors, 25.4 GiB held, 65 % of a
    # 40 GB A100 (tests/test_architectures.py reads the report)
    evaluation=replace(_T4.evaluation, generation_max_batch_tokens=65_536, max_prompt_tokens=5_120),
    # H100, real-size random weights: allocator peak 7.9 GiB in stage 1, 18.5 GiB in stage 2 at 1,818-token
    # prompts (6 images), 33.0 GiB with every prompt filled to the 3,072-token cap and 35.3 GiB at the cap with 8
    # images. 38 covers that with ~7 % for the allocator's spread between runs and still fits a 40 GB A100 (39.4 GiB),
    # so preset="auto" picks it there (it was 44 before stage 2 was measured, a guess; then 32, before the cap was)
    expected_memory_gb=38.0,
    # estimate: the H100 took 23 s (stage 1) / 64-82 s (stage 2) a step; an A100 is slower (was 40 before stage 2
    # was measured)
    expected_seconds_per_step=90.0,
)

PRESETS: dict[str, Preset] = {p.name: p.validate().check_prompt_budget() for p in (_CPU_TINY, _T4, _L4, _A100)}


def get_preset(name: str | Preset = "cpu-tiny", /, **overrides: Any) -> Preset:
    """The named preset, validated, with optional dotted overrides (``"stage1.grpo.max_steps": 5``)."""
    if isinstance(name, Preset):
        return (name.with_overrides(**overrides) if overrides else name.validate()).check_prompt_budget()
    if name not in PRESETS:
        if name == "auto":
            raise ConfigError("unknown preset 'auto': get_preset takes a preset name; "
                              "resolve_preset('auto', **overrides) picks one for this machine's hardware "
                              f"(or choose one of {sorted(PRESETS)})")
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown preset {name!r}; {hint}choose one of {sorted(PRESETS)} (or 'auto' through "
                          "resolve_preset)")
    preset = PRESETS[name]
    return preset.with_overrides(**overrides).check_prompt_budget() if overrides else preset


def usable_cores() -> int:
    """CPU cores this process may use: a container's CPU limit where the OS reports one (``os.cpu_count`` counts
    the host's), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def cuda_native_bf16(device: int = 0) -> bool:
    """Whether CUDA ``device`` computes in bfloat16 natively: compute capability 8.0 (Ampere) or newer.

    Why not ``torch.cuda.is_bf16_supported()``: its default ``including_emulation=True`` merely tries to create a
    bf16 tensor below capability 8.0, which succeeds on a T4 (7.5), so it answers True where bf16 is emulated
    (slow) or fails deep in a kernel. Both ``auto_preset_name`` and ``modeling.check_device`` ask this instead.
    """
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def auto_preset_name() -> str:
    """Pick the preset for this machine: no CUDA -> cpu-tiny; else the largest preset the GPU can run.

    ``a100`` and ``l4`` need native bf16 (``cuda_native_bf16``) *and* a card at least as large as their own
    ``expected_memory_gb`` (compared with the card's total memory in GiB); otherwise ``colab-t4`` (fp16). A GPU
    smaller than even ``colab-t4``'s estimate is an error naming the presets to choose from, not a guess.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is always installed with the course
        return "cpu-tiny"
    if not torch.cuda.is_available():
        return "cpu-tiny"
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if cuda_native_bf16(0):
        for name in ("a100", "l4"):  # largest first
            if PRESETS[name].expected_memory_gb <= total_gb:
                return name
    if PRESETS["colab-t4"].expected_memory_gb <= total_gb:
        return "colab-t4"
    raise ConfigError(
        f"preset='auto': this GPU has {total_gb:.1f} GiB, less than the smallest GPU preset's estimate (colab-t4, "
        f"~{PRESETS['colab-t4'].expected_memory_gb:g} GB). Choose explicitly: preset='colab-t4' (may run out of "
        "memory; lower stage1.k, model.image_size or the GRPO batch through overrides) or preset='cpu-tiny'."
    )


def resolve_preset(name: str | Preset = "auto", /, **overrides: Any) -> Preset:
    """Like ``get_preset`` but also accepts ``"auto"`` (what the notebooks' parameters cell defaults to)."""
    if isinstance(name, str) and name == "auto":
        name = auto_preset_name()
    return get_preset(name, **overrides)


def work_dir(preset: str | Preset, override: str | Path | None = None) -> Path:
    """Where one course run keeps its world, Mini-WebQA, adapters and reports: ``runs/<preset>`` by default."""
    name = preset.name if isinstance(preset, Preset) else preset
    path = Path(override) if override else runs_dir() / check_preset_name(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_preset_yaml(path: str | Path) -> Preset:
    """Read a preset written as YAML in the shape of ``Preset.to_dict()``."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:  # a typo in the file: say where, in one message
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return Preset.from_dict(raw).check_prompt_budget()


__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "GRPO_LOSS_TYPES",
    "PRESETS",
    "STAGE_COMPONENTS",
    "ConfigError",
    "DataSettings",
    "EvalSettings",
    "GRPOSettings",
    "LoraSettings",
    "ModelSettings",
    "Preset",
    "Stage1Settings",
    "Stage2Settings",
    "auto_preset_name",
    "check_preset_name",
    "cuda_native_bf16",
    "data_dir",
    "env_path",
    "get_preset",
    "image_tokens",
    "load_preset_yaml",
    "preset_overrides",
    "project_root",
    "resolve_preset",
    "runs_dir",
    "setting_changes",
    "shared_data_dir",
    "stage2_prompt_tokens_needed",
    "work_dir",
]
