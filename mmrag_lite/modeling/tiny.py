"""The tiny offline VLM: a randomly initialised miniature Qwen2-VL with a tokenizer trained here, for CPUs and tests.

It is a real ``Qwen2VLForConditionalGeneration`` (or, with ``TinyVLMSettings.architecture``, a Qwen2.5-VL) built from
a small config, with a byte-level BPE trained with
``tokenizers`` on the course's prompts and the synthetic world's words, Qwen2-VL's special tokens and chat template,
saved with ``save_pretrained`` so that the same ``from_pretrained`` path loads it as loads a hub model. It checks the
plumbing; it is not a vision-language model (``TINY_LABEL`` says so wherever it appears).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..atomic import atomic_dir
from ..data import world
from ..prompts import (
    DEFAULT_TAGS,
    NO,
    YES,
    short_ids,
    stage1_system,
    stage1_target,
    stage2_system,
    stage2_target,
)
from .common import TINY_LABEL, ModelLoadError, miniature_progress_off

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerFast, ProcessorMixin

logger = logging.getLogger(__name__)

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
    # The GPU presets' families: colab-t4/l4 load Qwen2-VL, a100 Qwen2.5-VL (window attention and a SwiGLU MLP in
    # the vision tower); both tie lm_head to the input embeddings. The course's miniature is an untied Qwen2-VL;
    # tests build the other variants to run the GPU presets' families through the same 4-bit + LoRA path.
    architecture: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl"
    tie_word_embeddings: bool = False


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
    """Words of the synthetic world, so that its colours, shapes, titles and names become single tokens."""
    return {
        "colours": sorted(set(_COLOURS) | set(world.COLORS)), "shapes": sorted(set(_SHAPES) | set(world.SHAPES)),
        "adjectives": list(world.ADJECTIVES), "places": list(world.PLACES), "names": list(world.NAMES),
        "cities": list(world.CITIES), "filler": [world.FILLER],
    }


def tokenizer_corpus() -> list[str]:
    """Text the miniature's BPE is trained on: our prompt templates, targets, tags and the synthetic world's words.

    Frequent strings become single tokens, so ``<answer>yes</answer>`` is three tokens and ``D7`` is one.
    """
    rng = random.Random(1234)
    wv = _world_vocabulary()
    lines: list[str] = ["You are a helpful assistant."] + wv["filler"] * 20
    for reasoning in (True, False):
        lines.append(stage1_system(reasoning=reasoning))
        lines.extend(stage2_system(k, reasoning=reasoning) for k in range(1, 17))
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


def build_tiny_tokenizer(settings: TinyVLMSettings = TinyVLMSettings()) -> PreTrainedTokenizerFast:
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
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size - len(tags),
        min_frequency=2,
        special_tokens=QWEN2VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # The tags are ordinary (non-special) added tokens: one id each, and they survive skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
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


def family_classes(architecture: str) -> tuple[type, type, type]:
    """The transformers config, model and processor classes of a Qwen-VL family (``TinyVLMSettings.architecture``)."""
    import transformers

    family = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[architecture]
    return tuple(getattr(transformers, f"{family}{part}") for part in ("Config", "ForConditionalGeneration", "Processor"))


def build_tiny_processor(settings: TinyVLMSettings = TinyVLMSettings()) -> ProcessorMixin:
    """The miniature's processor: the locally trained tokenizer, Qwen2-VL's chat template, a fixed pixel budget."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = settings.image_size * settings.image_size
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels, max_pixels=pixels, patch_size=settings.patch_size, merge_size=settings.merge_size
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=settings.patch_size, merge_size=settings.merge_size)
    _, _, processor_cls = family_classes(settings.architecture)
    return processor_cls(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(settings), video_processor=video_processor,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields that name special tokens, for a model that reads ``tokenizer``'s ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}


def generation_config(tokenizer: Any) -> GenerationConfig:
    """Greedy by default; a turn ends at ``<|im_end|>`` (or ``<|endoftext|>``)."""
    from transformers import GenerationConfig

    ids = special_token_ids(tokenizer)
    return GenerationConfig(eos_token_id=[ids["eos_token_id"], ids["bos_token_id"]], pad_token_id=ids["pad_token_id"],
                            bos_token_id=ids["bos_token_id"], do_sample=False)


def miniature_config_fields(settings: TinyVLMSettings, *, vocab_size: int,
                            token_ids: Mapping[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text and vision config fields of a model at the miniature's size, in ``settings.architecture``'s names.

    Also used to shrink a GPU preset's published architecture to this size (the GPU benchmark's CPU smoke test).
    """
    head_dim = settings.hidden_size // settings.num_attention_heads
    if sum(settings.mrope_section) * 2 != head_dim:
        raise ModelLoadError(f"mrope_section {settings.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text_config = {
        "vocab_size": vocab_size, "hidden_size": settings.hidden_size, "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_hidden_layers, "num_attention_heads": settings.num_attention_heads,
        "num_key_value_heads": settings.num_key_value_heads, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(settings.mrope_section)},
        **{k: token_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "tie_word_embeddings": settings.tie_word_embeddings,
    }
    vision_config = {
        "depth": settings.vision_depth, "num_heads": settings.vision_num_heads, "patch_size": settings.patch_size,
        "spatial_merge_size": settings.merge_size, "in_channels": 3, "temporal_patch_size": 2,
    }
    if settings.architecture == "qwen2_vl":
        vision_config.update(embed_dim=settings.vision_embed_dim, hidden_size=settings.hidden_size)
    else:  # Qwen2.5-VL names the vision width hidden_size and the merger's output out_hidden_size
        vision_config.update(hidden_size=settings.vision_embed_dim, intermediate_size=2 * settings.vision_embed_dim,
                             out_hidden_size=settings.hidden_size, window_size=112,
                             fullatt_block_indexes=[settings.vision_depth - 1])
    return text_config, vision_config


def build_tiny_vlm(out_dir: str | Path, settings: TinyVLMSettings = TinyVLMSettings()) -> Path:
    """Build the randomly initialised miniature (Qwen2-VL, or ``settings.architecture``) + processor and
    ``save_pretrained`` them into ``out_dir``.

    Written to a temporary folder and renamed when complete, so a crash never leaves half a model behind.
    """
    config_cls, model_cls, _ = family_classes(settings.architecture)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(settings)
    tokenizer = processor.tokenizer
    token_ids = special_token_ids(tokenizer)

    vocab = len(tokenizer)
    text_config, vision_config = miniature_config_fields(settings, vocab_size=vocab, token_ids=token_ids)
    config = config_cls(text_config=text_config, vision_config=vision_config, **token_ids,
                        tie_word_embeddings=settings.tie_word_embeddings)
    torch.manual_seed(settings.seed)
    model = model_cls(config).eval()
    model.generation_config = generation_config(tokenizer)
    with atomic_dir(out_dir) as tmp:
        with miniature_progress_off():
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        info = {"label": TINY_LABEL, "settings": asdict(settings), "parameters": n_params, "vocab_size": vocab,
                "warmed_up": False}
        (tmp / "mmrag_tiny.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    logger.info("built tiny VLM (%d parameters) in %s", n_params, out_dir)
    return out_dir


def model_card(info: Mapping[str, Any]) -> str:
    """The ``README.md`` saved beside the miniature: what it is (a plumbing check), how it was built and warmed up."""
    warm = info.get("warm_up")
    settings = info.get("settings") or {}
    family, cls = {"qwen2_5_vl": ("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration")}.get(
        settings.get("architecture", "qwen2_vl"), ("Qwen2-VL", "Qwen2VLForConditionalGeneration"))
    side = settings.get("image_size", 56)  # the build's; a warm-up records the preset's budget it trained with
    merged = side // settings.get("patch_size", 14) // settings.get("merge_size", 2)
    images = info.get("images") or {"image_size": side, "tokens_per_image": merged * merged}
    lines = [
        f"# mmrag-lite tiny {family}",
        "",
        f"**This is {TINY_LABEL}** — not a vision-language model. It has the architecture of {family}",
        f"(`{cls}`) at a miniature size, a byte-level BPE tokenizer trained locally on the",
        "course's prompt templates, Qwen2-VL's special tokens and chat template, and a `Qwen2VLImageProcessor` with a",
        (f"{images['image_size']}x{images['image_size']} pixel budget ({images['tokens_per_image']} image tokens per "
         "image). It exists so that the whole course (4-bit loading, LoRA,"),
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


