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
* a GRPO micro-batch of text-only rows cut from a batch with images (TRL hands the model *empty* ``pixel_values``)
                                                        -> ``make_model_mixed_batch_safe`` (empty vision inputs -> none);
* a prompt cut through its image tokens (or a placeholder token in plain text)
                                                        -> the same hook (and a check before ``generate``) raises
                                                           ``ImageTokenMismatchError`` naming the cause and the fix,
                                                           before Qwen-VL's opaque feature or rope-index mismatch;
* different image counts *and* sizes in one batch       -> ``prepare_image`` resizes every image to one square size.

Where each part lives: ``loading`` (presets -> model + processor, quantisation, LoRA), ``common`` (errors, dtypes,
image and processor preparation), ``tiny`` (the miniature's build), ``warmup`` (its supervised warm-up) and
``cache`` (its folders under ``data/models/``); ``architectures`` counts the GPU presets' models at real size on
the meta device (no download, no GPU): parameters, 4-bit share, LoRA, and the weights + optimizer memory floor.
"""

from .cache import ensure_tiny_vlm, tiny_info, tiny_model_dir
from .common import (
    GREEDY_DECODING,
    TINY_LABEL,
    ImageTokenMismatchError,
    ModelLoadError,
    check_image_tokens,
    encode_prompts,
    freeze_vision_tower,
    make_mixed_batch_safe,
    make_model_mixed_batch_safe,
    miniature_progress_off,
    prepare_image,
    prepare_images,
    prepare_processor,
    prompt_token_count,
    release_memory,
    torch_dtype,
)
from .loading import (
    VISION_BLOCK_LINEARS,
    bnb_config,
    bnb_config_kwargs,
    can_load_in_4bit,
    check_device,
    count_parameters,
    is_4bit_layer,
    lm_target_modules_regex,
    load_model_and_processor,
    load_processor,
    lora_config,
    lora_config_kwargs,
    lora_target_modules_regex,
    vision_target_modules_regex,
)
from .tiny import (
    QWEN2VL_CHAT_TEMPLATE,
    QWEN2VL_SPECIAL_TOKENS,
    TinyVLMSettings,
    build_tiny_processor,
    build_tiny_tokenizer,
    build_tiny_vlm,
    generation_config,
    miniature_config_fields,
    special_token_ids,
)
from .warmup import WarmUpSettings, completion_loss, evaluate_tiny, greedy_generate, warm_up_threads, warm_up_tiny_vlm

__all__ = [
    "GREEDY_DECODING",
    "QWEN2VL_CHAT_TEMPLATE",
    "QWEN2VL_SPECIAL_TOKENS",
    "TINY_LABEL",
    "VISION_BLOCK_LINEARS",
    "ImageTokenMismatchError",
    "ModelLoadError",
    "TinyVLMSettings",
    "WarmUpSettings",
    "bnb_config",
    "bnb_config_kwargs",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "can_load_in_4bit",
    "check_device",
    "check_image_tokens",
    "completion_loss",
    "count_parameters",
    "encode_prompts",
    "ensure_tiny_vlm",
    "evaluate_tiny",
    "freeze_vision_tower",
    "generation_config",
    "greedy_generate",
    "is_4bit_layer",
    "lm_target_modules_regex",
    "load_model_and_processor",
    "load_processor",
    "lora_config",
    "lora_config_kwargs",
    "lora_target_modules_regex",
    "make_mixed_batch_safe",
    "make_model_mixed_batch_safe",
    "miniature_config_fields",
    "miniature_progress_off",
    "prepare_image",
    "prepare_images",
    "prepare_processor",
    "prompt_token_count",
    "release_memory",
    "special_token_ids",
    "tiny_info",
    "tiny_model_dir",
    "torch_dtype",
    "vision_target_modules_regex",
    "warm_up_threads",
    "warm_up_tiny_vlm",
]
