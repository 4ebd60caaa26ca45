"""Every course notebook runs top to bottom, headless, on the cpu-tiny preset, in course order.

The notebooks share one run folder, as in ``make course``: notebook 03 trains the adapter that 04 continues.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def test_course_injects_overrides_and_starts_kernels_without_the_unencrypted_tcp_warning(tmp_path, capfd):
    """Overrides reach the parameters cell; ipykernel >= 7.3 warns per kernel started over plain TCP, so the
    course asks for encryption."""
    import nbformat
    import zmq

    if not zmq.has("curve"):
        pytest.skip("this pyzmq has no CurveZMQ: kernels cannot be encrypted here, so ipykernel may warn")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("preset = None\nwork_dir = None\noverrides = {}", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print('kernel', 40 + 2, 'k =', overrides.get('stage1.k'))")]
    path = tmp_path / "00_probe.ipynb"
    nbformat.write(nb, path)
    report = run_course("cpu-tiny", tmp_path / "run", notebooks=[path], overrides={"stage1.k": 3})
    assert report.notebooks[0].ok, report.notebooks[0].error
    assert "kernel 42 k = 3" in (tmp_path / "run" / path.name).read_text()  # the overrides reached the notebook
    assert "preset 'cpu-tiny' with stage1.k=3: OK" in report.summary()
    assert "without encryption" not in capfd.readouterr().err


def test_a_relative_out_dir_and_a_renamed_preset_reach_the_notebooks(tmp_path, monkeypatch):
    """Kernels run in the notebooks' folder: a relative out_dir sent them writing under it while the summary named
    another (empty) folder; and a renamed preset (--set name=mine) reached the notebooks as a preset name that
    resolve_preset does not know (found by a CLI audit)."""
    import nbformat

    nb_dir, caller = tmp_path / "nbs", tmp_path / "caller"
    nb_dir.mkdir()
    caller.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("preset = None\nwork_dir = None\noverrides = {}", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from pathlib import Path\nfrom mmrag_lite.config import resolve_preset\n"
                                          "Path(work_dir, 'marker.txt').write_text(resolve_preset(preset, **overrides).name)")]
    path = nb_dir / "00_probe.ipynb"
    nbformat.write(nb, path)
    monkeypatch.chdir(caller)
    report = run_course("cpu-tiny", "relout", notebooks=[path], overrides={"name": "mine"})
    assert report.notebooks[0].ok, report.notebooks[0].error
    assert (caller / "relout" / "work" / "marker.txt").read_text() == "mine"
    assert report.work_dir == caller / "relout" / "work" and not (nb_dir / "relout").exists()
    assert report.preset == "mine"


def test_a_failed_course_names_the_error_and_cell_lists_what_did_not_run_and_shows_no_stale_numbers(tmp_path, capsys):
    import nbformat

    def notebook(name: str, code: str) -> Path:
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                               "display_name": "Python 3"}})
        nb.cells = [nbformat.v4.new_code_cell("preset = None\nwork_dir = None\noverrides = {}",
                                              metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, tmp_path / name)
        return tmp_path / name

    paths = [notebook("00_ok.ipynb", "x = 1"), notebook("01_fail.ipynb", "raise ValueError('first line\\nsecond line')"),
             notebook("02_later.ipynb", "y = 2")]
    stale = tmp_path / "run" / "work" / "eval"
    stale.mkdir(parents=True)
    (stale / "results.md").write_text("| system | Retr-F1 |\n| an earlier run | 0.999 |\n")  # a reused run folder
    report = run_course("cpu-tiny", tmp_path / "run", notebooks=paths, verbose=True)
    summary = report.summary()
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert started == ["[1/3] 00_ok.ipynb ...", "[2/3] 01_fail.ipynb ..."]  # a line as each starts; 02 never did
    assert not report.ok and [nb.ok for nb in report.notebooks] == [True, False] and report.skipped == ["02_later.ipynb"]
    # both lines of the message, and the cell in the executed copy (papermill's injected parameters cell counts)
    assert re.search(r"ValueError: first line \| second line \(cell \[\d+\], index 2\)", summary)
    assert "02_later.ipynb" in summary and "not run" in summary
    assert "0.999" not in summary and f"traceback is in {tmp_path / 'run' / '01_fail.ipynb'}" in summary


def test_kernel_shutdown_sends_no_interrupt_but_a_real_interrupt_still_does(monkeypatch):
    """jupyter_client interrupts before every shutdown, which makes an idle ipykernel print "KeyboardInterrupt caught
    in kernel" into the course log now and then; the course's manager skips that one, and only that one."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    from mmrag_lite.course import _kernel_manager_class

    sent: list[str] = []

    async def record(self):
        sent.append("SIGINT")

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", record)
    km = _kernel_manager_class()()
    asyncio.run(km._async_interrupt_kernel())
    assert sent == ["SIGINT"]  # a running cell can still be interrupted
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())
    assert sent == ["SIGINT"]  # but not on the way out


def test_the_shutdown_path_itself_sends_no_interrupt(monkeypatch):
    """Drive jupyter_client's own shutdown with the kernel-side steps stubbed: it asks to shut down, sends no SIGINT."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    from mmrag_lite.course import _kernel_manager_class

    calls: list[str] = []

    async def step(name, *a, **k):
        calls.append(name)

    monkeypatch.setattr(AsyncKernelManager, "has_kernel", property(lambda self: True))
    monkeypatch.setattr(AsyncKernelManager, "_async_signal_kernel", lambda self, sig: step(f"signal {int(sig)}"))
    for name in ("_async_request_shutdown", "_async_finish_shutdown", "_async_cleanup_resources"):
        monkeypatch.setattr(AsyncKernelManager, name, lambda self, *a, _n=name, **k: step(_n))
    km = _kernel_manager_class()()
    km._owns_kernel = True
    km.kernel_spec  # noqa: B018 - resolved before the stubs matter (the interrupt reads its interrupt_mode)
    asyncio.run(km._async_shutdown_kernel())
    assert calls == ["_async_request_shutdown", "_async_finish_shutdown", "_async_cleanup_resources"]
