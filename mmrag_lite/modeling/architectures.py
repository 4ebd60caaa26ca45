"""The GPU presets' models at their real size, from their published configs: no weights, no download, no GPU.

Built on PyTorch's ``meta`` device (shapes only, no memory), the real module tree answers what a CPU can answer about
a 2-3B model: how many parameters each part has, which layers bitsandbytes turns into 4-bit (transformers' own rule,
the one ``from_pretrained(quantization_config=...)`` applies), where LoRA goes, and what weights, adapters and
optimizer cost. That is a *floor* under a preset's memory: activations, the logits, generation's KV cache and the
allocator's slack come on top, and only a GPU can measure them: ``MEASURED_STEPS`` holds what one measured.

Bytes per parameter on the QLoRA training path (QLoRA: Dettmers et al. 2023):

* a 4-bit NF4 weight: 0.5 byte, plus one absmax per block of 64 weights (float32, or with double quantisation an
  8-bit code plus one float32 per 256 blocks);
* every other parameter (embeddings, the tied ``lm_head``, norms, biases, the vision patch embedding): float32,
  because ``prepare_model_for_kbit_training`` upcasts everything that is not 4-bit;
* a LoRA parameter: float32 weight + gradient + AdamW's two moments = 16 bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_dir
from ..config import Preset
from .common import ModelLoadError, as_preset, release_memory, torch_dtype
from .loading import bnb_config, bnb_config_kwargs, is_4bit_layer, lora_config_kwargs
from .tiny import TinyVLMSettings, build_tiny_processor, family_classes, generation_config, special_token_ids

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The hub's config.json of each GPU preset's model, architecture fields only (tokens ids and dtypes left out).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2-VL-2B-Instruct": {
        "architecture": "qwen2_vl",
        "parameters": 2_208_985_600,  # the hub's count for this checkpoint: the built skeleton must reproduce it
        "text": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                 "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                 "tie_word_embeddings": True},
        "vision": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
                   "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "architecture": "qwen2_5_vl",
        "parameters": 3_754_622_976,
        "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                 "tie_word_embeddings": True},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
                   "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                   "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                   "hidden_act": "silu"},
    },
}

_GIB = 1024**3  # the presets' *_gb figures and nvidia-smi count GiB


def real_size_config(model_id: str, *, token_ids: Mapping[str, int] | None = None,
                     text: Mapping[str, Any] | None = None, vision: Mapping[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of a GPU preset's model, rebuilt from ``PUBLISHED_CONFIGS`` (offline).

    ``token_ids`` (``tiny.special_token_ids``) points the special tokens at another tokenizer's ids; ``text`` and
    ``vision`` override fields (a shrunken copy of the architecture, for a CPU smoke test).
    """
    if model_id not in PUBLISHED_CONFIGS:
        raise ModelLoadError(f"no published config recorded for {model_id!r}; known: {sorted(PUBLISHED_CONFIGS)}")
    spec = PUBLISHED_CONFIGS[model_id]
    config_cls, _, _ = family_classes(spec["architecture"])
    ids = dict(token_ids or {})
    text_config = {**spec["text"], **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids},
                   **(text or {})}
    return config_cls(text_config=text_config, vision_config={**spec["vision"], **(vision or {})}, **ids,
                      tie_word_embeddings=text_config["tie_word_embeddings"])


def build_random_real_size_model(model_id: str, out_dir: str | Path, *, dtype: torch.dtype = torch.float16,
                                 device: str = "cpu", text: Mapping[str, Any] | None = None,
                                 vision: Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """A GPU preset's model at full size with *random* weights and the miniature's tokenizer, saved for
    ``load_model_and_processor(preset, model_path=out_dir)``.

    Memory and step time depend on the shapes, not on the weights' values, so this measures a preset on a GPU with
    no download. Its completions are random tokens that rarely stop early: every generation runs to
    ``max_completion_length``, the slow end of a real run. ``device="cuda"`` initialises on the GPU (seconds, not
    minutes, for 2-3 B parameters); ``text``/``vision`` shrink it for a CPU smoke test.
    """
    real_size_config(model_id)  # an unknown id fails here, before any work
    architecture = PUBLISHED_CONFIGS[model_id]["architecture"]
    processor = build_tiny_processor(TinyVLMSettings(architecture=architecture))
    config = real_size_config(model_id, token_ids=special_token_ids(processor.tokenizer), text=text, vision=vision)
    _, model_cls, _ = family_classes(architecture)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype).eval()
    model.generation_config = generation_config(processor.tokenizer)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {"label": f"{model_id} architecture with RANDOM weights and a tiny tokenizer: for memory and time only",
                "model_id": model_id, "parameters": sum(p.numel() for p in model.parameters()),
                "text_overrides": dict(text or {}), "vision_overrides": dict(vision or {}), "dtype": str(dtype)}
        (tmp / "mmrag_random_real_size.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    del model
    release_memory()  # free the random copy before anything measures memory
    return Path(out_dir)


def skeleton(config: Any, preset: Preset | str | None = None) -> torch.nn.Module:
    """The model's module tree on the ``meta`` device; with a 4-bit ``preset``, its Linear layers swapped for
    ``Linear4bit`` by transformers' own rule (what stays full precision: tied weights, the output embedding)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    if preset is not None and as_preset(preset).model.load_in_4bit:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.base import HfQuantizer

        keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
        model = replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=bnb_config(preset))
    return model


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> float:
    """Storage of ``numel`` weights in NF4: 4 bits each plus the per-block absmax (see the module docstring)."""
    blocks = numel / blocksize
    absmax = blocks * 1 + (blocks / 256) * 4 if double_quant else blocks * 4
    return numel / 2 + absmax


def lora_targets(model: torch.nn.Module, preset: Preset | str) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) features of every layer the preset's LoRA adapts (PEFT fullmatches the regex)."""
    targets = lora_config_kwargs(preset)["target_modules"]

    def adapted(name: str) -> bool:  # PEFT's rule: a regex is fullmatched, a list matches the last name part
        return re.fullmatch(targets, name) is not None if isinstance(targets, str) else name.split(".")[-1] in targets

    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if adapted(name) and hasattr(m, "in_features")}


@dataclass(frozen=True)
class MemoryFloor:
    """What weights, LoRA adapters and AdamW state of a preset's model take on the GPU: a lower bound, in GiB."""

    preset: str
    model_id: str
    parameters: int
    vision_parameters: int
    quantized_parameters: int  # in Linear4bit layers
    full_precision_parameters: int  # float32 after prepare_model_for_kbit_training
    lora_modules: int
    lora_parameters: int
    quantized_gb: float  # the 4-bit layers' NF4 storage
    full_precision_gb: float  # the rest: float32 on the 4-bit path (embedding and tied lm_head, norms, biases, patch
    # embedding); every weight in the compute dtype for a preset that does not load in 4-bit
    lora_and_optimizer_gb: float
    expected_memory_gb: float  # the preset's own estimate of the whole step

    @property
    def weights_gb(self) -> float:
        return self.quantized_gb + self.full_precision_gb

    @property
    def floor_gb(self) -> float:
        return self.weights_gb + self.lora_and_optimizer_gb

    def as_row(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model_id, "parameters (B)": round(self.parameters / 1e9, 3),
                "4-bit (B)": round(self.quantized_parameters / 1e9, 3),
                "float32 (M)": round(self.full_precision_parameters / 1e6, 1),
                "LoRA modules": self.lora_modules, "LoRA (M)": round(self.lora_parameters / 1e6, 2),
                "weights GiB": round(self.weights_gb, 2), "LoRA+AdamW GiB": round(self.lora_and_optimizer_gb, 2),
                "floor GiB": round(self.floor_gb, 2), "preset estimate GiB": self.expected_memory_gb}


def memory_floor(preset: Preset | str, config: Any | None = None) -> MemoryFloor:
    """Count a preset's model (its published config, or ``config``) and price it on the QLoRA training path."""
    preset = as_preset(preset)
    model = skeleton(config if config is not None else real_size_config(preset.model.model_id), preset)
    quantized = sum(m.weight.numel() for m in model.modules() if is_4bit_layer(m))
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    vision = sum(p.numel() for p in model.model.visual.parameters())
    targets = lora_targets(model, preset)
    lora = sum(preset.lora.r * (i + o) for i, o in targets.values())
    quantized_bytes = nf4_bytes(quantized, bnb_config_kwargs(preset)["bnb_4bit_use_double_quant"])
    # the 4-bit path upcasts the rest to float32; without 4-bit, prepare_model_for_kbit_training never runs
    rest_bytes = (4 if preset.model.load_in_4bit else torch_dtype(preset.model.compute_dtype).itemsize) * (total - quantized)
    return MemoryFloor(
        preset=preset.name, model_id=preset.model.model_id, parameters=total, vision_parameters=vision,
        quantized_parameters=quantized, full_precision_parameters=total - quantized, lora_modules=len(targets),
        lora_parameters=lora, quantized_gb=quantized_bytes / _GIB, full_precision_gb=rest_bytes / _GIB,
        lora_and_optimizer_gb=16 * lora / _GIB,
        expected_memory_gb=preset.expected_memory_gb,
    )


@dataclass(frozen=True)
class MeasuredStep:
    """One GRPO step of a GPU preset as ``benchmarks/bench_gpu_preset.py`` measured it on a real GPU, in GiB.

    The model is the preset's architecture at full size with random weights, so every completion runs to
    ``max_completion_length``: the long, memory-heavy end of a real step. ``report`` is the benchmark's own JSON
    (under ``benchmarks/gpu/``); a test keeps these figures equal to it.
    """

    preset: str
    stage: int
    device: str
    date: str
    loaded_model_gb: float  # the 4-bit model on the GPU before training (compare MemoryFloor.weights_gb)
    peak_allocated_gb: float  # tensors, the largest of the steps
    peak_reserved_gb: float  # what PyTorch's allocator held: what the card must have
    seconds_per_step: float  # median of the steps after the first
    prompt_tokens_max: int | None  # longest prompt of the run (stage 2; None where not recorded)
    report: str  # the JSON report, relative to the repository root
    at_prompt_cap: bool = False  # every prompt filled to the preset's stage2.max_prompt_tokens (--fill-to-cap)
    note: str = ""  # what sets this run apart from the current code or the world's prompts, if anything

    def as_row(self) -> dict[str, Any]:
        return {"preset": self.preset, "stage": self.stage, "GPU": self.device, "loaded 4-bit GiB": self.loaded_model_gb,
                "peak tensors GiB": self.peak_allocated_gb, "peak held GiB": self.peak_reserved_gb,
                "s / step": self.seconds_per_step, "longest prompt": self.prompt_tokens_max or "-",
                "note": self.note or "-"}


_H100 = "NVIDIA H100 80GB HBM3"
_AFTER_FIX = "benchmarks/gpu/h100-2026-11-27-after-vision-fix"
_CAPS = "benchmarks/gpu/h100-2026-11-27-prompt-caps"
_FILLED = "every prompt filled to the {:,}-token cap"  # bench_gpu_preset.py --fill-to-cap
# The current code's figures. The earlier runs in benchmarks/gpu/h100-2026-11-27/ predate the vision-tower fix
# (freeze_vision_tower's no_grad) and are kept there and in benchmarks/RESULTS.md for the comparison. Stage 2 is
# measured twice: at the prompts the synthetic world draws, and with every prompt filled to the preset's cap.
MEASURED_STEPS: tuple[MeasuredStep, ...] = (
    MeasuredStep("colab-t4", 1, _H100, "2026-11-27", 1.859, 3.139, 3.84, 15.96, None,
                 f"{_AFTER_FIX}/colab-t4-stage1.json"),
    MeasuredStep("colab-t4", 2, _H100, "2026-11-27", 1.859, 5.264, 7.998, 29.17, 801,
                 f"{_AFTER_FIX}/colab-t4-stage2.json"),
    MeasuredStep("colab-t4", 2, _H100, "2026-11-27", 1.859, 9.524, 10.713, 32.09, 2048,
                 f"{_CAPS}/colab-t4-stage2-cap.json", True, _FILLED.format(2048)),
    MeasuredStep("l4", 1, _H100, "2026-11-27", 1.859, 4.276, 5.1, 17.73, None, f"{_AFTER_FIX}/l4-stage1.json"),
    MeasuredStep("l4", 2, _H100, "2026-11-27", 1.859, 9.612, 14.068, 31.27, 1249, f"{_AFTER_FIX}/l4-stage2.json"),
    MeasuredStep("l4", 2, _H100, "2026-11-27", 1.859, 13.715, 15.408, 31.15, 2048, f"{_CAPS}/l4-stage2-cap.json", True,
                 _FILLED.format(2048)),
    MeasuredStep("a100", 1, _H100, "2026-11-27", 2.833, 7.158, 7.879, 22.76, None, f"{_CAPS}/a100-stage1.json"),
    MeasuredStep("a100", 2, _H100, "2026-11-27", 2.833, 14.868, 18.525, 64.04, 1818, f"{_AFTER_FIX}/a100-stage2.json"),
    MeasuredStep("a100", 2, _H100, "2026-11-27", 2.833, 31.642, 33.014, 70.53, 3072, f"{_CAPS}/a100-stage2-cap.json", True,
                 _FILLED.format(3072)),
    MeasuredStep("a100", 2, _H100, "2026-11-27", 2.833, 31.345, 35.322, 81.87, 3072,
                 f"{_CAPS}/a100-stage2-cap-8img.json", True, _FILLED.format(3072) + ", image candidates first (8 images)"),
)


def measured_steps(preset: Preset | str) -> list[MeasuredStep]:
    """The GPU measurements of one preset (empty for a preset no GPU has run yet)."""
    name = as_preset(preset).name
    return [m for m in MEASURED_STEPS if m.preset == name]


__all__ = ["MEASURED_STEPS", "PUBLISHED_CONFIGS", "MeasuredStep", "MemoryFloor", "build_random_real_size_model",
           "lora_targets", "measured_steps", "memory_floor", "nf4_bytes", "real_size_config", "skeleton"]
