"""Static "API drift" checks: every argument our presets pass still exists in the pinned libraries.

Why: TRL, PEFT and transformers rename and drop arguments between minor versions (TRL 1.x has no
``max_prompt_length`` in ``GRPOConfig``; transformers 5 renamed ``torch_dtype`` to ``dtype``). A renamed keyword
fails deep inside a 10-minute notebook run; these checks fail in a second, naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from mmrag_lite import modeling as M
from mmrag_lite.config import PRESETS

PRESET_NAMES = sorted(PRESETS)


def _accepted(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """Names a callable accepts, and whether it takes ``**kwargs`` (which would make the check vacuous)."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _assert_accepts(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    names, _ = _accepted(fn)
    unknown = sorted(set(kwargs) - names)
    assert not unknown, f"{what} no longer accepts {unknown}; accepted: {sorted(names)}"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bitsandbytes_config_accepts_preset_kwargs(name: str) -> None:
    from transformers import BitsAndBytesConfig

    kwargs = M.bnb_config_kwargs(PRESETS[name])
    _assert_accepts(BitsAndBytesConfig.__init__, kwargs, "BitsAndBytesConfig")
    cfg = BitsAndBytesConfig(**kwargs)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_lora_config_accepts_preset_kwargs(name: str) -> None:
    from peft import LoraConfig

    kwargs = M.lora_config_kwargs(PRESETS[name])
    _assert_accepts(LoraConfig.__init__, kwargs, "peft.LoraConfig")
    cfg = LoraConfig(**kwargs)
    assert cfg.task_type == "CAUSAL_LM" and cfg.r == PRESETS[name].lora.r


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_grpo_config_accepts_training_kwargs(name: str, stage: int, tmp_path) -> None:
    from trl import GRPOConfig

    try:
        from mmrag_lite.training import grpo_config_kwargs
    except ImportError as exc:  # the training module owes us this function (see docs/CONTRACTS.md)
        pytest.fail(f"mmrag_lite.training.grpo_config_kwargs(preset, stage) is missing: {exc}")
    kwargs = grpo_config_kwargs(PRESETS[name], stage)
    assert isinstance(kwargs, dict) and kwargs
    _assert_accepts(GRPOConfig.__init__, kwargs, "trl.GRPOConfig")
    assert "max_prompt_length" not in kwargs  # removed in TRL 1.x
    if name == "cpu-tiny":  # constructing GPU configs on a CPU box would trip fp16/bf16 device checks
        cfg = GRPOConfig(**{**kwargs, "output_dir": str(tmp_path)})
        assert cfg.use_cpu and not cfg.bf16 and not cfg.fp16


def test_grpo_trainer_accepts_the_keywords_training_passes() -> None:
    from trl import GRPOTrainer

    _assert_accepts(
        GRPOTrainer.__init__,
        dict.fromkeys(["model", "reward_funcs", "args", "train_dataset", "processing_class", "peft_config", "callbacks"]),
        "trl.GRPOTrainer",
    )


def test_loading_calls_still_accept_our_keywords() -> None:
    from peft import PeftModel, prepare_model_for_kbit_training

    _assert_accepts(prepare_model_for_kbit_training,
                    {"model": 0, "use_gradient_checkpointing": 0, "gradient_checkpointing_kwargs": 0},
                    "peft.prepare_model_for_kbit_training")
    _assert_accepts(PeftModel.from_pretrained, {"model": 0, "model_id": 0, "is_trainable": 0},
                    "peft.PeftModel.from_pretrained")


def test_qwen2vl_image_processor_takes_pixel_budget() -> None:
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    assert ip.size["shortest_edge"] == 56 * 56 and ip.size["longest_edge"] == 56 * 56
