"""Loading the vision-language model and its processor for a preset, and the tiny offline miniature.

Two paths, one function (``load_model_and_processor``):

* **GPU presets** load a hub checkpoint (Qwen2-VL-2B / Qwen2.5-VL-3B) in 4-bit NF4 with double quantisation
  (QLoRA: Dettmers et al. 2023) on CUDA, ready for LoRA adapters on the *language model* only.
* **cpu-tiny** loads ``"tiny"``: a randomly initialised miniature ``Qwen2VLForConditionalGeneration`` built here,
  offline, with a locally trained byte-level BPE tokenizer. It goes through the *same* ``from_pretrained`` call and,
  because bitsandbytes 0.50 runs NF4 on the CPU, through the same 4-bit path. It is a plumbing check, not a VLM:
  a short supervised warm-up (``warm_up_tiny_vlm``) gives it just enough skill that GRPO has a signal to improve.

Known traps get a clear message instead of a stack trace deep in a forward pass:

* bf16 asked for on a GPU without bf16 (T4)            -> ``ModelLoadError`` saying use float16 / ``colab-t4``;
* 4-bit asked for where bitsandbytes cannot run it      -> logged warning, full-precision load, ``model.mmrag_quantized = False``;
* a float32 ``lm_head`` (``prepare_model_for_kbit_training`` upcasts it) fed fp16/bf16 hidden states
                                                        -> inputs to ``lm_head`` are cast to its dtype (logged);
* TRL GRPO batches mixing text-only and image prompts  -> ``make_mixed_batch_safe`` (``None`` image lists -> ``[]``);
* different image counts *and* sizes in one batch       -> ``prepare_image`` resizes every image to one square size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir
from .config import Preset, cuda_native_bf16, data_dir, get_preset
from .prompts import (
    DEFAULT_TAGS,
    NO,
    STAGE1_REASONING_HINT,
    STAGE1_SYSTEM,
    STAGE2_REASONING_HINT,
    STAGE2_SYSTEM,
    YES,
    short_ids,
    stage1_images,
    stage1_messages,
    stage1_target,
    stage2_images,
    stage2_messages,
    stage2_target,
)

logger = logging.getLogger(__name__)

TINY_LABEL = "a randomly initialised miniature for checking the plumbing"


class ModelLoadError(RuntimeError):
    """A model/processor that cannot be loaded as asked; the message says why and what to use instead."""


# =============================================================================================== dtypes / device
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (presets store dtypes as strings so they stay plain data)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown compute dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def _as_preset(preset: Preset | str) -> Preset:
    return get_preset(preset) if isinstance(preset, str) else preset


def check_device(preset: Preset | str) -> None:
    """Fail early, with advice, when the preset cannot run on this machine (before any download)."""
    preset = _as_preset(preset)
    ms = preset.model
    if ms.model_id != "tiny" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"preset {preset.name!r} loads {ms.model_id} and needs a CUDA GPU, but none is visible. "
            "On a CPU machine use preset='cpu-tiny' (or resolve_preset('auto'), which picks it)."
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
    preset = _as_preset(preset)
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",  # normal-float 4: optimal for normally distributed weights
        "bnb_4bit_use_double_quant": True,  # quantise the quantisation constants too: ~0.4 bit/param saved
        "bnb_4bit_compute_dtype": torch_dtype(preset.model.compute_dtype),
    }


def bnb_config(preset: Preset | str):
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


def lora_config_kwargs(preset: Preset | str) -> dict[str, Any]:
    """The ``peft.LoraConfig`` arguments for a preset (LoRA on the language model's projections only)."""
    preset = _as_preset(preset)
    lo = preset.lora
    targets: str | list[str] = (
        lm_target_modules_regex(lo.target_modules) if lo.freeze_vision else list(lo.target_modules)
    )
    return {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def lora_config(preset: Preset | str):
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
    float32 under the Trainer's half-precision autocast; that is TRL's ``GRPOConfig(cast_lm_head_to_fp32=...)``.
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
        f"{compute_dtype}: hidden states are cast to {head.weight.dtype} before lm_head."
    )
    logger.info(note)
    return note


def _disable_cpu_4bit_packing(model: torch.nn.Module) -> str | None:
    """Keep bitsandbytes' CPU inference fast path off for a model that will be trained.

    On CPUs with AVX512-BF16, ``Linear4bit`` re-packs its weight *in place* the first time it runs in eval mode
    without gradients, and from then on computes through ``gemv_4bit``, a kernel meant for inference only. A model
    that is evaluated before (or between) training steps would then train through that inference kernel. Turning
    the fast path off costs nothing noticeable at the miniature's size and keeps training on the standard path.
    """
    changed = 0
    for module in model.modules():
        if is_4bit_layer(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    if changed:
        note = f"bitsandbytes' AVX512-BF16 CPU inference packing disabled on {changed} Linear4bit layers (training model)"
        logger.info(note)
        return note
    return None


# =============================================================================================== images / processor
def prepare_image(img: Any, preset: Preset | str | int) -> Any:
    """Resize to the preset's fixed ``image_size`` square, RGB.

    Why: TRL GRPO batches whose prompts have *different image counts and different image sizes* crash in Qwen2-VL's
    ``get_rope_index`` (``shape mismatch: value tensor of shape [3, 150] cannot be broadcast ... [3, 148]``). One size
    for every image gives every image the same number of tokens, avoids it, and makes memory predictable.
    """
    from PIL import Image

    size = preset if isinstance(preset, int) else _as_preset(preset).model.image_size
    if img is None:
        return None
    if not isinstance(img, Image.Image):
        img = Image.fromarray(img) if hasattr(img, "__array__") else img
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


def prepare_images(images: Sequence[Any] | None, preset: Preset | str | int) -> list[Any]:
    return [prepare_image(im, preset) for im in (images or []) if im is not None]


def _none_images_as_empty(images: Any) -> Any:
    if isinstance(images, (list, tuple)) and any(x is None for x in images) and any(
        isinstance(x, (list, tuple)) or x is None for x in images
    ):
        return [[] if x is None else x for x in images]
    return images


class _MixedBatchSafe:
    """Mixin for a processor class: turns ``None`` entries of a batched ``images`` list into ``[]``.

    Why: TRL marks a text-only prompt with ``None`` in the per-prompt image list; the Qwen2-VL processor rejects it
    (``TypeError: only a single or a list of entries is supported but got type=<class 'NoneType'>``) but accepts
    ``[]``. WebQA mixes text snippets and images, so stage 1 meets this in its first batch.
    """

    _mmrag_mixed_batch_safe = True

    def __call__(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if "images" in kwargs:
            images = _none_images_as_empty(kwargs["images"])
            if isinstance(images, list) and images and all(isinstance(x, list) and not x for x in images):
                images = None  # a batch of text-only prompts: no image inputs at all
            kwargs["images"] = images
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


_SAFE_CLASSES: dict[type, type] = {}


def make_mixed_batch_safe(processor: Any) -> Any:
    """Make ``processor`` accept mixed text-only/image batches (trap 1), in place; returns it.

    The instance's class is swapped for a subclass *with the same name*, so it is still a ``ProcessorMixin`` (TRL's
    check), ``save_pretrained`` still writes the original ``processor_class`` and ``AutoProcessor.from_pretrained``
    reloads it without any custom code (``load_model_and_processor`` re-applies the fix).
    """
    cls = type(processor)
    if getattr(cls, "_mmrag_mixed_batch_safe", False):
        return processor
    safe = _SAFE_CLASSES.get(cls)
    if safe is None:
        safe = type(cls.__name__, (_MixedBatchSafe, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        _SAFE_CLASSES[cls] = safe
    processor.__class__ = safe
    return processor


def _set_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return
    ip.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, int(value))


# =============================================================================================== the tiny VLM: build
@dataclass(frozen=True)
class TinyVLMSettings:
    """Build settings of the miniature; their hash names its cache folder, so any change rebuilds it."""

    hidden_size: int = 128  # 2x the first probe's 64: learns the warm-up tasks noticeably faster, still ~1 M params
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4  # head_dim 32
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # temporal/height/width rotary split: sums to head_dim/2
    vision_depth: int = 2
    vision_embed_dim: int = 64  # bnb's AVX512-BF16 CPU kernel needs in_features % 64 == 0 in every 4-bit layer
    vision_num_heads: int = 2
    patch_size: int = 14
    merge_size: int = 2
    vocab_size: int = 2048  # BPE target, special and tag tokens included: world words and D1..D16 are one token
    image_size: int = 56  # 4x4 patches -> 4 image tokens after the 2x2 merge
    seed: int = 0
    version: int = 1  # bump when the build code changes in a way the settings do not show


@dataclass(frozen=True)
class WarmUpSettings:
    """Supervised warm-up of the miniature: just enough skill that GRPO rewards are not all zero."""

    max_steps: int = 800  # hard cap; relevance (title matching) only starts to move after ~250-450 steps, and not
    # on every run: the early stop below usually ends the warm-up well before the cap
    batch_size: int = 16
    learning_rate: float = 3e-3  # peak; 6e-3 and 1e-2 never left the relevance plateau in 800 steps (measured)
    warmup_steps: int = 10  # then cosine decay to 10% at max_steps (steadier than a constant rate)
    weight_decay: float = 0.0
    stage2_every: int = 4  # every 4th step is a stage-2 batch; separate batches keep short stage-1 prompts unpadded
    stage2_batch_size: int = 8  # and keep the long stage-2 answers from drowning the one-token stage-1 verdict
    eval_every: int = 20
    eval_items: int = 64  # balanced items from half of the validation questions, for the early-stopping check
    target_accuracy: float = 0.65  # stop once stage-1 accuracy reaches this: above majority (0.5), far from solved
    max_seconds: float = 600.0  # guard for a very busy machine (the cached result records steps and seconds)
    # Stage-1 items shown with the reasoning prompt, and how many of those get the (empty) <think></think> block.
    # The miniature cannot read instructions, so it learns the reasoning format only as often as it is shown:
    # it starts GRPO writing it ~30% of the time, a gap RL closes visibly on a CPU. No reasoning text is taught.
    reasoning_prompt_fraction: float = 0.5
    think_fraction: float = 0.3
    max_questions: int = 400
    seed: int = 0
    # A fixed torch thread count, not the machine's: the float sums (hence the warm model) depend on it, and with it
    # fixed a rebuild is bit-identical (measured for 1 and 2). Two threads: 0.18 s/step vs 0.24 s on one (2 cores).
    # Capped at the cores this process may use (more threads than cores contend), see warm_up_threads.
    threads: int = 2
    version: int = 1  # part of the cache key: bump when the warm-up code changes in a way the settings do not show


QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # same strings and order as Qwen2-VL's tokenizer (different ids: our vocabulary is tiny)

# Equivalent to Qwen2-VL-Instruct's template (system/user/assistant turns, image part -> vision placeholders).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Letters and digits stay together (" D12", " 1875" can become one token); otherwise GPT-2's split.
_PRETOKENIZE_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{N}]+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
            "cyan", "magenta", "teal", "navy", "gold", "silver", "maroon", "olive", "beige", "violet"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "diamond", "hexagon", "oval", "cross", "heart",
           "pentagon", "ring", "stripe", "stripes", "dot", "dots", "disk", "bar", "arrow"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve"]
_COMMON_WORDS = ["the", "a", "an", "of", "in", "on", "at", "to", "is", "are", "was", "were", "be", "been", "has", "have", "had", "does", "do", "did", "what", "which", "who", "where", "when", "how", "many", "much", "color", "colour", "shape", "number", "year", "name", "city", "country", "town", "river", "mountain", "tower", "bridge", "building", "statue", "museum", "church", "castle", "lake", "island", "park", "flag", "logo", "sign", "car", "bird", "cat", "dog", "flower", "tree", "house", "door", "window", "roof", "wall", "sky", "photo", "picture", "image", "document", "question", "answer", "yes", "no", "true", "false", "both", "same", "different", "more", "less", "larger", "smaller", "taller", "older", "newer", "first", "second", "third", "left", "right", "top", "bottom", "front", "back", "inside", "outside", "painted", "built", "founded", "located", "called", "known", "famous", "made", "from", "with", "and", "or", "but", "not", "this", "that", "these", "those", "it", "its", "there", "their", "they", "he", "she", "his", "her", "by", "for", "as", "image", "titled", "caption", "fact", "facts", "about", "world", "object", "objects", "item", "items", "kind", "type", "style", "pattern", "background", "foreground", "center", "middle", "edge", "corner", "side", "large", "small", "big", "little", "tall", "short", "old", "new", "bright", "dark", "light", "pale"]


def _world_vocabulary() -> dict[str, list[str]]:
    """Words of the synthetic world (from ``mmrag_lite.data.world`` when present, else a built-in fallback)."""
    vocab = {"colours": list(_COLOURS), "shapes": list(_SHAPES), "adjectives": ["Quiet", "Old", "Royal", "Silver"],
             "places": ["Garden", "Tower", "Bridge", "Museum"], "names": ["Lina", "Omar", "Kai", "Mira"],
             "cities": ["Lisbon", "Oslo", "Kyoto"], "filler": []}
    try:
        from .data import world as w

        vocab["colours"] = sorted(set(vocab["colours"]) | set(w.COLORS))
        vocab["shapes"] = sorted(set(vocab["shapes"]) | set(w.SHAPES))
        vocab.update(adjectives=list(w.ADJECTIVES), places=list(w.PLACES), names=list(w.NAMES),
                     cities=list(w.CITIES), filler=[w.FILLER])
    except Exception:  # noqa: BLE001, S110 - the data module is optional for building the tokenizer
        pass
    return vocab


def _tokenizer_corpus() -> list[str]:
    """Text the miniature's BPE is trained on: our prompt templates, targets, tags and the synthetic world's words.

    Frequent strings become single tokens, so ``<answer>yes</answer>`` is three tokens and ``D7`` is one.
    """
    rng = random.Random(1234)
    wv = _world_vocabulary()
    lines: list[str] = ["You are a helpful assistant."] + wv["filler"] * 20
    for reasoning in (True, False):
        lines.append(STAGE1_SYSTEM.format(reasoning=STAGE1_REASONING_HINT if reasoning else ""))
        for k in range(1, 17):
            lines.append(STAGE2_SYSTEM.format(k=k, reasoning=STAGE2_REASONING_HINT if reasoning else ""))
    vocab = _COLOURS + _SHAPES + _NUMBER_WORDS + _COMMON_WORDS
    ids = short_ids(16)
    questions = [
        "What color are the {s}s in the {t}?", "What shape are the {c} objects in the {t}?",
        "How many {s}s are there in the {t}?", "Are the {s}s in the {t} {c}?", "Which has more {s}s, the {t} or the {t2}?",
        "What is shown in the picture of the {t}?", "In which year was the {t} founded?",
        "Who founded the {t}, and in which city is it?", "Are the {s}s in the {t} {c} or {c2}?",
    ]
    facts = [
        "{t}. {n} {c} {s}s on a plain background.", "A picture of the {t}.", "The {t} was founded in {y} by {a} {a}son.",
        "The {t} is located in {city}, close to the old river.", "The {t} has {k} rooms and a small courtyard.",
        "The {t} is {k} metres tall and was restored in {y}.", "The {s}s in the {t} are {c}.",
    ]
    for _ in range(3000):
        words = rng.sample(vocab, 6)
        title = f"{rng.choice(wv['adjectives'])} {rng.choice(wv['places'])} of {rng.choice(wv['names'])}"
        title2 = f"{rng.choice(wv['adjectives'])} {rng.choice(wv['places'])} of {rng.choice(wv['names'])}"
        fill = {"t": title, "t2": title2, "s": rng.choice(wv["shapes"]), "c": rng.choice(wv["colours"]),
                    "c2": rng.choice(wv["colours"]), "n": rng.choice(_NUMBER_WORDS[1:6]).capitalize(),
                    "y": rng.randint(1650, 2020), "a": rng.choice(wv["names"]), "city": rng.choice(wv["cities"]),
                    "k": rng.randint(2, 240)}
        q = rng.choice(questions).format(**fill)
        f = rng.choice(facts).format(**fill)
        lines.append(f"Document: Image titled '{title}': {f}\nQuestion: {q}\nDoes the document help?")
        lines.append(f"Document: {title}: {f}\nQuestion: {q}\nDoes the document help?")
        lines.append(f"{rng.choice(ids)}: {f}\n{rng.choice(ids)}: Image titled '{title2}': {words[2]} {words[3]}\n")
        lines.append(stage1_target(rng.choice([YES, NO])))
        lines.append(stage1_target(rng.choice([YES, NO]), reasoning=True, think=f"the {words[0]} is {words[1]}"))
        gold = sorted(rng.sample(ids[:8], rng.randint(1, 2)), key=lambda s: int(s[1:]))
        lines.append(stage2_target(gold, rng.choice([f, fill["c"], fill["s"], str(fill["k"])])))
        lines.append(", ".join(rng.sample(ids, 3)))
    # bare words (no leading space) as they appear right after "<answer>" or at the start of a line
    bare = vocab + wv["colours"] + wv["shapes"] + [w.capitalize() for w in vocab] + [f"{s}s" for s in wv["shapes"]]
    lines += bare * 10 + [" ".join(vocab)] * 20 + ["yes no yes no Yes No"] * 200 + [" ".join(str(i) for i in range(100))] * 20
    return lines


def build_tiny_tokenizer(settings: TinyVLMSettings = TinyVLMSettings()):
    """A byte-level BPE (a few hundred merges) with Qwen2-VL's special tokens, trained here in ~1 s."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tags = [DEFAULT_TAGS.open(n) for n in ("think", "answer", "sources")] + [
        DEFAULT_TAGS.close(n) for n in ("think", "answer", "sources")
    ]
    n_extra = len(QWEN2VL_SPECIAL_TOKENS) + len(tags)
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size - len(tags),
        min_frequency=2,
        special_tokens=QWEN2VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # The tags are ordinary (non-special) added tokens: one id each, and they survive skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    del n_extra
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN2VL_SPECIAL_TOKENS[1:],
        padding_side="left",  # decoder-only: batched generation pads on the left
        model_max_length=4096,
    )
    fast.chat_template = QWEN2VL_CHAT_TEMPLATE
    return fast


def build_tiny_vlm(out_dir: str | Path, settings: TinyVLMSettings = TinyVLMSettings()) -> Path:
    """Build the randomly initialised miniature Qwen2-VL + processor and ``save_pretrained`` them into ``out_dir``.

    Written to a temporary folder and renamed when complete, so a crash never leaves half a model behind.
    """
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(settings)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    pixels = settings.image_size * settings.image_size
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels, max_pixels=pixels, patch_size=settings.patch_size, merge_size=settings.merge_size
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=settings.patch_size, merge_size=settings.merge_size)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )

    head_dim = settings.hidden_size // settings.num_attention_heads
    if sum(settings.mrope_section) * 2 != head_dim:
        raise ModelLoadError(f"mrope_section {settings.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    vocab = len(tokenizer)
    text_config = {
        "vocab_size": vocab, "hidden_size": settings.hidden_size, "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_hidden_layers, "num_attention_heads": settings.num_attention_heads,
        "num_key_value_heads": settings.num_key_value_heads, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(settings.mrope_section)},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": settings.vision_depth, "embed_dim": settings.vision_embed_dim, "hidden_size": settings.hidden_size,
        "num_heads": settings.vision_num_heads, "patch_size": settings.patch_size,
        "spatial_merge_size": settings.merge_size, "in_channels": 3, "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], do_sample=False,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        info = {"label": TINY_LABEL, "settings": asdict(settings), "parameters": n_params, "vocab_size": vocab,
                "warmed_up": False}
        (tmp / "mmrag_tiny.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(info), encoding="utf-8")
    logger.info("built tiny VLM (%d parameters) in %s", n_params, out_dir)
    return out_dir


def _model_card(info: Mapping[str, Any]) -> str:
    warm = info.get("warm_up")
    lines = [
        "# mmrag-lite tiny Qwen2-VL",
        "",
        f"**This is {TINY_LABEL}** — not a vision-language model. It has the architecture of Qwen2-VL",
        "(`Qwen2VLForConditionalGeneration`) at a miniature size, a byte-level BPE tokenizer trained locally on the",
        "course's prompt templates, Qwen2-VL's special tokens and chat template, and a `Qwen2VLImageProcessor` with a",
        "56x56 pixel budget (4 image tokens per image). It exists so that the whole course (4-bit loading, LoRA,",
        "TRL GRPO with images, two-stage inference, metrics) runs offline on a 2-core CPU in minutes.",
        "",
        f"- parameters: {info.get('parameters')}",
        f"- vocabulary: {info.get('vocab_size')} tokens",
        f"- build settings: `{json.dumps(info.get('settings'))}`",
    ]
    if warm:
        lines += [
            "",
            "## Supervised warm-up",
            "A few hundred teacher-forced steps on the synthetic world's *train* split (stage-1 `<answer>yes|no</answer>`",
            "and stage-2 `<sources>..</sources><answer>..</answer>` targets), stopped early on purpose so that GRPO",
            "has room to improve. A pretrained VLM needs no such warm-up.",
            "",
            (f"- steps: {warm.get('steps')}, seconds: {warm.get('seconds'):.1f} on {warm.get('threads')} torch "
             f"thread(s), data: {warm.get('data_source')}"),
            (f"- stage-1 held-out greedy accuracy: {warm.get('stage1_accuracy'):.3f} "
            f"(majority baseline {warm.get('stage1_majority'):.3f})"),
            (f"- stage-2 held-out answer accuracy: {warm.get('stage2_accuracy'):.3f} "
            f"(majority answer baseline {warm.get('stage2_majority'):.3f})"),
        ]
    return "\n".join(lines) + "\n"


# =============================================================================================== cache folders
def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _corpus_hash() -> str:
    return hashlib.sha256("\n".join(_tokenizer_corpus()).encode()).hexdigest()[:8]


def _data_source() -> str:
    """Which data the warm-up uses: the real synthetic world once ``mmrag_lite.data`` provides it, else a stand-in."""
    try:
        from . import data as _data

        if hasattr(_data, "ensure_mini_webqa"):
            return "mmrag_lite.data"
    except ImportError:
        logger.info("mmrag_lite.data is not importable: the warm-up uses the built-in stand-in data")
    return "standin"


def warm_up_threads(settings: WarmUpSettings = WarmUpSettings()) -> int:
    """Threads the warm-up runs on: ``settings.threads``, never more than the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))  # a container's CPU limit, where the OS reports one
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(settings.threads, cores))


def tiny_model_dir(warm: bool = True, settings: TinyVLMSettings = TinyVLMSettings(),
                   warm_settings: WarmUpSettings = WarmUpSettings(), preset: Preset | str | None = None) -> Path:
    """Cache folder of the miniature under ``data/models/``, named by a short hash of everything that shapes it."""
    build_key = _short_hash({"settings": asdict(settings), "corpus": _corpus_hash()})
    base = data_dir() / "models" / f"tiny-qwen2vl-{build_key}"
    if not warm:
        return base
    p = _as_preset(preset or "cpu-tiny")
    warm_key = _short_hash({"warm": asdict(warm_settings), "data": _data_source(), "data_settings": asdict(p.data),
                            "seed": p.seed, "k": p.stage1.k, "threads": warm_up_threads(warm_settings)})
    return base.parent / f"{base.name}-warm-{warm_key}"


def _is_complete(folder: Path) -> bool:
    return (folder / "mmrag_tiny.json").is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock beside ``folder`` so that parallel callers (tests, notebooks) build it once, not twice."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still keeps the folder whole
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_tiny_vlm(preset: Preset | str | None = None, *, warm: bool = True,
                    settings: TinyVLMSettings = TinyVLMSettings(),
                    warm_settings: WarmUpSettings = WarmUpSettings()) -> Path:
    """The miniature's folder, built (and warmed up when ``warm``) if missing. Second call: instant."""
    cold = tiny_model_dir(warm=False, settings=settings)
    if not _is_complete(cold):
        with _folder_lock(cold):
            if not _is_complete(cold):
                build_tiny_vlm(cold, settings)
    if not warm:
        return cold
    target = tiny_model_dir(warm=True, settings=settings, warm_settings=warm_settings, preset=preset)
    if not _is_complete(target):
        with _folder_lock(target):
            if not _is_complete(target):
                warm_up_tiny_vlm(cold, target, preset=preset or "cpu-tiny", settings=warm_settings)
    return target


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
    from transformers import AutoModelForImageTextToText, AutoProcessor

    preset = _as_preset(preset)
    ms = preset.model
    tiny = ms.model_id == "tiny"
    check_device(preset)
    source = str(model_path) if model_path else (str(ensure_tiny_vlm(preset)) if tiny else ms.model_id)
    device = "cuda" if (torch.cuda.is_available() and not tiny) else "cpu"
    dtype = torch_dtype(ms.compute_dtype)

    quantize = ms.load_in_4bit
    if quantize:
        ok, why = can_load_in_4bit(device)
        if not ok:
            msg = (f"preset {preset.name!r} asks for 4-bit NF4 but it cannot run here: {why}. Loading in "
                   f"{ms.compute_dtype} instead (model.mmrag_quantized = False); memory use will be ~4x higher.")
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
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)  # trust_remote_code never

    notes: list[str] = []
    if quantize and for_training:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing trades compute for memory: worth it on a GPU, pointless for the miniature.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=not tiny,
            gradient_checkpointing_kwargs={"use_reentrant": False} if not tiny else None,
        )
    if quantize:
        note = _align_lm_head(model, dtype)
        if note:
            notes.append(note)
        if device == "cpu" and for_training:
            note = _disable_cpu_4bit_packing(model)
            if note:
                notes.append(note)

    processor = AutoProcessor.from_pretrained(source)
    _set_pixel_budget(processor, ms.min_pixels, ms.max_pixels)
    make_mixed_batch_safe(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # decoder-only batched generation; TRL pads its own batches
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

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


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters (4-bit layers count their packed storage, as PEFT's printout does)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def is_4bit_layer(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)
    except ImportError:
        return False


# =============================================================================================== warm-up data
def _standin_mini_webqa(n_questions: int = 240, seed: int = 0, image_size: int = 56, max_candidates: int = 8):
    """A small stand-in in the Mini-WebQA schema (docs/CONTRACTS.md), used only until ``mmrag_lite.data`` exists."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as HFImage
    from datasets import Sequence as HFSeq
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 220, 30),
               "purple": (140, 40, 170), "orange": (240, 140, 20)}
    shapes = ["circle", "square", "triangle"]
    names = [f"{a} {b}" for a in ("north", "old", "grand", "little", "east", "royal", "silver", "stone")
             for b in ("tower", "bridge", "museum", "castle", "park", "statue")]

    def draw(colour: str, shape: str) -> Image.Image:
        img = Image.new("RGB", (image_size, image_size), (245, 245, 245))
        d = ImageDraw.Draw(img)
        m = image_size // 6
        box = (m, m, image_size - m, image_size - m)
        fill = colours[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(image_size // 2, m), (m, image_size - m), (image_size - m, image_size - m)], fill=fill)
        return img

    facts = {n: (rng.choice(list(colours)), rng.choice(shapes), rng.randint(1800, 2000)) for n in names}
    rows = []
    for qi in range(n_questions):
        name = rng.choice(names)
        colour, shape, year = facts[name]
        kind = rng.random()
        cands = []
        if kind < 0.6:
            q, a, qcate = f"What color is the {name}?", colour, "color"
            cands.append({"id": f"{qi}_img0", "modality": "image", "title": name, "text": f"A photo of the {name}.",
                          "image": draw(colour, shape), "is_gold": True})
        else:
            q, a, qcate = f"In which year was the {name} built?", str(year), "text"
            cands.append({"id": f"q{qi}_0", "modality": "text", "title": name,
                          "text": f"The {name} was built in {year}.", "image": None, "is_gold": True})
        others = rng.sample([n for n in names if n != name], max_candidates - 1)
        for j, other in enumerate(others):
            oc, os_, oy = facts[other]
            if rng.random() < 0.5:
                cands.append({"id": f"{qi}_img{j + 1}", "modality": "image", "title": other,
                              "text": f"A photo of the {other}.", "image": draw(oc, os_), "is_gold": False})
            else:
                cands.append({"id": f"q{qi}_{j + 1}", "modality": "text", "title": other,
                              "text": f"The {other} was built in {oy}.", "image": None, "is_gold": False})
        rng.shuffle(cands)
        rows.append({"guid": f"q{qi}", "question": q, "answer": a, "keywords": "", "qcate": qcate, "topic": "standin",
                     "candidates": cands, "gold_ids": [c["id"] for c in cands if c["is_gold"]]})
    cand_feat = {"id": Value("string"), "modality": Value("string"), "title": Value("string"),
                 "text": Value("string"), "image": HFImage(), "is_gold": Value("bool")}
    features = Features({"guid": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "keywords": Value("string"), "qcate": Value("string"), "topic": Value("string"),
                         "candidates": [cand_feat], "gold_ids": HFSeq(Value("string"))})
    n_tr, n_va = int(0.7 * len(rows)), int(0.15 * len(rows))
    parts = {"train": rows[:n_tr], "validation": rows[n_tr:n_tr + n_va], "test": rows[n_tr + n_va:]}
    return DatasetDict({k: Dataset.from_list(v, features=features) for k, v in parts.items()})


def _warmup_dataset(preset: Preset, work: Path):
    """Mini-WebQA for the warm-up: the real synthetic world when ``mmrag_lite.data`` provides it."""
    if _data_source() == "mmrag_lite.data":
        from . import data as _data

        return _data.ensure_mini_webqa(preset, work), "mmrag_lite.data"
    return _standin_mini_webqa(seed=preset.seed, image_size=preset.model.image_size,
                               max_candidates=preset.data.max_candidates), "standin"


@dataclass
class _Example:
    kind: int  # 1 or 2
    input_ids: torch.Tensor  # prompt ids (image pads expanded) + completion ids
    prompt_len: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    label: str  # stage 1: yes/no; stage 2: the answer
    gold: list[str] = field(default_factory=list)
    keyword: str = ""  # stage 2: WebQA's Keywords_A (colour, shape, number, yes/no), "" when absent


def _encode(processor: Any, messages: list, images: list, target: str | None) -> tuple[torch.Tensor, int, Any, Any]:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0]
    plen = ids.shape[0]
    if target is not None:
        tgt = processor.tokenizer(target + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([ids, tgt])
    return ids, plen, enc.get("pixel_values"), enc.get("image_grid_thw")


def _stage1_items(rows: Iterable[Mapping[str, Any]], rng: random.Random, n: int) -> list[tuple]:
    """Balanced (yes/no) stage-1 items: (messages, images, label)."""
    pos, neg = [], []
    for row in rows:
        for c in row["candidates"]:
            (pos if c["is_gold"] else neg).append((row["question"], c))
    rng.shuffle(pos)
    rng.shuffle(neg)
    half = min(n // 2, len(pos), len(neg))
    items = [(q, c, YES) for q, c in pos[:half]] + [(q, c, NO) for q, c in neg[:half]]
    rng.shuffle(items)
    return items


def _stage2_items(rows: Iterable[Mapping[str, Any]], rng: random.Random, k: int) -> list[tuple]:
    """Stage-2 items: (question, shown candidates (gold + distractors, shuffled), gold short ids, answer)."""
    items = []
    for row in rows:
        cands = list(row["candidates"])
        gold = [c for c in cands if c["is_gold"]]
        rest = [c for c in cands if not c["is_gold"]]
        rng.shuffle(rest)
        shown = (gold + rest)[: max(k, len(gold))]
        rng.shuffle(shown)
        sids = short_ids(len(shown))
        gold_sids = [s for s, c in zip(sids, shown) if c["is_gold"]]
        items.append((row["question"], shown, gold_sids, row["answer"]))
    return items


def _build_examples(processor: Any, preset: Preset, rows: Sequence[Mapping[str, Any]], rng: random.Random,
                    n_stage1: int, with_targets: bool = True,
                    settings: WarmUpSettings | None = None) -> tuple[list[_Example], list[_Example]]:
    settings = settings or WarmUpSettings()
    s1: list[_Example] = []
    for q, c, label in _stage1_items(rows, rng, n_stage1):
        c = dict(c, image=prepare_image(c["image"], preset) if c.get("image") is not None else None)
        reasoning_prompt = rng.random() < settings.reasoning_prompt_fraction
        think = reasoning_prompt and rng.random() < settings.think_fraction
        ids, plen, pv, thw = _encode(processor, stage1_messages(q, c, reasoning=reasoning_prompt), stage1_images(c),
                                     stage1_target(label, reasoning=think) if with_targets else None)
        s1.append(_Example(1, ids, plen, pv, thw, label))
    s2: list[_Example] = []
    for (q, shown, gold, answer), keyword in zip(_stage2_items(rows, rng, preset.stage1.k),
                                                 [r.get("keywords", "") for r in rows]):
        shown = [dict(c, image=prepare_image(c["image"], preset) if c.get("image") is not None else None)
                 for c in shown]
        ids, plen, pv, thw = _encode(processor, stage2_messages(q, shown, reasoning=False), stage2_images(shown),
                                     stage2_target(gold, answer) if with_targets else None)
        s2.append(_Example(2, ids, plen, pv, thw, answer, gold, keyword=(keyword or "").strip()))
    return s1, s2


def _collate(batch: Sequence[_Example], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on completion tokens only (prompt and padding are -100).

    ``mm_token_type_ids`` (1 on image tokens) is what Qwen2-VL's mRoPE needs in transformers 5 alongside images.
    """
    width = max(int(e.input_ids.shape[0]) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    pvs, thws = [], []
    for i, e in enumerate(batch):
        n = int(e.input_ids.shape[0])
        input_ids[i, :n] = e.input_ids
        attention[i, :n] = 1
        labels[i, e.prompt_len:n] = e.input_ids[e.prompt_len:]
        if e.pixel_values is not None:
            pvs.append(e.pixel_values)
            thws.append(e.image_grid_thw)
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
           "mm_token_type_ids": (input_ids == image_token_id).long()}
    if pvs:
        out["pixel_values"] = torch.cat(pvs)
        out["image_grid_thw"] = torch.cat(thws)
    return out


def completion_loss(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (completion) positions only.

    Same value as ``model(**inputs).loss``, but ``lm_head`` runs only where there is a label: on the miniature the
    vocabulary projection is over a third of the compute, and prompts are ~95% of the tokens.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _image_token_id(model: Any) -> int:
    return int(model.config.image_token_id)


@torch.no_grad()
def _stage1_next_token_accuracy(model: Any, processor: Any, examples: Sequence[_Example], batch_size: int = 32) -> float:
    """Greedy choice of the token right after ``<answer>`` (teacher-forced prefix) == the label token."""
    tok = processor.tokenizer
    answer_id = tok.convert_tokens_to_ids(DEFAULT_TAGS.open("answer"))
    label_ids = {YES: tok.encode(YES, add_special_tokens=False)[0], NO: tok.encode(NO, add_special_tokens=False)[0]}
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prefixed = [_Example(1, torch.cat([e.input_ids[:e.prompt_len], torch.tensor([answer_id])]), e.prompt_len,
                             e.pixel_values, e.image_grid_thw, e.label) for e in chunk]
        batch = _collate(prefixed, tok.pad_token_id, _image_token_id(model))
        batch.pop("labels")
        logits = model(**batch).logits
        for j, e in enumerate(prefixed):
            pred = int(logits[j, e.input_ids.shape[0] - 1].argmax())
            correct += int(pred == label_ids[e.label])
    return correct / max(len(examples), 1)


@torch.no_grad()
def greedy_generate(model: Any, processor: Any, examples: Sequence[_Example], max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy completions for pre-encoded prompts (left-padded batches), decoded without special tokens."""
    tok = processor.tokenizer
    outs: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(e.prompt_len for e in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, width - e.prompt_len:] = e.input_ids[:e.prompt_len]
            att[j, width - e.prompt_len:] = 1
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": att,
                              "mm_token_type_ids": (ids == _image_token_id(model)).long()}
        pv = [e.pixel_values for e in chunk if e.pixel_values is not None]
        if pv:
            kw["pixel_values"] = torch.cat(pv)
            kw["image_grid_thw"] = torch.cat([e.image_grid_thw for e in chunk if e.image_grid_thw is not None])
        gen = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
        outs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def _extract(tag: str, text: str) -> str | None:
    o, c = f"<{tag}>", f"</{tag}>"
    if o in text and c in text.split(o, 1)[1]:
        return text.split(o, 1)[1].split(c, 1)[0].strip()
    return None


def evaluate_tiny(model: Any, processor: Any, s1: Sequence[_Example], s2: Sequence[_Example]) -> dict[str, float]:
    """Greedy held-out accuracy of both stages, with the majority baselines to compare against.

    Stage 2 counts an answer right when it contains the question's keyword (WebQA's QA-Acc idea, without the
    lemmatiser), and the baseline always answers the most frequent keyword.
    """
    from collections import Counter

    gen1 = greedy_generate(model, processor, s1, max_new_tokens=6)
    acc1 = sum((_extract("answer", g) or "") == e.label for g, e in zip(gen1, s1)) / max(len(s1), 1)
    maj1 = Counter(e.label for e in s1).most_common(1)[0][1] / max(len(s1), 1) if s1 else 0.0
    gen2 = greedy_generate(model, processor, s2, max_new_tokens=32)

    def target(e: _Example) -> str:  # keyword when the question has one (as in WebQA's QA-Acc), else the answer
        return (e.keyword or e.label).lower()

    def hit(pred: str | None, e: _Example) -> bool:
        pred = (pred or "").lower()
        return target(e) in pred if e.keyword else pred == target(e)

    acc2 = sum(hit(_extract("answer", g), e) for g, e in zip(gen2, s2)) / max(len(s2), 1)
    best = Counter(target(e) for e in s2).most_common(1)[0][0] if s2 else ""
    maj2 = sum(hit(best, e) for e in s2) / max(len(s2), 1)
    fmt2 = sum(_extract("sources", g) is not None and _extract("answer", g) is not None for g in gen2) / max(len(s2), 1)
    return {"stage1_accuracy": acc1, "stage1_majority": maj1, "stage2_accuracy": acc2, "stage2_majority": maj2,
            "stage2_format": fmt2, "stage1_n": len(s1), "stage2_n": len(s2)}


# =============================================================================================== warm-up
def warm_up_tiny_vlm(cold_dir: str | Path, out_dir: str | Path, *, preset: Preset | str = "cpu-tiny",
                     settings: WarmUpSettings = WarmUpSettings(), verbose: bool = True) -> dict[str, Any]:
    """Teacher-forced SFT of the miniature on the world's TRAIN split; saves to ``out_dir`` and returns the report.

    Loss on completion tokens only; full-parameter AdamW in float32; balanced stage-1 verdict batches, with a stage-2
    ``<sources>..</sources><answer>..</answer>`` batch every ``stage2_every`` steps. Stops early once the stage-1 validation accuracy
    reaches ``target_accuracy``: the point is a policy whose sampled rewards vary (so GRPO has a signal), not a
    solved task. Held-out numbers come from the validation split; the test split is never touched.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(warm_up_threads(settings))
    try:
        return _warm_up(cold_dir, out_dir, preset=preset, settings=settings, verbose=verbose)
    finally:
        torch.set_num_threads(threads)


def _warm_up(cold_dir: str | Path, out_dir: str | Path, *, preset: Preset | str, settings: WarmUpSettings,
             verbose: bool) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    preset = _as_preset(preset)
    cold_dir, out_dir = Path(cold_dir), Path(out_dir)
    t0 = time.time()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    work = out_dir.parent / "_warmup_data" / out_dir.name
    ds, source = _warmup_dataset(preset, work)
    train_rows = list(ds["train"].select(range(min(len(ds["train"]), settings.max_questions))))
    val_split = "validation" if "validation" in ds else "train"
    val_rows = list(ds[val_split].select(range(min(len(ds[val_split]), 80))))
    # Early stopping and the reported accuracy use different questions, so the report is not selected on.
    stop_rows, report_rows = val_rows[0::2], val_rows[1::2]

    processor = AutoProcessor.from_pretrained(cold_dir)
    _set_pixel_budget(processor, preset.model.min_pixels, preset.model.max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(cold_dir, dtype=torch.float32)
    model.train()
    pad_id = processor.tokenizer.pad_token_id

    n_s1 = sum(len(r["candidates"]) for r in train_rows)
    tr1, tr2 = _build_examples(processor, preset, train_rows, rng, n_stage1=n_s1, settings=settings)
    stop1, _ = _build_examples(processor, preset, stop_rows, rng, n_stage1=settings.eval_items, settings=settings)
    va1, va2 = _build_examples(processor, preset, report_rows, rng, n_stage1=10_000, settings=settings)
    if verbose:
        print(f"warm-up data ({source}): {len(tr1)} stage-1 and {len(tr2)} stage-2 train examples; "
              f"{len(stop1)} stage-1 items for early stopping, {len(va1)}/{len(va2)} for the report "
              f"(validation split) — {time.time() - t0:.1f}s")

    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def lr_factor(i: int) -> float:
        if i < settings.warmup_steps:
            return (i + 1) / settings.warmup_steps
        frac = (i - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict[str, float]] = []
    losses: dict[int, list[float]] = {1: [], 2: []}
    step, acc = 0, 0.0
    for step in range(1, settings.max_steps + 1):
        kind = 2 if (tr2 and settings.stage2_every and step % settings.stage2_every == 0) else 1
        if kind == 2:
            batch = rng.sample(tr2, min(settings.stage2_batch_size, len(tr2)))
        else:
            batch = rng.sample(tr1, min(settings.batch_size, len(tr1)))
        inputs = _collate(batch, pad_id, _image_token_id(model))
        loss = completion_loss(model, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses[kind].append(float(loss.detach()))
        if step % settings.eval_every == 0:
            model.eval()
            acc = _stage1_next_token_accuracy(model, processor, stop1)
            model.train()
            l1 = sum(losses[1]) / max(len(losses[1]), 1)
            l2 = sum(losses[2]) / max(len(losses[2]), 1)
            losses = {1: [], 2: []}
            history.append({"step": step, "stage1_loss": l1, "stage2_loss": l2, "stage1_val_acc": acc})
            if verbose:
                print(f"  step {step:4d}  loss stage-1 {l1:.3f} stage-2 {l2:.3f}  stage-1 val acc {acc:.3f}  "
                      f"({time.time() - t0:.0f}s)")
            if acc >= settings.target_accuracy or time.time() - t0 > settings.max_seconds:
                break
    model.eval()
    report = evaluate_tiny(model, processor, va1, va2)
    report.update({"steps": step, "seconds": time.time() - t0, "threads": torch.get_num_threads(), "data_source": source,
                   "history": history, "split": val_split, "settings": asdict(settings)})
    if verbose:
        print(f"warm-up done in {report['seconds']:.0f}s, {step} steps on {report['threads']} thread(s). Held-out: "
              f"stage-1 greedy accuracy {report['stage1_accuracy']:.3f} vs majority {report['stage1_majority']:.3f}; "
              f"stage-2 answer accuracy {report['stage2_accuracy']:.3f} vs majority answer "
              f"{report['stage2_majority']:.3f} (format {report['stage2_format']:.2f})")

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = json.loads((cold_dir / "mmrag_tiny.json").read_text(encoding="utf-8"))
        info.update({"warmed_up": True, "warm_up": {k: v for k, v in report.items() if k != "history"}})
        (tmp / "mmrag_tiny.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "warmup_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(info), encoding="utf-8")
    return report


def tiny_info(folder: str | Path | None = None) -> dict[str, Any]:
    """The miniature's build/warm-up record (``mmrag_tiny.json``): parameters, settings, warm-up accuracy."""
    folder = Path(folder) if folder else ensure_tiny_vlm()
    return json.loads((folder / "mmrag_tiny.json").read_text(encoding="utf-8"))


__all__ = [
    "TINY_LABEL",
    "ModelLoadError",
    "TinyVLMSettings",
    "WarmUpSettings",
    "bnb_config",
    "bnb_config_kwargs",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "can_load_in_4bit",
    "check_device",
    "count_parameters",
    "ensure_tiny_vlm",
    "evaluate_tiny",
    "greedy_generate",
    "is_4bit_layer",
    "lm_target_modules_regex",
    "load_model_and_processor",
    "lora_config",
    "lora_config_kwargs",
    "make_mixed_batch_safe",
    "prepare_image",
    "prepare_images",
    "tiny_info",
    "tiny_model_dir",
    "torch_dtype",
    "warm_up_tiny_vlm",
]
