"""Where the miniature lives: cache folders under ``data/models/`` named by a hash of everything that shapes them.

The first call builds (and warms up) the miniature, later calls return its folder at once; a lock beside the folder
keeps parallel callers (tests, notebooks) from building it twice, and the atomic rename keeps a crash from leaving
half a model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import Preset, data_dir
from .common import as_preset
from .tiny import TinyVLMSettings, build_tiny_vlm, tokenizer_corpus
from .warmup import WARMUP_DATA_SOURCE, WarmUpSettings, warm_up_threads, warm_up_tiny_vlm


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
    warm_key = _short_hash({"warm": asdict(warm_settings), "data": WARMUP_DATA_SOURCE, "data_settings": asdict(p.data),
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


def tiny_info(folder: str | Path | None = None) -> dict[str, Any]:
    """The miniature's build/warm-up record (``mmrag_tiny.json``): parameters, settings, warm-up accuracy."""
    folder = Path(folder) if folder else ensure_tiny_vlm()
    return json.loads((folder / "mmrag_tiny.json").read_text(encoding="utf-8"))


