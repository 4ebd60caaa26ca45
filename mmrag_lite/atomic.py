"""Atomic writes: readers (and a killed or interrupted process) never see half a folder or half a file.

A folder is written into a temporary sibling and swapped in when complete; a file is written under a temporary
name in the same folder and renamed. Standard library only, so every module (``data`` included) can use it.
Nothing is fsynced: that guards against a killed kernel or a disconnected Colab runtime, not against a power loss
or an OS crash, after which the rename may reach the disk before the data (rerun the step that wrote it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The sibling names this process made: a sibling carrying this process's id but not made by it was left by a killed
# process that had the same id (in a container, every run is often pid 1), so it is an orphan like any other.
_MADE_HERE: set[str] = set()


def _sibling(target: Path, tag: str) -> Path:
    """A fresh hidden name next to ``target``: ``.<name>.<tag>-<pid>-<random>``."""
    path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _MADE_HERE.add(path.name)
    return path


@contextmanager
def atomic_dir(target: str | Path, *, create: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success swap it in as ``target``.

    On normal exit an existing ``target`` is moved aside, the new folder renamed into place and only then the old
    one deleted (if the rename fails the old one is put back). On an exception the temporary folder is removed and
    an existing ``target`` is left untouched. With ``create=False`` the yielded path does not exist yet (for
    writers that insist on creating their output folder themselves). The folder is made readable by others
    (``0o755``): caches under it are shared.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = _sibling(target, "tmp")
    if create:
        tmp.mkdir()
        os.chmod(tmp, 0o755)
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform without signals: assume alive
        return True
    return True


def _writer_alive(pid: int, name: str) -> bool:
    """Whether the process that made sibling ``name`` still runs: ours only if we made it, another by its id."""
    return name in _MADE_HERE if pid == os.getpid() else _pid_alive(pid)


def _remove_orphans(target: Path) -> None:
    """Delete the temporary siblings of ``target`` that a killed writer left (their process is gone): a kernel
    interrupted mid-build must not leave a model-sized folder behind for good. A live writer's are never touched
    (on this machine: the check is by process id, so writers on other hosts sharing the folder are out of scope).

    A writer killed between its two renames leaves no ``target`` and the complete previous one as ``.old``: that
    one is renamed back, not deleted, so a later failed write still leaves the last good copy.
    """
    dead: dict[str, list[Path]] = {"tmp": [], "old": []}
    for sibling in target.parent.glob(f".{target.name}.*-*-*"):
        tag, _, rest = sibling.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if tag in dead and pid.isdigit() and sibling.is_dir() and not _writer_alive(int(pid), sibling.name):
            dead[tag].append(sibling)
    if dead["old"] and not target.exists():
        newest = max(dead["old"], key=lambda p: p.stat().st_mtime)
        os.replace(newest, target)
        dead["old"].remove(newest)
    for sibling in dead["tmp"] + dead["old"]:
        shutil.rmtree(sibling, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename a completed temporary folder to ``target``; the old target (if any) is removed only afterwards."""
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive lock beside ``folder`` so that parallel callers (tests, notebooks, two kernels on one run folder)
    build it once, not twice: the second waits, then finds it built. The atomic rename alone keeps each folder
    whole, but two builders racing to rename onto one target can fail."""
    folder = Path(folder)
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) under a temporary name in the same folder, then rename it to ``path``.

    The file ends up ``0o644`` (as ``Path.write_text`` makes it under the usual umask), not ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _one_element(obj: Any) -> bool:
    """Whether ``.item()`` can read ``obj``: torch counts elements with ``numel()``, numpy with ``size``."""
    count = obj.numel() if callable(getattr(obj, "numel", None)) else getattr(obj, "size", 1)
    return count == 1


def json_ready(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as plain JSON values: ``to_dict()`` objects, tuples, sets, paths and numpy/torch scalars converted,
    NaN/inf as ``None``.

    Missing numbers are NaN in memory (an fp16 overflow, a metric with nothing to average), but a file must stay
    valid JSON: a bare ``NaN`` is rejected by strict parsers. ``default`` handles anything else (else TypeError).
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: json_ready(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_ready(v, default) for v in obj]
    if hasattr(obj, "to_dict"):
        return json_ready(obj.to_dict(), default)
    if isinstance(obj, Path):
        return str(obj)
    if callable(getattr(obj, "item", None)) and _one_element(obj):  # a numpy / torch scalar (or 1-element array)
        return json_ready(obj.item(), default)
    if default is not None:
        return json_ready(default(obj), default)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | Path, payload: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """``payload`` as strict JSON (``json_ready``: NaN/inf become ``null``), UTF-8, written with ``write_text_atomic``."""
    text = json.dumps(json_ready(payload, default), indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


__all__ = ["atomic_dir", "folder_lock", "json_ready", "write_json_atomic", "write_text_atomic"]
