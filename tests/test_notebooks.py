"""Every course notebook runs top to bottom, headless, on the cpu-tiny preset, in course order.

The notebooks share one run folder, as in ``make course``: notebook 03 trains the adapter that 04 continues.
"""

from __future__ import annotations

import pytest

from mmrag_lite.course import notebook_paths, run_course

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

NOTEBOOKS = notebook_paths()


@pytest.fixture(scope="module")
def course_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("course")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless_on_cpu_tiny(path, course_dir):
    report = run_course("cpu-tiny", course_dir, notebooks=[path])
    run = report.notebooks[0]
    assert run.ok, f"{path.name} failed: {run.error} (executed copy: {run.output})"
