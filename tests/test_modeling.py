"""Tests of mmrag_lite.modeling: the tiny offline VLM, NF4 on the CPU, LoRA targets, the GRPO image-batch traps.

Everything runs offline on the CPU (conftest.py sets HF_HUB_OFFLINE=1) on a freshly built, *cold* miniature in a
temp folder, so the tests neither need nor disturb the warmed-up cache under data/models/.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmrag_lite import modeling as M
from mmrag_lite.config import get_preset
from mmrag_lite.modeling import loading
from mmrag_lite.prompts import short_ids, stage1_messages, stage1_target

PRESET = get_preset("cpu-tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return M.build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "tiny-vlm")


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path):
    return M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=True)


def _img(color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> Image.Image:
    return Image.new("RGB", size, color)


# ------------------------------------------------------------------------------------------ tokenizer / template
def test_tokenizer_makes_tags_and_ids_cheap(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok.encode(stage1_target("yes"), add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<answer>", "yes", "</answer>"]
    assert len(tok.encode(stage1_target("no"), add_special_tokens=False)) == 3
    assert len(tok.encode(" yes", add_special_tokens=False)) == 1
    for sid in short_ids(16):  # "D7" at the start and " D7" after a comma are single tokens
        assert len(tok.encode(sid, add_special_tokens=False)) == 1, sid
        assert len(tok.encode(" " + sid, add_special_tokens=False)) == 1, sid
    for word in ("red", "blue", "circle", "square", "triangle", "3"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    for special in M.QWEN2VL_SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_chat_template_matches_qwen2vl_layout(loaded) -> None:
    _, processor = loaded
    msgs = stage1_messages("What color?", {"modality": "image", "image": _img((255, 0, 0)), "title": "t", "text": "c"},
                           reasoning=False)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Document:" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_system = processor.apply_chat_template([msgs[1]], add_generation_prompt=False, tokenize=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_the_miniature_decodes_greedily_and_ends_its_turn_at_im_end(loaded) -> None:
    """Its chat template closes every turn with <|im_end|>: generation must stop there (or at <|endoftext|>) and,
    unless asked otherwise, decode greedily, or every answer runs on to max_new_tokens in a different way each call."""
    model, processor = loaded
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.text_config.eos_token_id == im_end and im_end in model.generation_config.eos_token_id
    assert model.generation_config.do_sample is False


def test_the_same_settings_build_the_same_miniature(tiny_dir: Path, tmp_path: Path) -> None:
    """The settings' hash names the cache folder, so a folder name must stand for one model: another machine, or a
    rebuild after a damaged folder, gets the same weights from the same settings."""
    from safetensors.torch import load_file

    again = load_file(M.build_tiny_vlm(tmp_path / "again") / "model.safetensors")
    first = load_file(tiny_dir / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_a_rotary_split_that_misses_the_head_size_is_refused_before_the_build() -> None:
    """mrope_section must sum to head_dim / 2 (16 at the miniature's size), or the rotary embedding fails deep in the
    first forward pass."""
    with pytest.raises(M.ModelLoadError, match=r"mrope_section \(4, 4, 4\) must sum to head_dim/2 = 16"):
        M.miniature_config_fields(M.TinyVLMSettings(mrope_section=(4, 4, 4)), vocab_size=100,
                                  token_ids={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0})


# ------------------------------------------------------------------------------------------ loading
def test_tiny_model_loads_offline_in_nf4(loaded, tiny_dir: Path) -> None:
    import bitsandbytes as bnb

    model, processor = loaded
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert (model.mmrag_preset, model.mmrag_source) == ("cpu-tiny", str(tiny_dir))  # where its weights came from
    assert model.mmrag_quantized is True
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "expected bitsandbytes Linear4bit layers on the CPU"
    assert any("language_model" in n for n in four_bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the output head stays full precision
    assert (tiny_dir / "README.md").read_text().count(M.TINY_LABEL) >= 1
    # 56x56 image -> 4x4 patches -> 4 image tokens after the 2x2 merge
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[[_img((0, 0, 255))]],
                    return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 4


def test_a_judge_scores_the_same_whether_loaded_for_training_or_inference(tiny_dir: Path) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' inference fast path (weights re-packed, activations in bfloat16) was on
    for inference loads only, so notebook 03's "before" judge and its "after" (the trained model) read P(yes) through
    different kernels. (Where the CPU lacks AVX512-BF16 there is one kernel anyway and this holds trivially.)"""
    import bitsandbytes as bnb

    from mmrag_lite.scoring import score_candidates

    cands = [{"id": str(i), "modality": "image", "image": _img((40 * i, 90, 200 - 30 * i)), "title": f"t{i}",
              "text": f"A {c} thing."} for i, c in enumerate(["red", "blue", "green", "grey"])]
    scores = []
    for for_training in (False, True):
        model, processor = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=for_training)
        model.eval()
        with torch.no_grad():
            scores.append(score_candidates(model, processor, "What colour is it?", cands, PRESET))
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert scores[0] == scores[1]


def test_generate_with_mixed_batch(tiny_dir: Path) -> None:
    model, processor = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=False)
    msgs = [
        stage1_messages("q?", {"modality": "image", "image": 1, "title": "a", "text": "b"}, reasoning=False),
        stage1_messages("q?", {"modality": "text", "title": "a", "text": "b"}, reasoning=False),
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    enc = processor(text=texts, images=[[_img((255, 0, 0))], None], padding=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] == enc["input_ids"].shape[1] + 3
    assert not any(p.requires_grad for p in model.parameters())  # inference only: no autograd bookkeeping


def test_a_miniature_preset_loads_the_miniature_warmed_for_it(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its seed, k, data and image settings name the warm miniature a preset loads: cpu-tiny at a larger pixel budget
    must get the one warmed at that budget (its model and its processor), not cpu-tiny's default."""
    asked: list = []
    monkeypatch.setattr(loading, "ensure_tiny_vlm", lambda preset=None: asked.append(preset) or tiny_dir)
    bigger = PRESET.with_overrides(**{"model.image_size": 112, "model.min_pixels": 112 * 112,
                                      "model.max_pixels": 112 * 112})
    M.load_processor(bigger)
    model, _ = M.load_model_and_processor(bigger, for_training=False)
    assert asked == [bigger, bigger] and model.mmrag_source == str(tiny_dir)


def test_ensure_tiny_vlm_is_cached() -> None:
    first = M.ensure_tiny_vlm(warm=False)
    import time

    t0 = time.time()
    again = M.ensure_tiny_vlm(warm=False)
    assert again == first and time.time() - t0 < 2.0
    assert first == M.tiny_model_dir(warm=False) and not M.tiny_info(first)["warmed_up"]  # the untrained build
    assert first.parent.name == "models" and first.name.startswith("tiny-qwen2vl-")
    changed = M.tiny_model_dir(warm=False, settings=M.TinyVLMSettings(num_hidden_layers=2))
    assert changed != first  # a change of build settings means another folder, i.e. a rebuild


def test_the_warm_cache_key_moves_with_the_prompts_and_the_data_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer corpus holds its own copy of the user turns and the key held settings only, so a reworded prompt
    or a change to the world generator or the Mini-WebQA builder reused a miniature warmed on the old ones."""
    from mmrag_lite import data, prompts
    from mmrag_lite.modeling import cache

    default = M.tiny_model_dir()
    real_stage1 = prompts.stage1_messages

    def reworded(question, candidate, to="Q:", **kw):
        messages = real_stage1(question, candidate, **kw)
        messages[-1]["content"][-1]["text"] = messages[-1]["content"][-1]["text"].replace("Question:", to)
        return messages

    monkeypatch.setattr(prompts, "stage1_messages", reworded)
    assert M.tiny_model_dir() != default
    first = M.tiny_model_dir()
    monkeypatch.setattr(prompts, "stage1_messages", lambda *a, **kw: reworded(*a, to="Query:", **kw))
    assert M.tiny_model_dir() not in (default, first)  # each wording its own miniature, none reusing another's
    monkeypatch.setattr(prompts, "stage1_messages", lambda *a, **kw: reworded(*a, **kw) if kw.get("reasoning")
                        else real_stage1(*a, **kw))  # only the reasoning prompt, which the warm-up shows half the time
    assert M.tiny_model_dir() != default
    monkeypatch.undo()
    assert M.tiny_model_dir() == default  # today's prompts and data code: the name the cache already has
    real_make_world, real_build = data.make_world, data.build_mini_webqa

    def other_world(*args, **kw):  # a generator change that moves the questions
        kw["seed"] = kw.get("seed", 0) + 1
        return real_make_world(*args, **kw)

    def other_answers(*args, **kw):  # a builder change that moves the answers only (the stage-2 targets)
        dd, report = real_build(*args, **kw)
        return dd.map(lambda row: {"answer": row["answer"].upper()}), report

    changes = [(data, "make_world", other_world), (data, "build_mini_webqa", other_answers),
               # a drawing fix moves pixels only (the key's rows are text), perhaps none of the 30-question world's
               (data.world, "DRAWING_VERSION", data.world.DRAWING_VERSION + 1)]
    for target, name, value in changes:
        cache._data_code_hash.cache_clear()
        monkeypatch.setattr(target, name, value)
        try:
            assert M.tiny_model_dir() != default, name
        finally:
            monkeypatch.undo()
            cache._data_code_hash.cache_clear()
    assert M.tiny_model_dir() == default


def test_the_warm_cache_key_holds_the_image_settings_and_a_damaged_folder_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from mmrag_lite import config
    from mmrag_lite.modeling import cache

    bigger = PRESET.with_overrides(**{"model.image_size": 112, "model.min_pixels": 112 * 112,
                                      "model.max_pixels": 112 * 112})  # 16 image tokens per picture instead of 4
    assert M.tiny_model_dir(preset=bigger) != M.tiny_model_dir(preset=PRESET)
    middle = PRESET.with_overrides(**{"model.image_size": 84, "model.min_pixels": 84 * 84, "model.max_pixels": 84 * 84})
    assert M.tiny_model_dir(preset=middle) != M.tiny_model_dir(preset=bigger)  # each budget its own miniature
    default = M.tiny_model_dir()
    monkeypatch.setitem(config.PRESETS, "cpu-tiny", bigger)  # cpu-tiny's own image settings edited: another model
    assert M.tiny_model_dir() != default and M.tiny_model_dir() == M.tiny_model_dir(preset=bigger)
    monkeypatch.undo()
    asked: list = []  # tiny_info reads the miniature the preset loads, not cpu-tiny's default
    monkeypatch.setattr(cache, "ensure_tiny_vlm", lambda preset=None: asked.append(preset) or M.ensure_tiny_vlm(warm=False))
    assert M.tiny_info(preset=bigger)["parameters"] and asked == [bigger]
    monkeypatch.undo()
    cold = M.ensure_tiny_vlm(warm=False)
    copy = shutil.copytree(cold, tmp_path / "copy")
    assert cache._is_complete(copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a cut file: its header no longer reads
    assert not cache._is_complete(copy)
    weights.unlink()
    assert not cache._is_complete(copy)
    info = json.loads((copy / "mmrag_tiny.json").read_text())
    (copy / "mmrag_tiny.json").write_text(json.dumps({**info, "warm_up": {"steps": 120, "stopped_by": "time"}}))
    with pytest.warns(RuntimeWarning, match="only 120 steps.*time guard"):
        cache._warn_if_cut_short(copy)


def test_a_preset_warms_its_own_miniature_under_its_own_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu-tiny at another pixel budget is warmed on that budget's image tokens and cached under its own name:
    warmed with cpu-tiny's settings, or cached under cpu-tiny's name, it would hand one preset the other's model."""
    import shutil

    from mmrag_lite.modeling import cache

    cold = M.ensure_tiny_vlm(warm=False)
    monkeypatch.setattr(cache, "data_dir", lambda: tmp_path)  # never beside the shared cache under data/models
    shutil.copytree(cold, tmp_path / "models" / cold.name)
    calls: list = []

    def fake_warm_up(cold_dir, target, *, preset, **_):
        calls.append((target, preset))
        shutil.copytree(cold_dir, target)

    monkeypatch.setattr(cache, "warm_up_tiny_vlm", fake_warm_up)
    bigger = PRESET.with_overrides(**{"model.image_size": 112, "model.min_pixels": 112 * 112,
                                      "model.max_pixels": 112 * 112})
    target = M.tiny_model_dir(preset=bigger)
    assert M.ensure_tiny_vlm(bigger) == target != M.tiny_model_dir(preset=PRESET)
    assert calls == [(target, bigger)]


def test_a_miniature_built_while_waiting_for_the_lock_is_not_built_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel callers (two notebooks, test workers) queue on one lock: the one that waited finds the folder the
    other built and loads it, rather than building (and for the warm one, warming for minutes) a second time."""
    import shutil
    from contextlib import contextmanager

    from mmrag_lite.modeling import cache

    cold = M.ensure_tiny_vlm(warm=False)
    monkeypatch.setattr(cache, "data_dir", lambda: tmp_path)  # never beside the shared cache under data/models

    @contextmanager
    def lock_held_by_another_caller(folder):
        shutil.copytree(cold, folder)  # ... who finishes the build while this one waits
        yield

    builds: list = []
    monkeypatch.setattr(cache, "folder_lock", lock_held_by_another_caller)
    monkeypatch.setattr(cache, "build_tiny_vlm", lambda *a, **k: builds.append(a))
    assert M.ensure_tiny_vlm(warm=False) == M.tiny_model_dir(warm=False) and builds == []


def test_the_model_card_states_the_pixel_budget_the_miniature_reads() -> None:
    from mmrag_lite.modeling.tiny import model_card

    assert "56x56 pixel budget (4 image tokens per image)" in model_card({"settings": asdict(M.TinyVLMSettings())})
    warmed = {"settings": asdict(M.TinyVLMSettings()), "images": {"image_size": 112, "tokens_per_image": 16}}
    assert "112x112 pixel budget (16 image tokens per image)" in model_card(warmed)  # a warm-up at another budget


def test_warm_up_threads_are_capped_by_the_cores_and_name_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread count shapes the warm model, so a 1-core machine runs one thread and caches under another name."""

    def folder_with_cores(n: int) -> Path:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        assert M.warm_up_threads(M.WarmUpSettings(threads=2)) == min(n, 2)
        return M.tiny_model_dir(warm=True, preset=PRESET)

    assert folder_with_cores(2) == folder_with_cores(16)  # more cores than threads: the same model
    assert folder_with_cores(1) != folder_with_cores(2)


def test_the_warm_up_stops_only_after_patience_checks_in_a_row_at_the_target() -> None:
    """One lucky check is noise (a chance-level model passed 0.65 once and stopped a real rebuild); a streak is not."""
    from mmrag_lite.modeling.warmup import reached_target

    assert not reached_target([], 0.65, 2)
    assert not reached_target([0.5, 0.67], 0.65, 2)  # the 2026-11-27 rebuild's single lucky check
    assert not reached_target([0.67, 0.5], 0.65, 2)  # a streak broken by the latest check
    assert reached_target([0.5, 0.65, 0.7], 0.65, 2)  # the target itself counts as reached
    assert reached_target([0.66], 0.65, 1)  # patience 1: the old rule
    with pytest.raises(ValueError, match="patience must be at least 1"):
        reached_target([0.9], 0.65, 0)
    with pytest.raises(ValueError, match="WarmUpSettings.patience must be at least 1"):
        M.WarmUpSettings(patience=0)


def test_4bit_fallback_is_explicit(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "can_load_in_4bit", lambda device: (False, "pretend bitsandbytes is missing"))
    with pytest.warns(RuntimeWarning, match="cannot run here: pretend bitsandbytes is missing"):
        model, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=False)
    assert model.mmrag_quantized is False
    assert not any(M.is_4bit_layer(m) for m in model.modules())
    t4 = loading.fallback_message(get_preset("colab-t4"), "no CUDA build of bitsandbytes")
    assert "float16 instead" in t4 and "overflow" in t4 and "pip install bitsandbytes" in t4
    assert "overflow" not in loading.fallback_message(get_preset("l4"), "x")  # bf16 has float32's range


def test_each_preset_computes_in_its_own_dtype_and_an_unknown_dtype_is_refused() -> None:
    """The 4-bit layers compute in the preset's dtype: float16 on colab-t4 (a T4 has no bf16), bfloat16 on l4 and
    a100, float32 for the miniature. A dtype name outside the three is refused naming them, not read as another."""
    expected = {"cpu-tiny": torch.float32, "colab-t4": torch.float16, "l4": torch.bfloat16, "a100": torch.bfloat16}
    for name, dtype in expected.items():
        assert M.bnb_config(name).bnb_4bit_compute_dtype == dtype, name
    with pytest.raises(M.ModelLoadError, match=r"unknown compute dtype 'fp16'.*'bfloat16', 'float16', 'float32'"):
        M.torch_dtype("fp16")


# ------------------------------------------------------------------------------------------ trap messages
def test_bf16_on_a_gpu_without_bf16_says_use_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    with pytest.raises(M.ModelLoadError, match=r"no bfloat16.*float16.*colab-t4"):
        M.check_device(get_preset("l4"))
    M.check_device(get_preset("colab-t4"))  # float16 compute is fine on a T4


def test_a_gpu_preset_on_a_cpu_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.ModelLoadError, match=r"needs a CUDA GPU.*preset='cpu-tiny'"):
        M.check_device(get_preset("colab-t4"))
    typo = get_preset("cpu-tiny").with_overrides(**{"model.model_id": "tinyy"})
    with pytest.raises(M.ModelLoadError, match=r"model.model_id was overridden.*'tiny'"):
        M.check_device(typo)  # not "use preset='cpu-tiny'" to someone who already does
    M.check_device(get_preset("cpu-tiny"))
    M.check_device(get_preset("cpu-tiny", **{"model.compute_dtype": "bfloat16"}))  # no GPU to ask about bf16


@pytest.mark.parametrize(("gpu", "capability", "bf16_ok"), [
    ("Tesla T4", (7, 5), False), ("Tesla V100", (7, 0), False), ("NVIDIA L4", (8, 9), True),
    ("NVIDIA A100-SXM4-80GB", (8, 0), True), ("NVIDIA H100", (9, 0), True),
])
def test_bf16_check_uses_compute_capability_not_emulation(monkeypatch: pytest.MonkeyPatch, gpu, capability,
                                                          bf16_ok) -> None:
    """torch.cuda.is_bf16_supported() defaults to including_emulation=True and says True on a real T4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 really answers
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    if bf16_ok:
        M.check_device(get_preset("l4"))
        M.check_device(get_preset("a100"))
    else:
        with pytest.raises(M.ModelLoadError, match=rf"{gpu}, compute capability {capability[0]}\.{capability[1]}.*colab-t4"):
            M.check_device(get_preset("l4"))


def test_training_with_several_gpus_in_one_process_is_refused_before_the_download(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kaggle's 2x T4: TRL refuses the nn.DataParallel that Trainer would use, but only after the 4-bit load."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(M.ModelLoadError, match=r"2 GPUs.*CUDA_VISIBLE_DEVICES=0.*accelerate launch.*multi-gpu\.md"):
        M.check_device(get_preset("colab-t4"))

    def no_download(*a, **k):
        raise AssertionError("from_pretrained reached")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", no_download)
    with pytest.raises(M.ModelLoadError, match="CUDA_VISIBLE_DEVICES=0"):
        M.load_model_and_processor(get_preset("colab-t4"), for_training=True)
    M.check_device(get_preset("colab-t4"), for_training=False)  # scoring and evaluation run on GPU 0
    M.check_device(PRESET)  # the miniature trains on the CPU
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate launch: one process per GPU
    M.check_device(get_preset("colab-t4"))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    M.check_device(get_preset("colab-t4"))


def test_qwen25_vl_in_float16_is_warned_about(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Qwen2.5-VL overflows fp16 (vllm#13817); colab-t4's Qwen2-VL in fp16 and a100's Qwen2.5-VL in bf16 are fine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(loading, "cuda_native_bf16", lambda *a: True)
    t4_qwen25 = get_preset("colab-t4").with_overrides(**{"model.model_id": "Qwen/Qwen2.5-VL-3B-Instruct"})
    a100_on_t4 = get_preset("a100").with_overrides(**{"model.compute_dtype": "float16"})
    for preset in (t4_qwen25, a100_on_t4):
        with pytest.warns(RuntimeWarning, match=r"Qwen2\.5-VL.*float16.*13817.*bfloat16"):
            M.check_device(preset)
    local = tmp_path / "my-vlm"  # a local folder is read by its config.json, whatever its name
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.warns(RuntimeWarning, match="Qwen2.5-VL"):
        M.check_device(get_preset("colab-t4"), model_path=local)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.check_device(get_preset("colab-t4"))  # the T4 default, Qwen2-VL-2B: unaffected
        M.check_device(get_preset("a100"))  # Qwen2.5-VL in bf16
        M.check_device(PRESET)


def test_4bit_on_cuda_needs_a_working_nf4_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bitsandbytes whose CUDA library failed to load still imports; the probe must catch it before loading."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls: list[str] = []

    def broken(device: str) -> tuple[bool, str]:
        calls.append(device)
        return False, "bitsandbytes cannot run NF4 on CUDA (RuntimeError: native library not loaded)"

    monkeypatch.setattr(loading, "_nf4_probe", broken)
    ok, why = M.can_load_in_4bit("cuda")
    assert (ok, calls) == (False, ["cuda"]) and "NF4 on CUDA" in why
    monkeypatch.setattr(loading, "_nf4_probe", lambda device: (True, ""))
    assert M.can_load_in_4bit("cuda") == (True, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.can_load_in_4bit("cuda") == (False, "no CUDA device is visible")


def test_nf4_probe_reports_a_library_that_fails_at_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.functional as bnbf

    def stand_in(*a, **k):
        raise RuntimeError("CUDA Setup failed despite GPU being available")

    monkeypatch.setattr(bnbf, "quantize_4bit", stand_in)
    ok, why = loading._nf4_probe.__wrapped__("cpu")  # uncached: the real probe, run on the CPU
    assert not ok and "RuntimeError: CUDA Setup failed" in why
    monkeypatch.undo()
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda q, state: torch.zeros(64, 64) + 3)  # runs, but computes garbage
    ok, why = loading._nf4_probe.__wrapped__("cpu")
    assert not ok and "round trip on the CPU is wrong" in why


def test_4bit_without_bitsandbytes_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """No bitsandbytes at all (a CPU-only pip install): the loader must know before from_pretrained, to fall back."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    ok, why = M.can_load_in_4bit("cpu")
    assert not ok and why.startswith("bitsandbytes cannot be imported (ModuleNotFoundError")


def test_a_gpu_preset_asks_for_nf4_on_its_own_gpu_and_checkpointed_training(tiny_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the GPU path asks of transformers and PEFT, checked without a GPU: NF4 in the preset's compute dtype with
    its attention, the whole model on this process's GPU (LOCAL_RANK under ``accelerate launch``), and gradient
    checkpointing without the reentrant variant (the GPU presets' memory figures were measured with it)."""
    import peft
    from transformers import AutoModelForImageTextToText

    class Stop(Exception):
        pass

    asked: dict = {}
    real = AutoModelForImageTextToText.from_pretrained

    def from_pretrained(source, **kwargs):
        asked.update(source=source, **kwargs)
        return real(tiny_dir, dtype=torch.float32, device_map="cpu")  # the miniature stands in for the 2B

    def prepare(model, **kwargs):
        asked["kbit"] = kwargs
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(loading, "can_load_in_4bit", lambda device: (device == "cuda", "not on the CPU"))
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("RANK", raising=False)
    t4 = get_preset("colab-t4")
    with pytest.raises(Stop):
        M.load_model_and_processor(t4, for_training=True)
    assert asked["source"] == t4.model.model_id and asked["device_map"] == {"": 1}
    assert asked["dtype"] == torch.float16 and asked["attn_implementation"] == t4.model.attn_implementation == "sdpa"
    nf4 = asked["quantization_config"]
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.float16
    assert asked["kbit"] == {"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def test_gpu_preset_without_cuda_points_to_cpu_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.ModelLoadError, match="cpu-tiny"):
        M.load_model_and_processor(get_preset("colab-t4"))


def test_a_prompt_cut_through_its_image_tokens_says_so(tiny_dir: Path) -> None:
    model, processor = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=False)
    msgs = stage1_messages("q?", {"modality": "image", "image": 1, "title": "a", "text": "b"}, reasoning=False)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[[_img((0, 0, 255))]], return_tensors="pt")
    image_id = model.config.image_token_id
    first = int((enc["input_ids"][0] == image_id).nonzero()[0])
    with torch.no_grad():
        model(**enc)  # whole prompt: fine
        cut = {**enc, "input_ids": enc["input_ids"][:, : first + 1], "attention_mask": enc["attention_mask"][:, : first + 1]}
        with pytest.raises(M.ImageTokenMismatchError, match=r"holds? 1 image tokens.*cut through.*Never truncate"):
            model(**cut)  # what a max_length with truncation does to an image prompt
        extra = enc["input_ids"].clone()
        extra[0, -1] = image_id  # a placeholder token in plain text
        with pytest.raises(M.ImageTokenMismatchError, match="holds the image placeholder token"):
            model(**{**enc, "input_ids": extra})
        with pytest.raises(M.ImageTokenMismatchError, match="cut through"):
            model.generate(**cut, max_new_tokens=3)  # generate encodes the images before any forward: checked too
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)  # decode steps (no pixel_values) pass
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    twin = copy.deepcopy(model)  # TRL's reference model is a deep copy: the copy's check is bound to the copy
    assert twin.generate.__self__ is twin
    with pytest.raises(M.ImageTokenMismatchError, match="cut through"):
        twin.generate(**cut, max_new_tokens=3)


def test_the_frozen_vision_tower_records_no_graph_under_the_gpu_presets_input_grad_hooks(tiny_dir: Path) -> None:
    """Gradient checkpointing (every GPU preset) makes transformers and TRL call enable_input_require_grads, which
    hooks Qwen-VL's patch_embed too: without freeze_vision_tower every micro-batch backpropagated the vision blocks."""
    from peft import get_peft_model

    model, processor = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=True)
    assert any("vision tower runs under no_grad" in n for n in model.mmrag_notes)
    model.enable_input_require_grads()  # what the GPU path's checkpointing switches on
    model = get_peft_model(model, M.lora_config(PRESET))
    visual = next(m.visual for m in model.modules() if isinstance(getattr(m, "visual", None), torch.nn.Module))
    seen: list[bool] = []
    visual.register_forward_hook(lambda mod, args, out: seen.append(
        any(t.requires_grad for t in (out if isinstance(out, (tuple, list)) else [getattr(out, "pooler_output", out)])
            if isinstance(t, torch.Tensor))))
    msgs = stage1_messages("q?", {"modality": "image", "image": 1, "title": "a", "text": "b"}, reasoning=False)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[[_img((0, 0, 255))]], return_tensors="pt")
    model(**enc, labels=enc["input_ids"]).loss.backward()
    assert seen == [False]  # no graph through the frozen tower
    lora = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(g is not None for g in lora)  # the language model's LoRA still learns
    wrapped = visual.forward
    assert M.freeze_vision_tower(model) and visual.forward is wrapped  # idempotent: found again, not wrapped twice


def test_lm_head_dtype_mismatch_is_bridged(tiny_dir: Path) -> None:
    model, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=False)
    assert model.lm_head.weight.dtype == torch.float32
    with pytest.raises(RuntimeError):
        model.lm_head(torch.randn(2, model.config.text_config.hidden_size, dtype=torch.bfloat16))
    note = loading._align_lm_head(model, torch.bfloat16)
    assert note and "lm_head" in note
    out = model.lm_head(torch.randn(2, model.config.text_config.hidden_size, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_fp16_inference_keeps_the_training_run_float32_residual(tiny_dir: Path) -> None:
    """colab-t4 computes in fp16: loaded for inference, the non-4-bit weights stay float32 as in training."""
    fp16 = PRESET.with_overrides(**{"model.compute_dtype": "float16"})
    model, processor = M.load_model_and_processor(fp16, model_path=tiny_dir, for_training=False)
    assert model.mmrag_quantized and any("fp16 4-bit inference" in n for n in model.mmrag_notes)
    kinds = {(type(p).__name__, p.dtype) for p in model.parameters()}
    assert ("Parameter", torch.float16) not in kinds and ("Params4bit", torch.uint8) in kinds
    msgs = stage1_messages("q?", {"modality": "image", "image": 1, "title": "a", "text": "b"}, reasoning=False)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        logits = model(**processor(text=[text], images=[[_img((0, 255, 0))]], return_tensors="pt")).logits
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    trained, _ = M.load_model_and_processor(fp16, model_path=tiny_dir, for_training=True)
    assert {p.dtype for p in trained.parameters() if type(p).__name__ != "Params4bit"} == {torch.float32}  # the same


def test_miniature_progress_off_is_scoped_and_restores_the_setting() -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        with M.miniature_progress_off():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        with M.miniature_progress_off(active=False):  # a real checkpoint keeps its bar
            assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        with M.miniature_progress_off():
            pass
        assert not hf_logging.is_progress_bar_enabled()  # a user's own "off" stays off
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def test_the_package_lists_every_name_it_exports() -> None:
    """``from mmrag_lite.modeling import *`` and API tools read ``__all__``: a helper imported into the package for
    its users but left out of the list is invisible there, and a listed name that is not there breaks the import."""
    import types

    public = {n for n, v in vars(M).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(M.__all__) == public - {"annotations"}


def test_release_memory_collects_a_dropped_model_that_a_reference_cycle_keeps_alive() -> None:
    """``del model`` drops a name; a model in a reference cycle (hooks and closures make them) stays in memory until
    the collector runs, beside the next model loaded."""
    import gc
    import weakref

    model = torch.nn.Linear(4, 4)
    model.__dict__["cycle"] = model
    alive = weakref.ref(model)
    gc.disable()  # the collector runs only when release_memory asks
    try:
        del model
        assert alive() is not None
        M.release_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_lora_targets_language_model_only(tiny_dir: Path) -> None:
    import re

    from peft import get_peft_model

    model, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=True)
    peft_model = get_peft_model(model, M.lora_config(PRESET))
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    counts = M.count_parameters(peft_model)  # notebook 03's "trainable of total"
    assert counts["trainable"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert 0 < counts["trainable"] < counts["total"]
    assert not any("visual" in n for n in lora_names)
    # GPU presets also adapt the MLP; Qwen2.5-VL's vision blocks have gate/up/down_proj too and must not match
    regex = M.lora_config_kwargs(get_preset("a100"))["target_modules"]
    assert re.fullmatch(regex, "model.language_model.layers.3.mlp.gate_proj")
    assert re.fullmatch(regex, "base_model.model.model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.visual.blocks.0.mlp.gate_proj")
    assert not re.fullmatch(regex, "model.visual.blocks.0.attn.qkv")


def test_lora_config_carries_each_presets_rank_scale_and_dropout() -> None:
    """alpha / r scales every LoRA update (a100: r=64, alpha=128) and the GPU presets train with dropout 0.05: each
    preset's lora settings, not PEFT's defaults (alpha 8, dropout 0), reach the LoraConfig."""
    from mmrag_lite.config import PRESETS

    for name in PRESETS:
        lo = get_preset(name).lora
        cfg = M.lora_config(name)
        assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (lo.r, lo.alpha, lo.dropout, "none"), name


def test_lora_target_names_that_match_no_projection_are_refused() -> None:
    """lora.target_modules=[q_proj, lm_head, qkv] trained q_proj alone: the language-model regex dropped the other
    two without a word (PEFT only complains when nothing matches). Now they are a ConfigError naming them and the
    valid names, from the preset and from lora_config for a preset built without validation."""
    from dataclasses import replace

    from mmrag_lite.config import ConfigError

    valid = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(ConfigError, match=r"lora\.target_modules names \['lm_head', 'qkv'\].*valid names: "
                                          + ", ".join(valid)):
        get_preset("cpu-tiny", **{"lora.target_modules": ["q_proj", "lm_head", "qkv"]})
    for name in ("l4", "a100"):
        with pytest.raises(ConfigError, match=r"\['embed_tokens'\]"):
            get_preset(name, **{"lora.target_modules": ["embed_tokens"], "lora.freeze_vision": False})
    unchecked = replace(PRESET, lora=replace(PRESET.lora, target_modules=("q_proj", "fc1")))  # no validate()
    with pytest.raises(ConfigError, match=r"\['fc1'\]"):
        M.lora_config_kwargs(unchecked)
    assert get_preset("cpu-tiny", **{"lora.target_modules": list(valid)}).lora.target_modules == valid


def test_prepare_image_fixed_square_rgb() -> None:
    img = M.prepare_image(Image.new("L", (91, 40), 128), PRESET)
    assert img.size == (56, 56) and img.mode == "RGB"
    assert M.prepare_image(None, PRESET) is None
    cut_out = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # a logo's transparent background, black under the alpha
    assert M.prepare_image(cut_out, 28).getpixel((0, 0)) == (255, 255, 255)  # the model sees white, not black
    assert [i.size for i in M.prepare_images([_img((1, 2, 3), (10, 30)), None], 28)] == [(28, 28)]
    keyed = Image.new("RGB", (28, 28), (0, 0, 0))
    keyed.info["transparency"] = (0, 0, 0)  # an RGB PNG's transparent colour key: those pixels are see-through
    assert M.prepare_image(keyed, 28).getpixel((0, 0)) == (255, 255, 255)
    assert M.prepare_images(None, PRESET) == []  # a text-only candidate has no image list at all


def test_mixed_batch_fix_and_save_roundtrip(loaded, tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    _, processor = loaded
    texts = ["plain text", "<|vision_start|><|image_pad|><|vision_end|>with image"]
    plain = AutoProcessor.from_pretrained(tiny_dir)
    with pytest.raises((TypeError, ValueError)):  # the trap, unfixed
        plain(text=texts, images=[None, [_img((0, 255, 0))]], padding=True, return_tensors="pt")
    enc = processor(text=texts, images=[None, [_img((0, 255, 0))]], padding=True, return_tensors="pt")
    assert enc["image_grid_thw"].shape[0] == 1
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == type(processor).__name__ == "Qwen2VLProcessor"


def test_text_only_batches_need_no_images_in_the_processor_or_the_model(loaded) -> None:
    """A GRPO batch of text snippets only: TRL passes ``images=[None, None]`` (the processor refuses ``[[], []]``).
    A text-only micro-batch cut from a batch with images: TRL passes *empty* pixel_values, on which the vision tower
    fails (``torch.cat(): expected a non-empty list of Tensors``); both read as a batch without images."""
    model, processor = loaded
    enc = processor(text=["Old Tower: built in 1900", "Red: a red disk"], images=[None, None], padding=True,
                    return_tensors="pt")
    assert "pixel_values" not in enc
    with_image = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a picture"], images=[[_img((0, 0, 255))]],
                           return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits
        sliced = model(**enc, pixel_values=with_image["pixel_values"][:0],
                       image_grid_thw=with_image["image_grid_thw"][:0]).logits  # TRL's slice of a text-only micro-batch
    assert torch.equal(plain, sliced)


def test_the_processor_pads_on_the_left_with_a_pad_token(tiny_dir: Path) -> None:
    """Batched generation continues each row from its last prompt token, which right padding would put behind pad
    tokens (a hub processor may pad right). A tokenizer without a pad token borrows eos; one with neither is refused."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    tok.padding_side, tok.pad_token = "right", None
    assert M.prepare_processor(processor) is processor
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token
    enc = processor(text=["red", "the red circle in the tower"], padding=True, return_tensors="pt")
    assert int(enc["input_ids"][0, 0]) == tok.pad_token_id and int(enc["input_ids"][0, -1]) != tok.pad_token_id
    tok.pad_token = tok.eos_token = None
    with pytest.raises(M.ModelLoadError, match="neither a pad nor an eos token"):
        M.prepare_processor(processor)


def test_the_processor_reads_the_presets_pixel_budget(tiny_dir: Path) -> None:
    """model.min_pixels / max_pixels (what the image-token error advises lowering) reach the processor, whatever the
    checkpoint saved: a small image is enlarged to the minimum, a large one shrunk to the maximum."""
    budget = PRESET.with_overrides(**{"model.image_size": 112, "model.min_pixels": 56 * 56,
                                      "model.max_pixels": 112 * 112})
    processor = M.load_processor(budget, tiny_dir)

    def grid(side: int) -> list:
        return processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[[_img((0, 0, 255), (side, side))]],
                         return_tensors="pt")["image_grid_thw"].tolist()

    assert grid(28) == [[1, 4, 4]] and grid(224) == [[1, 8, 8]]  # 4 and 16 image tokens after the 2x2 merge


def test_prompt_token_count_counts_what_generation_feeds_the_model(loaded) -> None:
    """stage2.max_prompt_tokens caps what the model reads when it answers: the prompt with its image placeholders
    expanded and the assistant header that generation (and scoring) starts from; without the header a prompt at the
    cap would run past it."""
    _, processor = loaded
    image = _img((255, 0, 0))
    msgs = stage1_messages("What color?", {"modality": "image", "image": 1, "title": "t", "text": "c"}, reasoning=False)
    fed = M.encode_prompts(processor, [processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)],
                           [[image]])["input_ids"]
    assert M.prompt_token_count(processor, msgs, [image]) == fed.shape[-1]


def test_adapter_roundtrip(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model

    model, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=True)
    peft_model = get_peft_model(model, M.lora_config(PRESET))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded_model, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, adapter_path=tmp_path / "adapter",
                                                 for_training=False)
    assert isinstance(loaded_model, PeftModel)
    assert loaded_model.mmrag_quantized is True
    assert not any(p.requires_grad for p in loaded_model.parameters())
    resumed, _ = M.load_model_and_processor(PRESET, model_path=tiny_dir, adapter_path=tmp_path / "adapter",
                                            for_training=True)  # stage 2 continuing from the stage-1 adapter
    lora = [p for n, p in resumed.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)


# ------------------------------------------------------------------------------------------ one GRPO step
def test_one_grpo_step_on_mixed_batch_changes_lora(tiny_dir: Path, tmp_path: Path) -> None:
    """Trap 1 (text-only + image prompts) and trap 2 (0/1/2 images of different original sizes) in ONE batch."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage
    from trl import GRPOConfig, GRPOTrainer

    model, processor = M.load_model_and_processor(PRESET, model_path=tiny_dir, for_training=True)
    raw = [
        ([], {"modality": "text", "title": "Old Tower", "text": "built in 1900"}),
        ([_img((255, 0, 0), (80, 40))], {"modality": "image", "image": 1, "title": "Red", "text": "a red disk"}),
        ([_img((0, 0, 255), (30, 70)), _img((0, 255, 0), (56, 56))], None),
    ]
    rows = []
    for images, cand in raw:
        if cand is None:  # a two-image prompt (stage-2 like)
            prompt = [{"role": "user", "content": [{"type": "text", "text": "D1: "}, {"type": "image"},
                                                    {"type": "text", "text": "D2: "}, {"type": "image"},
                                                    {"type": "text", "text": "Which is blue?"}]}]
        else:
            prompt = stage1_messages("Is it red?", cand, reasoning=False)
        rows.append({"prompt": prompt, "images": M.prepare_images(images, PRESET)})
    features = Features({"prompt": [{"role": Value("string"), "content": [{"type": Value("string"),
                                                                            "text": Value("string")}]}],
                         "images": List(HFImage())})
    dataset = Dataset.from_list(rows, features=features)

    def length_reward(completions, **kwargs):  # varies within a group, so advantages are non-zero
        return [float(len(str(c)) % 7) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, fp16=False, report_to=[], max_steps=1,
        per_device_train_batch_size=12, num_generations=4, max_completion_length=4, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", temperature=1.0, beta=0.0, seed=0, shuffle_dataset=False,
        activation_checkpointing=False,  # the new name: TRL's default sets the deprecated one
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset,
                          processing_class=processor, peft_config=M.lora_config(PRESET))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert changed, "one GRPO step should change the LoRA weights"
    assert any("rewards/length_reward/mean" in h for h in trainer.state.log_history)


def test_a_short_warm_up_saves_a_complete_model_and_drops_its_data(tiny_dir: Path, tmp_path: Path) -> None:
    from mmrag_lite.modeling import cache

    out = tmp_path / "models" / "warm"
    report = M.warm_up_tiny_vlm(tiny_dir, out, settings=M.WarmUpSettings(max_steps=2, eval_every=1, max_questions=8),
                                verbose=False)
    assert report["steps"] <= 2 and report["stopped_by"] in {"max_steps", "target accuracy"}
    assert cache._is_complete(out) and M.tiny_info(out)["warmed_up"]
    assert not (tmp_path / "models" / "_warmup_data").exists()  # the warm-up's own Mini-WebQA went with it


def test_the_cache_keys_warns_and_rebuilds_as_promised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found unguarded by a mutation run; works on copies, never on the shared cache under data/models."""
    import json
    import shutil

    from mmrag_lite.modeling import cache

    assert M.tiny_model_dir(preset=PRESET.with_overrides(seed=1)) != M.tiny_model_dir(preset=PRESET)
    shaped = [PRESET, PRESET.with_overrides(**{"stage1.k": 3}), PRESET.with_overrides(**{"data.world_questions": 300})]
    assert len({M.tiny_model_dir(preset=p) for p in shaped}) == 3  # k and the data settings shape the warm-up too
    assert M.tiny_model_dir(warm_settings=M.WarmUpSettings(max_steps=400)) != M.tiny_model_dir()
    before = M.tiny_model_dir(warm=False)
    monkeypatch.setattr(cache, "tokenizer_corpus", lambda: ["another corpus"])
    assert M.tiny_model_dir(warm=False) != before  # a changed tokenizer corpus is another model
    monkeypatch.undo()
    cold = M.ensure_tiny_vlm(warm=False)
    copy = shutil.copytree(cold, tmp_path / "copy")
    (copy / "tokenizer.json").unlink()
    assert not cache._is_complete(copy)  # one missing file is enough

    cold_copy, warm_dir = shutil.copytree(cold, tmp_path / "cold"), tmp_path / "warm_dir"
    calls: list[Path] = []

    def fake_warm_up(cold_dir, target, **_):
        calls.append(target)
        shutil.rmtree(target, ignore_errors=True)  # the real one swaps the new folder in atomically
        shutil.copytree(cold_dir, target)

    monkeypatch.setattr(cache, "tiny_model_dir", lambda warm=True, **_: warm_dir if warm else cold_copy)
    monkeypatch.setattr(cache, "warm_up_tiny_vlm", fake_warm_up)
    assert M.ensure_tiny_vlm(PRESET) == warm_dir and calls == [warm_dir]
    info = json.loads((warm_dir / "mmrag_tiny.json").read_text())
    (warm_dir / "mmrag_tiny.json").write_text(json.dumps({**info, "warm_up": {"steps": 9, "stopped_by": "time"}}))
    with pytest.warns(RuntimeWarning, match="time guard"):  # said on every use, not only by the helper
        M.ensure_tiny_vlm(PRESET)
    weights = warm_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged after the build
    M.ensure_tiny_vlm(PRESET)
    assert calls == [warm_dir, warm_dir]  # rebuilt, not loaded into an opaque error
