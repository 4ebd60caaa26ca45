"""Tests of mmrag_lite.atomic: a folder or file is swapped in whole, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmrag_lite.atomic import _sibling, atomic_dir, write_json_atomic, write_text_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "out"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _names(target) == ["b.txt"]  # replaced, not merged
    assert _names(target.parent) == ["out"]  # neither the temporary nor the old folder is left


def test_atomic_dir_removes_what_a_killed_writer_left_but_not_a_live_ones(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)  # that process has exited
    target = tmp_path / "model"
    orphans = [tmp_path / f".model.tmp-{dead_pid}-abcd1234", tmp_path / f".model.old-{dead_pid}-abcd1234"]
    live = _sibling(target, "tmp")  # a writer still at work (in this very process: it named its folder)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    elsewhere = tmp_path / f".model.tmp-{sleeper.pid}-feedbeef"  # a writer at work in another process
    # a killed run that had this process's id (in a container every run is often pid 1): not this process's folder
    namesake = tmp_path / f".model.tmp-{os.getpid()}-0dd0dd00"
    other = tmp_path / f".modelx.tmp-{dead_pid}-abcd1234"  # another target's: not ours to judge
    try:
        for folder in [*orphans, live, elsewhere, namesake, other]:
            folder.mkdir()
            (folder / "weights.bin").write_bytes(b"x" * 10)
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("one")
        assert _names(tmp_path) == sorted([live.name, elsewhere.name, other.name, "model"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_dir_puts_back_the_copy_a_writer_killed_between_its_renames_left(tmp_path):
    """Killed after moving the old folder aside but before renaming the new one in: the old one is the only
    complete copy, so it comes back as the target (and survives a write that then fails)."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    target = tmp_path / "mini"
    aside = tmp_path / f".mini.old-{dead_pid}-abcd1234"
    aside.mkdir()
    (aside / "a.txt").write_text("last good")
    (tmp_path / f".mini.tmp-{dead_pid}-abcd1234").mkdir()  # the half-written new one: deleted
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["mini"]
    assert (target / "a.txt").read_text() == "last good"


def test_atomic_dir_failure_leaves_target_intact(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["out"]
    assert (target / "a.txt").read_text() == "old"


def test_atomic_dir_without_create_lets_the_writer_make_it(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, create=False) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "a.txt").write_text("x")
    assert _names(target) == ["a.txt"]
    with pytest.raises(OSError), atomic_dir(target, create=False) as tmp:
        tmp.mkdir()
        raise OSError("disk full")
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_restores_the_old_target_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert _names(tmp_path) == ["out"]
    assert (target / "a.txt").read_text() == "old"


def test_write_json_atomic_round_trips(tmp_path):
    import json

    path = tmp_path / "deep" / "x.json"
    payload = {"a": [1, 2.5, None], "b": "ü"}
    assert write_json_atomic(path, payload, indent=1) == path
    assert json.loads(path.read_text(encoding="utf-8")) == payload and "ü" in path.read_text(encoding="utf-8")
    write_json_atomic(path, {"when": object()}, default=lambda obj: "custom")  # how training writes odd log values
    assert json.loads(path.read_text(encoding="utf-8")) == {"when": "custom"}
    nested = lambda obj: {"inner": object()} if isinstance(obj, Exception) else "leaf"  # default's result is read by default too
    write_json_atomic(path, {"when": ValueError()}, default=nested)
    assert json.loads(path.read_text(encoding="utf-8")) == {"when": {"inner": "leaf"}}
    import numpy as np
    import torch

    payload = {"one": np.float32(0.5), "many": np.array([1.0, 2.0]), "t": torch.tensor(0.25), "tt": torch.ones(2)}
    write_json_atomic(path, payload, default=str)  # a log's odd values
    assert json.loads(path.read_text(encoding="utf-8")) == {"one": 0.5, "many": "[1. 2.]", "t": 0.25,
                                                            "tt": "tensor([1., 1.])"}
    write_text_atomic(path, "[]")
    assert json.loads(path.read_text(encoding="utf-8")) == []
    assert _names(path.parent) == ["x.json"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_text_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    with pytest.raises(TypeError):
        write_text_atomic(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old" and _names(tmp_path) == ["x.json"]


def test_an_interrupt_leaves_no_temporary_folder_and_a_swapped_folder_is_readable_by_all(tmp_path: Path) -> None:
    """Ctrl-C in a notebook is a KeyboardInterrupt: the model-sized temp folder must go with it (mutation run)."""
    import stat

    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not tmp.exists() and not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"x")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755  # shared caches: others may read them


def test_json_ready_writes_infinities_as_null_and_sets_as_lists(tmp_path):
    """The docstring's promise, from a mutation run: inf (an fp16 overflow) is a bare Infinity that strict JSON
    rejects, and a set is no JSON type; both must still be written."""
    import json

    from mmrag_lite.atomic import json_ready

    assert json_ready({"a": float("inf"), "b": float("-inf"), "c": float("nan"), "d": 1.5}) == \
        {"a": None, "b": None, "c": None, "d": 1.5}
    assert json_ready({"ids": {3}}) == {"ids": [3]}
    write_json_atomic(tmp_path / "x.json", {"loss": float("inf"), "ids": {"D1"}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"loss": None, "ids": ["D1"]}


def test_folder_lock_makes_a_second_builder_wait(tmp_path):
    """Two callers building one folder: the second enters only after the first has left (mutation run)."""
    import threading
    import time

    from mmrag_lite.atomic import folder_lock

    order: list[str] = []

    def second() -> None:
        with folder_lock(tmp_path / "cache"):
            order.append("second in")

    with folder_lock(tmp_path / "cache"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)  # ample time for an unlocked second caller to get in
        order.append("first out")
    thread.join(timeout=10)
    assert order == ["first out", "second in"]


def test_a_sibling_without_a_process_id_is_not_taken_for_a_writers(tmp_path):
    """``.<name>.tmp-<pid>-...`` with no number where the id goes is nobody's temp folder: left alone, no crash."""
    stray = tmp_path / ".model.tmp-notes-1"
    stray.mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "a.txt").write_text("one")
    assert _names(tmp_path) == sorted([stray.name, "model"])


def test_the_newest_of_several_copies_left_aside_is_the_one_put_back(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    for n, (name, text) in enumerate([("aaaa1111", "older"), ("bbbb2222", "newest"), ("cccc3333", "middle")]):
        aside = tmp_path / f".mini.old-{dead_pid}-{name}"
        aside.mkdir()
        (aside / "a.txt").write_text(text)
        os.utime(aside, (1_000_000 + 10 * n, 1_000_000 + {"older": 0, "newest": 100, "middle": 50}[text]))
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "mini"):
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["mini"] and (tmp_path / "mini" / "a.txt").read_text() == "newest"


def test_a_writer_that_makes_no_folder_fails_and_keeps_the_old_one(tmp_path):
    """With ``create=False`` a writer that returns without creating its folder wrote nothing: an error, not a
    silent success that keeps stale contents under a fresh-looking name."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(FileNotFoundError), atomic_dir(target, create=False):
        pass
    assert _names(tmp_path) == ["out"] and (target / "a.txt").read_text() == "old"
