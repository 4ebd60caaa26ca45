"""Benchmark: a full-size synthetic WebQA world (~42k questions, ~390k images), then Mini-WebQA from it.

Prints wall time and peak resident memory (``resource.getrusage`` ru_maxrss, this process and its children) for
both phases. Each phase runs in its own child process, so the two peaks are measured separately.
Target (issue #2): the build under 5 minutes and under 2 GB on 2 CPU cores.

    .venv/bin/python benchmarks/build_full_world.py                 # full size, in a temporary folder
    .venv/bin/python benchmarks/build_full_world.py --questions 2000 --keep /tmp/world2k
    # real-size images: 800 px JPEGs (real WebQA's are ~800 px), kept images downscaled to 448 px as stored;
    # --workers 1 builds the rows in one thread (the default is one per core)
    .venv/bin/python benchmarks/build_full_world.py --questions 1000 --image-size 800 --image-format JPEG --preset colab-t4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024  # Linux reports KiB


def _phase(name: str, queue, args: dict) -> None:
    from mmrag_lite.data import build_mini_webqa, make_world

    t0 = time.perf_counter()
    if name == "world":
        make_world(args["world"], n_questions=args["questions"], seed=args["seed"], image_size=args["image_size"],
                   image_format=args["image_format"], progress=args["progress"])
        extra = json.loads((Path(args["world"]) / "world_manifest.json").read_text())["n_images"]
    else:
        _, report = build_mini_webqa(args["world"], args["mini"], settings=args["preset"], seed=args["seed"],
                                      progress=args["progress"], workers=args["workers"])
        extra = {"splits": report.splits, "kept": report.n_kept, "read": report.n_read}
    queue.put({"phase": name, "wall_s": time.perf_counter() - t0, "peak_mb": _peak_mb(), "extra": extra})


def _run(name: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")  # a fresh interpreter per phase: its ru_maxrss is that phase's peak alone
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(name, queue, args))
    t0 = time.perf_counter()
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"phase {name} failed with exit code {proc.exitcode}")
    result["wall_incl_startup_s"] = time.perf_counter() - t0
    return result


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=41_732, help="records in the world (WebQA train+val: 41,732)")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--image-format", default="PNG", choices=["PNG", "JPEG"], help="how the world encodes images")
    parser.add_argument("--preset", default="cpu-tiny", help="preset whose DataSettings (max_candidates) the build uses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="threads building rows (default: one per core, max 4)")
    parser.add_argument("--keep", default=None, help="write here and keep the files (default: a temporary folder)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    ns = parser.parse_args(argv)
    root = Path(ns.keep) if ns.keep else Path(tempfile.mkdtemp(prefix="mmrag-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    args = {"world": str(root / "world"), "mini": str(root / "mini_webqa"), "questions": ns.questions,
            "image_size": ns.image_size, "image_format": ns.image_format, "preset": ns.preset, "seed": ns.seed,
            "workers": ns.workers, "progress": ns.progress}
    try:
        world = _run("world", args)
        print(f"world: {ns.questions} questions, {world['extra']} images, {world['wall_s']:.1f} s, "
              f"peak {world['peak_mb']:.0f} MB, {_dir_mb(root / 'world'):.0f} MB on disk", flush=True)
        mini = _run("mini", args)
        print(f"mini-webqa: read {mini['extra']['read']}, kept {mini['extra']['kept']} {mini['extra']['splits']}, "
              f"{mini['wall_s']:.1f} s, peak {mini['peak_mb']:.0f} MB, {_dir_mb(root / 'mini_webqa'):.0f} MB on disk",
              flush=True)
        print(json.dumps({"world": world, "mini": mini}, indent=2))
    finally:
        if not ns.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
