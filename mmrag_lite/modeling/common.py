"""What every part of ``modeling`` shares: the error type, dtypes, and how images and the processor are prepared.

The processor fixes live here because both the loader and the miniature's warm-up feed the same processor:

* TRL GRPO batches mixing text-only and image prompts  -> ``make_mixed_batch_safe`` (``None`` image lists -> ``[]``),
                                                           with left padding: ``prepare_processor``;
* a GRPO micro-batch of text-only rows cut from a batch with images (TRL hands the model *empty* ``pixel_values``)
                                                        -> ``make_model_mixed_batch_safe`` (empty vision inputs -> none);
* a prompt cut through its image tokens (or a placeholder token in plain text)
                                                        -> the same hook (and a check before ``generate``) raises
                                                           ``ImageTokenMismatchError`` naming the cause and the fix,
                                                           before Qwen-VL's opaque feature or rope-index mismatch;
* different image counts *and* sizes in one batch       -> ``prepare_image`` resizes every image to one square size;
* a frozen vision tower backpropagated anyway (gradient checkpointing hooks every sub-model's input layer)
                                                        -> ``freeze_vision_tower`` runs it under ``torch.no_grad``.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..config import Preset, get_preset
from ..data.images import to_rgb

logger = logging.getLogger(__name__)

TINY_LABEL = "a randomly initialised miniature for checking the plumbing"


# Greedy decoding as the policy was trained to write: unset generate() fields come from the checkpoint's
# generation_config.json, and a hub Qwen-VL may set a repetition penalty there that TRL's GRPO sampling does not use
# (TRL passes repetition_penalty=1.0), so evaluation would read another policy than the one trained.
GREEDY_DECODING: dict[str, Any] = {"do_sample": False, "repetition_penalty": 1.0}


class ModelLoadError(RuntimeError):
    """A model/processor that cannot be loaded as asked; the message says why and what to use instead."""


# =============================================================================================== errors / dtypes
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (presets store dtypes as strings so they stay plain data)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown compute dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def as_preset(preset: Preset | str) -> Preset:
    """A preset given by name or as itself (every public function here takes either)."""
    return get_preset(preset) if isinstance(preset, str) else preset


@contextmanager
def miniature_progress_off(active: bool = True) -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" bars off while a miniature loads or saves.

    They take milliseconds there and, repeated at every load, bury a notebook's useful bars. A real checkpoint
    keeps them (``active=False``): minutes of loading deserve a progress bar. The previous setting is restored.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if active and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if active and was_on:
            hf_logging.enable_progress_bar()


def release_memory() -> None:
    """Collect dropped models now and hand CUDA's cached blocks back before the next model loads: ``del`` drops
    a name, but reference cycles can keep a model alive until the collector runs, and freed blocks stay reserved
    in PyTorch's caching allocator (fragmented, and counted against the card by ``nvidia-smi``)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# =============================================================================================== images / processor
def prepare_image(img: Any, preset: Preset | str | int) -> Any:
    """Resize to the preset's fixed ``image_size`` square, RGB.

    Why: TRL GRPO batches whose prompts have *different image counts and different image sizes* crash in Qwen2-VL's
    ``get_rope_index`` (``shape mismatch: value tensor of shape [3, 150] cannot be broadcast ... [3, 148]``). One size
    for every image gives every image the same number of tokens, avoids it, and makes memory predictable.
    """
    from PIL import Image

    size = preset if isinstance(preset, int) else as_preset(preset).model.image_size
    if img is None:
        return None
    if not isinstance(img, Image.Image):
        img = Image.fromarray(img) if hasattr(img, "__array__") else img
    if img.mode != "RGB" or "transparency" in img.info:
        img = to_rgb(img)  # transparent pixels on white: a plain convert("RGB") turns most of them black
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


def prepare_processor(processor: Any) -> Any:
    """The processor fixes every path needs, in place (idempotent); returns ``processor``.

    Why one helper: ``load_processor`` and ``training.build_trainer`` (for a processor passed in, e.g. a plain
    ``AutoProcessor.from_pretrained``) must agree. It makes mixed text-only/image batches safe (TRL passes ``None``
    for a text-only prompt's images) and pads on the left with a pad token: batched generation continues each row
    from its last prompt token, which right padding would put behind pad tokens.
    """
    make_mixed_batch_safe(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "padding_side", "left") != "left":
        logger.info("processor tokenizer padding_side %r -> 'left' (batched generation)", tokenizer.padding_side)
        tokenizer.padding_side = "left"
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ModelLoadError(f"the processor's tokenizer ({type(tokenizer).__name__}) has neither a pad nor an eos "
                                 "token: batched prompts cannot be padded. Set tokenizer.pad_token first")
        tokenizer.pad_token = eos
    return processor


_VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class ImageTokenMismatchError(ValueError):
    """The prompts hold another number of image placeholder tokens than their images give features."""


def check_image_tokens(config: Any, input_ids: Any, image_grid_thw: Any) -> None:
    """Raise ``ImageTokenMismatchError`` with the cause and the fix when ``input_ids`` hold another number of image
    placeholder tokens than ``image_grid_thw`` gives features (one per ``spatial_merge_size``² patches).

    Why: a prompt cut through its image tokens (a tokenizer ``max_length``/``truncation``, a trainer's prompt
    length limit) leaves fewer placeholders than features, and Qwen-VL then fails deep in the forward pass with
    "Image features and image tokens do not match", which names neither the cause nor the fix.
    """
    token_id = getattr(config, "image_token_id", None)
    vision = getattr(config, "vision_config", None)
    merge = getattr(vision, "spatial_merge_size", None)
    if not isinstance(input_ids, torch.Tensor) or not isinstance(image_grid_thw, torch.Tensor) or token_id is None \
            or not merge or image_grid_thw.numel() == 0:
        return
    features = int(image_grid_thw.prod(-1).sum()) // (merge * merge)
    tokens = int((input_ids == token_id).sum())
    if tokens < features:
        raise ImageTokenMismatchError(
            f"the prompts hold {tokens} image tokens but their {image_grid_thw.shape[0]} image(s) give {features} "
            "features: a prompt was cut through its image tokens (truncation, or a max prompt length shorter than "
            "the prompt). Never truncate a multimodal prompt: drop or shrink candidates instead "
            "(training.build_stage2_dataset does, under stage2.max_prompt_tokens), or lower the pixel budget "
            "(model.image_size / max_pixels)")
    if tokens > features:
        raise ImageTokenMismatchError(
            f"the inputs hold {tokens} image tokens but their {image_grid_thw.shape[0]} image(s) give only {features} "
            "features: text outside the images holds the image placeholder token (a document or a generated "
            "completion with '<|image_pad|>' in it), or an image is missing from the batch")


def _drop_empty_vision_inputs(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    if kwargs.get("pixel_values") is not None:  # the image-token check, before the vision tower's opaque error
        check_image_tokens(getattr(module, "config", None), kwargs.get("input_ids", args[0] if args else None),
                           kwargs.get("image_grid_thw"))
    empty = [k for k in _VISION_INPUTS if isinstance(kwargs.get(k), torch.Tensor) and kwargs[k].shape[0] == 0]
    if not empty:
        return None
    return args, {**kwargs, **dict.fromkeys(empty)}


def _checked_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with the image-token check first: it encodes the images and builds rotary positions *before* any
    forward, so a cut prompt fails there (``get_rope_index``: "shape mismatch ... cannot be broadcast") and the
    forward hook never sees ``pixel_values``."""
    if kwargs.get("pixel_values") is not None:
        check_image_tokens(self.config, kwargs.get("input_ids", args[0] if args else None), kwargs.get("image_grid_thw"))
    return type(self).generate(self, *args, **kwargs)


def make_model_mixed_batch_safe(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``model`` read a batch whose vision inputs are empty tensors as a batch without images, in place.

    Why: TRL cuts each generation batch into micro-batches of ``per_device_train_batch_size`` rows and slices
    ``pixel_values`` / ``image_grid_thw`` to match; a micro-batch of text-only rows gets *empty* tensors rather than
    none, and Qwen2-VL's vision tower fails on them (``torch.cat(): expected a non-empty list of Tensors``). It takes
    gradient accumulation to meet it (every GPU preset), which is why the first real-size run on a GPU found it. A
    forward pre-hook on each module that takes ``pixel_values`` turns the empty tensors into ``None``; idempotent.
    The same hook, and a check in front of ``generate`` (bound per instance, so a deep copy checks itself), turn a
    prompt cut through its image tokens into ``ImageTokenMismatchError``.
    """
    for module in model.modules():
        if getattr(module, "_mmrag_empty_vision_safe", False) or not hasattr(module, "get_image_features"):
            continue
        if "pixel_values" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(_drop_empty_vision_inputs, with_kwargs=True)
            if callable(getattr(type(module), "generate", None)):
                module.generate = types.MethodType(_checked_generate, module)
            module._mmrag_empty_vision_safe = True
    return model


def freeze_vision_tower(model: torch.nn.Module) -> bool:
    """Run the vision tower under ``torch.no_grad`` (in place, idempotent); True when one was found.

    Why: with gradient checkpointing on (every GPU preset), transformers and TRL call ``enable_input_require_grads``,
    which hooks the input layer of *every* sub-model, Qwen-VL's ``patch_embed`` included. The image features then
    require grad and each micro-batch recomputes and backpropagates all vision blocks (and keeps their inputs) for
    gradients nothing uses: LoRA sits on the language model only. TRL toggles checkpointing around generation and
    re-adds the hooks, so removing them once is not enough; a frozen tower that never records a graph is.
    """
    for module in model.modules():
        visual = getattr(module, "visual", None)
        if isinstance(visual, torch.nn.Module):
            if not getattr(visual, "_mmrag_no_grad", False):
                visual.forward = torch.no_grad()(visual.forward)
                visual._mmrag_no_grad = True
            return True
    return False


def encode_prompts(processor: Any, texts: Sequence[str], images: Sequence[Sequence[Any]]) -> Any:
    """Tokenise rendered prompts as one padded batch: text-only rows get ``[]`` images in a mixed batch, an all-text
    batch gets no ``images`` at all (the Qwen-VL processor refuses a list of empty lists)."""
    if any(images):
        return processor(text=list(texts), images=[list(i) for i in images], padding=True, return_tensors="pt")
    return processor(text=list(texts), padding=True, return_tensors="pt")


def prompt_token_count(processor: Any, messages: list[dict[str, Any]], images: Sequence[Any]) -> int:
    """Tokens of a rendered prompt with image placeholders expanded: what the model really reads."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return int(encode_prompts(processor, [text], [list(images)])["input_ids"].shape[-1])


def set_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Point a Qwen-VL processor's image resizing at the preset's pixel budget (both spellings it reads)."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return
    ip.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, int(value))


