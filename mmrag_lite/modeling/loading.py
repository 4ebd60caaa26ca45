"""Loading the model and processor for a preset: 4-bit NF4 + LoRA (QLoRA) on CUDA, the miniature on the CPU.

Known traps get a clear message instead of a stack trace deep in a forward pass:

* bf16 asked for on a GPU without bf16 (T4)            -> ``ModelLoadError`` saying use float16 / ``colab-t4``;
* training with several GPUs visible to one process     -> ``ModelLoadError`` (TRL refuses ``nn.DataParallel``), before
  (Kaggle's 2x T4)                                         the download: set ``CUDA_VISIBLE_DEVICES=0`` or ``accelerate launch``;
* Qwen2.5-VL in float16 (a T4)                          -> ``RuntimeWarning``: known garbage/NaN output (vllm#13817);
* 4-bit asked for where bitsandbytes cannot run it      -> logged warning, full-precision load, ``model.mmrag_quantized = False``;
* a float32 ``lm_head`` (``prepare_model_for_kbit_training`` upcasts it) fed fp16/bf16 hidden states
                                                        -> inputs to ``lm_head`` are cast to its dtype (logged).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, Preset, cuda_native_bf16, lora_targets_problem
from .cache import ensure_tiny_vlm
from .common import (
    ModelLoadError,
    as_preset,
    freeze_vision_tower,
    make_model_mixed_batch_safe,
    miniature_progress_off,
    prepare_processor,
    set_pixel_budget,
    torch_dtype,
)

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)


# =============================================================================================== device
def check_device(preset: Preset | str, *, for_training: bool = True, model_path: str | Path | None = None) -> None:
    """Fail early, with advice, when the preset cannot run on this machine (before any download).

    ``for_training=False`` (scoring, evaluation) skips the one check only TRL's trainer needs (a single visible GPU
    outside ``accelerate launch``); ``model_path`` is the folder the weights will come from, when not the preset's.
    """
    preset = as_preset(preset)
    ms = preset.model
    if not ms.is_miniature and not torch.cuda.is_available():
        changed = preset.name == "cpu-tiny"  # the miniature's preset, pointed at another model by an override
        raise ModelLoadError(
            f"preset {preset.name!r} loads {ms.model_id} and needs a CUDA GPU, but none is visible. "
            + ("model.model_id was overridden: the offline miniature is model.model_id='tiny'; a hub model needs a GPU."
               if changed else
               "On a CPU machine use preset='cpu-tiny' (--preset cpu-tiny on the command line; preset='auto' picks it).")
        )
    # native bf16 (capability >= 8.0), not torch.cuda.is_bf16_supported(), which says True on a T4 (see config)
    if ms.compute_dtype == "bfloat16" and torch.cuda.is_available() and not cuda_native_bf16(0):
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        raise ModelLoadError(
            f"preset {preset.name!r} asks for bfloat16 compute, but this GPU ({name}, compute capability "
            f"{major}.{minor}) has no bfloat16 support (e.g. a T4, 7.5; bf16 needs 8.0+). Use float16 instead: "
            "preset='colab-t4', or override model.compute_dtype='float16'."
        )
    if for_training and not ms.is_miniature and torch.cuda.is_available() and torch.cuda.device_count() > 1 \
            and "WORLD_SIZE" not in os.environ:
        # one process with several GPUs: Trainer wraps the model in nn.DataParallel, which TRL's GRPOTrainer refuses,
        # but only after the download and the 4-bit load; the loader puts the whole model on GPU 0 anyway
        raise ModelLoadError(
            f"{torch.cuda.device_count()} GPUs are visible to this single process (e.g. Kaggle's 2x T4), and TRL's "
            "GRPOTrainer refuses the nn.DataParallel that transformers' Trainer would then use. Either train on one "
            "GPU: set CUDA_VISIBLE_DEVICES=0 before torch is imported (first cell of the notebook: "
            "import os; os.environ['CUDA_VISIBLE_DEVICES'] = '0'; or restart the runtime and do it first), or train "
            "on all of them, one process each, with the CLI under `accelerate launch` (docs/multi-gpu.md)."
        )
    if ms.compute_dtype == "float16" and _model_type(preset, model_path) == "qwen2_5_vl":
        msg = (f"preset {preset.name!r} runs {ms.model_id} (Qwen2.5-VL) with float16 compute: Qwen2.5-VL is known to "
               "produce garbage or NaN outputs in float16, its activations overflow fp16's range (vllm-project/vllm"
               "#13817; the 4-bit path keeps only embeddings, norms and lm_head in float32). Use a GPU with bfloat16 "
               "(compute capability 8.0+: preset='l4' or 'a100'), or Qwen2-VL on a T4 (preset='colab-t4').")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


_QWEN25_VL_ID = re.compile(r"qwen2\.5-vl|qwen2_5_vl", re.IGNORECASE)


def _model_type(preset: Preset | str, model_path: str | Path | None = None) -> str | None:
    """The transformers ``model_type`` the preset will load, known without a download: a local folder's
    ``config.json``, else read from the hub id (Qwen2-VL / Qwen2.5-VL names); None when it cannot tell."""
    preset = as_preset(preset)
    ms = preset.model
    if ms.is_miniature and model_path is None:
        return "qwen2_vl"  # the miniature is a Qwen2-VL
    source = Path(model_path) if model_path is not None else Path(ms.model_id)
    config = source / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None
    name = str(model_path if model_path is not None else ms.model_id)
    if _QWEN25_VL_ID.search(name):
        return "qwen2_5_vl"
    if re.search(r"qwen2-vl|qwen2_vl", name, re.IGNORECASE):
        return "qwen2_vl"
    return None


def can_load_in_4bit(device: str) -> tuple[bool, str]:
    """Whether bitsandbytes can run NF4 on ``device`` ("cuda" or "cpu"), and why not when it cannot.

    Importing is not enough: when its native CUDA library fails to load, bitsandbytes still imports (with a stand-in)
    and only raises at first use, i.e. inside ``from_pretrained``. So both devices run a real NF4 round trip
    (``_nf4_probe``, cached per device) before the loader commits to 4-bit.
    """
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        return False, f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    if device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return _nf4_probe(device)


@functools.lru_cache(maxsize=4)
def _nf4_probe(device: str) -> tuple[bool, str]:
    """Quantise and dequantise one small matrix in NF4 on ``device``: the honest test of a bitsandbytes install.

    On the CPU, older bitsandbytes have no backend; on CUDA, a broken native library imports fine and fails here.
    """
    where = "the CPU" if device == "cpu" else device.upper()
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(64, 64, device=device)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        err = (bnbf.dequantize_4bit(q, state) - w).abs().mean().item()
        if not err < 0.5:
            return False, f"bitsandbytes NF4 round trip on {where} is wrong (mean error {err:.3f})"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "not on this machine", reported as such
        return False, f"bitsandbytes cannot run NF4 on {where} ({type(exc).__name__}: {exc})"


# =============================================================================================== quantisation / LoRA
def bnb_config_kwargs(preset: Preset | str) -> dict[str, Any]:
    """The ``BitsAndBytesConfig`` arguments for a preset: NF4 + double quantisation (QLoRA), compute in the preset dtype."""
    preset = as_preset(preset)
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",  # normal-float 4: optimal for normally distributed weights
        "bnb_4bit_use_double_quant": True,  # quantise the quantisation constants too: ~0.4 bit/param saved
        "bnb_4bit_compute_dtype": torch_dtype(preset.model.compute_dtype),
    }


def bnb_config(preset: Preset | str) -> BitsAndBytesConfig:
    """A ``transformers.BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**bnb_config_kwargs(preset))


def lm_target_modules_regex(names: Iterable[str]) -> str:
    """A PEFT ``target_modules`` regex matching the given projections in the LANGUAGE model only.

    PEFT ``fullmatch``es a string against each module's full name. Qwen2-VL / Qwen2.5-VL in transformers 5 name them
    ``model.language_model.layers.<i>.self_attn.q_proj`` / ``...mlp.gate_proj``; the vision tower lives under
    ``model.visual`` (Qwen2.5-VL's vision MLP also has ``gate_proj``/``up_proj``/``down_proj``), so matching on
    the bare names would put adapters into the vision tower too.
    """
    alternatives = "|".join(sorted(set(names)))
    return rf".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{alternatives})"


# The Linear layers of each vision block, ``model.visual.blocks.<i>.<part>.<name>``: attention is ``attn.qkv`` and
# ``attn.proj`` in both families; the MLP is ``mlp.fc1``/``mlp.fc2`` in Qwen2-VL (and the miniature) and
# ``mlp.gate_proj``/``up_proj``/``down_proj`` in Qwen2.5-VL (checked on both real-size skeletons and both tiny
# families, tests/test_architectures.py). The merger (``visual.merger``) and the patch embedding are left out.
VISION_BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "attn": ("qkv", "proj"),
    "mlp": ("fc1", "fc2", "gate_proj", "up_proj", "down_proj"),
}


def vision_target_modules_regex() -> str:
    """A PEFT ``target_modules`` regex matching every vision block's attention and MLP layers (``VISION_BLOCK_LINEARS``)."""
    parts = "|".join(rf"{part}\.(?:{'|'.join(names)})" for part, names in VISION_BLOCK_LINEARS.items())
    return rf".*visual\.blocks\.\d+\.(?:{parts})"


def lora_target_modules_regex(preset: Preset | str) -> str:
    """The preset's LoRA targets as one regex: its ``lora.target_modules`` in the language model, and with
    ``lora.freeze_vision=False`` also every vision block's attention and MLP.

    Bare module names would not do either: on Qwen2-VL they hit no vision layer (its blocks say ``qkv``/``proj``/
    ``fc1``/``fc2``), on Qwen2.5-VL only the MLP, and a name that matches nothing would be dropped without a word
    (PEFT only complains when *nothing* matches); ``Preset.validate`` refuses names outside ``config.LM_PROJECTIONS``.
    """
    lo = as_preset(preset).lora
    if problem := lora_targets_problem(lo.target_modules):  # a Preset built without validate() gets here too
        raise ConfigError(problem)
    language = lm_target_modules_regex(lo.target_modules)
    return language if lo.freeze_vision else f"(?:{language})|(?:{vision_target_modules_regex()})"


def lora_config_kwargs(preset: Preset | str) -> dict[str, Any]:
    """The ``peft.LoraConfig`` arguments for a preset (LoRA on the language model's projections; with
    ``lora.freeze_vision=False`` on the vision blocks' attention and MLP too: ``lora_target_modules_regex``)."""
    preset = as_preset(preset)
    lo = preset.lora
    return {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": lora_target_modules_regex(preset),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def lora_config(preset: Preset | str) -> LoraConfig:
    """A ``peft.LoraConfig`` for ``GRPOTrainer(peft_config=...)``."""
    from peft import LoraConfig

    return LoraConfig(**lora_config_kwargs(preset))


def _align_lm_head(model: torch.nn.Module, compute_dtype: torch.dtype) -> str | None:
    """A safety net: make an ``lm_head`` whose dtype differs from the compute dtype accept hidden states of any dtype.

    On the QLoRA training path there is no mismatch (measured on the miniature with bf16 compute):
    ``prepare_model_for_kbit_training`` upcasts embeddings, norms and ``lm_head`` to float32 and the 4-bit layers
    return their input's dtype, so hidden states reach ``lm_head`` in float32. A float32 ``lm_head`` fed half-precision
    activations by any other path would stop at the last matmul with ``expected mat1 and mat2 to have the same
    dtype``; casting the head's *input* avoids that without touching the quantised layers. It does not make logits
    float32 under the Trainer's half-precision autocast. TRL's ``GRPOConfig(cast_lm_head_to_fp32=True)`` is no switch
    for that here: TRL supports it only with untied embeddings (``tie_word_embeddings=False``), and both GPU presets'
    models (Qwen2-VL-2B, Qwen2.5-VL-3B) tie ``lm_head`` to the input embedding.
    TRL 1.16's GRPO loss never calls ``lm_head``: its chunked log-prob reads ``lm_head.weight`` and casts both sides
    to the autocast dtype itself, so there the hook is idle.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        return None
    if head.weight.dtype == compute_dtype or getattr(head, "_mmrag_cast_hook", False):
        return None

    def _cast_input(module: torch.nn.Module, args: tuple) -> tuple:
        if args and torch.is_tensor(args[0]) and args[0].dtype != module.weight.dtype:
            return (args[0].to(module.weight.dtype),) + tuple(args[1:])
        return args

    head.register_forward_pre_hook(_cast_input)
    head._mmrag_cast_hook = True
    note = (
        f"lm_head is {head.weight.dtype} (prepare_model_for_kbit_training upcasts it) while the 4-bit layers compute in "
        f"{compute_dtype}: a call of lm_head casts its input to {head.weight.dtype}. (TRL's training loss reads "
        "lm_head.weight itself and computes in the autocast dtype.)"
    )
    logger.info(note)
    return note


def _disable_cpu_4bit_packing(model: torch.nn.Module) -> str | None:
    """Keep bitsandbytes' CPU inference fast path off, for training and inference alike.

    On CPUs with AVX512-BF16, ``Linear4bit`` re-packs its weight *in place* the first time it runs in eval mode
    without gradients, and from then on computes through ``gemv_4bit``, a kernel meant for inference only that
    rounds activations to bfloat16. A model evaluated before (or between) training steps would then train through
    that kernel; and a judge loaded for inference scored through it while the same weights loaded for training did
    not (P(yes) up to 0.003 apart on the miniature: enough to flip ties in recall@k between notebook 03's "before"
    and "after"). Turning the fast path off costs nothing noticeable at the miniature's size.
    """
    changed = 0
    for module in model.modules():
        if is_4bit_layer(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    if changed:
        note = f"bitsandbytes' AVX512-BF16 CPU inference packing disabled on {changed} Linear4bit layers (one kernel for training and scoring)"
        logger.info(note)
        return note
    return None


def _upcast_for_fp16_inference(model: torch.nn.Module) -> str | None:
    """Give an fp16 4-bit model used for inference the float32 non-4-bit weights its training run had.

    ``prepare_model_for_kbit_training`` upcasts embeddings, norms and ``lm_head`` to float32 for training, so the
    residual stream runs in float32 while the 4-bit matmuls compute in fp16. Loaded for inference without it, the
    whole model would run in fp16, where Qwen2(-VL) activations are known to overflow (NaN logits, "!!!!" output;
    transformers#33294), and the same adapter would score differently in training and evaluation. bf16 has
    float32's range and needs none of this; so a bf16 inference model keeps those weights in bf16 while training has
    them in float32, and stage-1 scores can differ slightly between the trained model and a re-load (docs/modeling.md).
    """
    moved = 0
    for param in model.parameters():
        if param.dtype == torch.float16 and not _is_4bit_param(param):
            param.data = param.data.float()
            moved += 1
    if not moved:
        return None
    note = (f"fp16 4-bit inference: {moved} non-4-bit tensors (embeddings, norms, lm_head) kept in float32, as in "
            "training, so activations cannot overflow fp16")
    logger.info(note)
    return note


def _is_4bit_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is bitsandbytes' packed 4-bit weight (``Params4bit``)."""
    return type(param).__name__ == "Params4bit"


def fallback_message(preset: Preset, why: str) -> str:
    """What loading without 4-bit means for ``preset``; in float16 it also loses the float32 residual stream that the
    4-bit path keeps (``_upcast_for_fp16_inference``), so it says so rather than letting NaN logits surprise later."""
    ms = preset.model
    msg = (f"preset {preset.name!r} asks for 4-bit NF4 but it cannot run here: {why}. Loading in "
           f"{ms.compute_dtype} instead (model.mmrag_quantized = False); memory use will be ~4x higher.")
    if ms.compute_dtype == "float16":
        msg += (" In plain float16 Qwen2(-VL) activations can overflow (NaN logits, '!!!!' output; transformers#33294):"
                " install a CUDA build of bitsandbytes (pip install bitsandbytes) and restart rather than train this way.")
    return msg


# =============================================================================================== loading
def load_model_and_processor(
    preset: Preset | str,
    *,
    adapter_path: str | Path | None = None,
    for_training: bool = True,
    model_path: str | Path | None = None,
) -> tuple[Any, Any]:
    """Model + processor for a preset: 4-bit NF4 on CUDA for GPU presets, the miniature (NF4 on CPU) for cpu-tiny.

    ``adapter_path`` loads a saved LoRA adapter on top (trainable when ``for_training``). ``model_path`` overrides
    where the weights come from (a local folder); by default the hub id, or ``ensure_tiny_vlm()`` for ``"tiny"``.
    The returned model carries ``mmrag_quantized`` (bool), ``mmrag_preset`` and ``mmrag_source``.
    """
    from transformers import AutoModelForImageTextToText

    preset = as_preset(preset)
    ms = preset.model
    tiny = ms.is_miniature
    check_device(preset, for_training=for_training, model_path=model_path)
    source = str(model_path) if model_path else (str(ensure_tiny_vlm(preset)) if tiny else ms.model_id)
    device = "cuda" if (torch.cuda.is_available() and not tiny) else "cpu"
    dtype = torch_dtype(ms.compute_dtype)

    quantize = ms.load_in_4bit
    if quantize:
        ok, why = can_load_in_4bit(device)
        if not ok:
            msg = fallback_message(preset, why)
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            quantize = False

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": ms.attn_implementation,
        # one whole 4-bit copy per process on its own GPU: under `accelerate launch` LOCAL_RANK picks it
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))} if device == "cuda" else "cpu",
    }
    if quantize:
        kwargs["quantization_config"] = bnb_config(preset)
    with miniature_progress_off(tiny):
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)  # trust_remote_code never
    make_model_mixed_batch_safe(model)

    notes: list[str] = []
    if quantize and for_training:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing trades compute for memory: worth it on a GPU, pointless for the miniature.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=not tiny,
            gradient_checkpointing_kwargs={"use_reentrant": False} if not tiny else None,
        )
    if quantize and not for_training and dtype == torch.float16:
        note = _upcast_for_fp16_inference(model)
        if note:
            notes.append(note)
    if quantize:
        note = _align_lm_head(model, dtype)
        if note:
            notes.append(note)
        if device == "cpu":  # training and scoring alike: one kernel, so a judge scores the same however loaded
            note = _disable_cpu_4bit_packing(model)
            if note:
                notes.append(note)

    if for_training and preset.lora.freeze_vision and freeze_vision_tower(model):
        notes.append("vision tower runs under no_grad (frozen; LoRA on the language model only)")
    processor = load_processor(preset, source)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=for_training)
    if not for_training:
        model.eval()
        model.requires_grad_(False)  # inference only: no autograd bookkeeping
    for target in {id(model): model, id(getattr(model, "base_model", model)): getattr(model, "base_model", model)}.values():
        try:
            target.mmrag_quantized = quantize
            target.mmrag_preset = preset.name
            target.mmrag_source = source
            target.mmrag_notes = notes
        except Exception:  # noqa: BLE001, S110 # pragma: no cover - attribute assignment on exotic wrappers
            pass
    return model, processor


def load_processor(preset: Preset | str, source: str | Path | None = None) -> Any:
    """The preset's processor alone (no weights: enough to render and measure prompts): its pixel budget, safe with
    mixed text-only / image batches, left padding for batched generation (TRL pads its own batches)."""
    from transformers import AutoProcessor

    preset = as_preset(preset)
    ms = preset.model
    if source is None:
        source = ensure_tiny_vlm(preset) if ms.is_miniature else ms.model_id
    processor = AutoProcessor.from_pretrained(str(source))
    set_pixel_budget(processor, ms.min_pixels, ms.max_pixels)
    return prepare_processor(processor)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters; a 4-bit layer counts its packed storage (two weights per element), so the
    total is below the checkpoint's (PEFT's ``print_trainable_parameters`` doubles those layers instead)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def is_4bit_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (False where bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)
    except ImportError:
        return False


