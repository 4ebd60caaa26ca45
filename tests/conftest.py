"""Shared fixtures. Real benchmark samples live in ../shared/data; tests that need them skip with a reason."""

from __future__ import annotations

import os

# Model tests never reach for the hub: set before transformers / huggingface_hub are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

from mmrag_lite.config import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real benchmark samples not found: ../shared/data is absent (set MMRAG_SHARED_DATA to point at them)")
    return path


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("bench_gpu_inference")``: a script of ``benchmarks/`` imported as a module (they are scripts,
    not a package), so a test can call its ``main`` with arguments."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core box two threads contend and a tiny forward pass runs ~30x slower.

    Model-test modules use it for all their tests: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
