"""Where the miniature lives: cache folders under ``data/models/`` named by a hash of everything that shapes them.

The first call builds (and warms up) the miniature, later calls return its folder at once; a lock beside the folder
keeps parallel callers (tests, notebooks) from building it twice, and the atomic rename keeps a crash from leaving
half a model behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import folder_lock
from ..config import Preset, data_dir
from .common import as_preset
from .tiny import TinyVLMSettings, build_tiny_vlm, tokenizer_corpus
from .warmup import WARMUP_DATA_SOURCE, WarmUpSettings, warm_up_threads, warm_up_tiny_vlm

# The image settings every warm key made before image settings entered it: a key leaves them out, so those caches
# stay valid. A fixed literal, not cpu-tiny's live settings: edit those and the key must change.
_KEYLESS_IMAGE_SETTINGS = {"image_size": 56, "min_pixels": 3136, "max_pixels": 3136}


def _prompts_hash() -> str:
    """The stage-1 and stage-2 prompts the warm-up trains on, rendered for fixed candidates: the tokenizer corpus holds
    its own copy of the user turns, so a reworded prompt would otherwise reuse a miniature warmed on the old one."""
    from ..prompts import stage1_messages, stage1_target, stage2_messages, stage2_target

    image = {"id": "1", "modality": "image", "title": "Old Mill of Ada", "text": "Two red circles.", "image": object()}
    snippet = {"id": "2", "modality": "text", "title": "Old Mill of Ada", "text": "It was founded in 1809.", "image": None}
    rendered = [[stage1_messages("What color?", c, reasoning=r) for c in (image, snippet)]
                + [stage2_messages("What color?", [image, snippet], reasoning=r)] for r in (False, True)]
    rendered += [stage1_target("yes"), stage1_target("no", reasoning=True, think="x"), stage2_target(["D1"], "red")]
    return _short_hash([repr(rendered)])


@functools.cache
def _data_code_hash() -> str:
    """What the world generator and the Mini-WebQA builder make of a small fixed world (30 questions): a change to
    either that moves the data the warm-up trains on moves this, which the cache key's settings would not. The
    pixels enter as the drawing version (a fix may move only scenes this small world never draws)."""
    import tempfile

    from ..data import build_mini_webqa, make_world
    from ..data.world import DRAWING_VERSION

    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "world", n_questions=30, seed=0, image_size=56, progress=False)
        dd, _ = build_mini_webqa(world, None, settings="cpu-tiny", seed=0, progress=False)
    rows = [(split, r["guid"], r["question"], r["answer"], r["keywords"], r["qcate"],
             [(c["id"], c["is_gold"], c["modality"], c["title"], c["text"]) for c in r["candidates"]])
            for split in sorted(dd) for r in dd[split]]
    return _short_hash({"rows": rows, "drawing": DRAWING_VERSION})


# Both as this code made them on 2026-11-28; a key leaves out a value equal to these, so caches made before they
# entered the key stay valid, and any change to the prompts or to the data code names a new miniature. Never update
# them: the old value would then name a miniature warmed on other prompts or data.
_KEYLESS_PROMPTS = "9160065977"
_KEYLESS_DATA_CODE = "b476f35310"


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _corpus_hash() -> str:
    return hashlib.sha256("\n".join(tokenizer_corpus()).encode()).hexdigest()[:8]


def tiny_model_dir(warm: bool = True, settings: TinyVLMSettings = TinyVLMSettings(),
                   warm_settings: WarmUpSettings = WarmUpSettings(), preset: Preset | str | None = None) -> Path:
    """Cache folder of the miniature under ``data/models/``, named by a short hash of everything that shapes it."""
    build_key = _short_hash({"settings": asdict(settings), "corpus": _corpus_hash()})
    base = data_dir() / "models" / f"tiny-{settings.architecture.replace('_', '')}-{build_key}"
    if not warm:
        return base
    p = as_preset(preset or "cpu-tiny")
    key: dict[str, Any] = {"warm": asdict(warm_settings), "data": WARMUP_DATA_SOURCE, "data_settings": asdict(p.data),
                           "seed": p.seed, "k": p.stage1.k, "threads": warm_up_threads(warm_settings)}
    images = _image_settings(p)
    if images != _KEYLESS_IMAGE_SETTINGS:  # image tokens per picture shape the warm model
        key["images"] = images
    if (prompts := _prompts_hash()) != _KEYLESS_PROMPTS:
        key["prompts"] = prompts
    if (data_code := _data_code_hash()) != _KEYLESS_DATA_CODE:
        key["data_code"] = data_code
    return base.parent / f"{base.name}-warm-{_short_hash(key)}"


def _image_settings(preset: Preset) -> dict[str, int]:
    return {"image_size": preset.model.image_size, "min_pixels": preset.model.min_pixels,
            "max_pixels": preset.model.max_pixels}


_MODEL_FILES = ("mmrag_tiny.json", "config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def _is_complete(folder: Path) -> bool:
    """Every file loading needs is there and the weights' header reads: a folder damaged after the build (a deleted
    or cut file; the atomic rename rules out a half-written one) is rebuilt, not loaded into an opaque error."""
    if not all((folder / name).is_file() for name in _MODEL_FILES):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            fh.keys()
    except Exception:  # noqa: BLE001 - any unreadable header means "rebuild"
        return False
    return True


def ensure_tiny_vlm(preset: Preset | str | None = None, *, warm: bool = True,
                    settings: TinyVLMSettings = TinyVLMSettings(),
                    warm_settings: WarmUpSettings = WarmUpSettings()) -> Path:
    """The miniature's folder, built (and warmed up when ``warm``) if missing. Second call: instant."""
    cold = tiny_model_dir(warm=False, settings=settings)
    if not _is_complete(cold):
        with folder_lock(cold):
            if not _is_complete(cold):
                build_tiny_vlm(cold, settings)
    if not warm:
        return cold
    target = tiny_model_dir(warm=True, settings=settings, warm_settings=warm_settings, preset=preset)
    if not _is_complete(target):
        with folder_lock(target):
            if not _is_complete(target):
                warm_up_tiny_vlm(cold, target, preset=preset or "cpu-tiny", settings=warm_settings)
    _warn_if_cut_short(target)
    return target


def _warn_if_cut_short(folder: Path) -> None:
    """A warm-up that the time guard stopped (a very busy machine) is cached like any other, so say so on every use:
    it is another, less trained model than the one the course's figures come from."""
    try:
        warm = json.loads((folder / "mmrag_tiny.json").read_text(encoding="utf-8")).get("warm_up", {})
    except (OSError, ValueError):
        return
    if warm.get("stopped_by") == "time":
        warnings.warn(f"the miniature in {folder} was warmed up for only {warm.get('steps')} steps: the time guard "
                      f"(WarmUpSettings.max_seconds) stopped it on a busy machine. Delete the folder and re-run when "
                      "the machine is idle to get the fully warmed model the course's figures come from",
                      RuntimeWarning, stacklevel=3)


def tiny_info(folder: str | Path | None = None, preset: Preset | str | None = None) -> dict[str, Any]:
    """The miniature's build/warm-up record (``mmrag_tiny.json``): parameters, settings, warm-up accuracy; of
    ``folder``, else of the warm miniature ``preset`` loads (its seed, k, data and image settings pick it)."""
    folder = Path(folder) if folder else ensure_tiny_vlm(preset)
    return json.loads((folder / "mmrag_tiny.json").read_text(encoding="utf-8"))


