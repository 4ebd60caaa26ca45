"""Run the whole course headless: every numbered notebook in order, one shared run folder.

``make course`` and ``python -m mmrag_lite course`` call ``run_course``. Each notebook is executed with
papermill, which injects ``preset`` and ``work_dir`` into the notebook's ``parameters`` cell, so CI runs the very
notebooks a student opens. The executed copies land in ``runs/course-<time>/`` next to the run's artefacts, and
the summary is read back from those artefacts (funnel, reward logs, results table), not from notebook output.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    PRESETS,
    Preset,
    auto_preset_name,
    env_path,
    preset_overrides,
    project_root,
    resolve_preset,
    runs_dir,
)


def _kernel_manager_class() -> type:
    """nbclient's kernel manager, quieter: transport encryption where supported, and no interrupt at shutdown.

    * ipykernel >= 7.3 warns on every kernel start that runs over TCP unencrypted; encrypting (jupyter_client >= 8.9,
      pyzmq with curve) silences that noise in ``make course`` and is the safer default anyway. Stacks without
      those pieces run unencrypted as before.
    * jupyter_client sends SIGINT before every shutdown request, so that a busy kernel can take it; a finished
      notebook's kernel is idle, and the signal only makes ipykernel print "KeyboardInterrupt caught in kernel"
      now and then. A kernel that does not exit still gets SIGTERM, then SIGKILL (``shutdown_wait_time``).
    """
    import zmq
    from jupyter_client.manager import AsyncKernelManager

    encrypt = zmq.has("curve") and bool(AsyncKernelManager.class_traits().get("transport_encryption"))

    class CourseKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)
            if encrypt:
                self.transport_encryption = "auto"  # provisions keys only when the kernelspec declares support

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return CourseKernelManager


def notebooks_dir() -> Path:
    """The checkout's ``notebooks/`` next to this package, whatever ``MMRAG_HOME`` says (that moves data and runs,
    not the course); an installed package without a checkout looks under ``project_root()``."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    return here if here.is_dir() else project_root() / "notebooks"


COURSE_NOTEBOOK = re.compile(r"\d\d_[a-z0-9_]+\.ipynb")  # not Jupyter's "01_x-Copy1.ipynb" duplicates


def notebook_paths(folder: Path | None = None) -> list[Path]:
    """The numbered course notebooks (``NN_topic.ipynb``), in course order."""
    return sorted(p for p in (folder or notebooks_dir()).glob("[0-9][0-9]_*.ipynb") if COURSE_NOTEBOOK.fullmatch(p.name))


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ok: bool
    output: Path
    error: str = ""


@dataclass
class CourseReport:
    preset: str
    run_dir: Path
    work_dir: Path
    notebooks: list[NotebookRun] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # not run: an earlier notebook failed

    @property
    def ok(self) -> bool:
        return bool(self.notebooks) and all(nb.ok for nb in self.notebooks)

    @property
    def seconds(self) -> float:
        return sum(nb.seconds for nb in self.notebooks)

    def summary(self) -> str:
        """One screen: each notebook's status and time, then the headline numbers the run wrote to disk."""
        changed = f" with {', '.join(f'{k}={v}' for k, v in self.overrides.items())}" if self.overrides else ""
        lines = [f"mmrag-lite course, preset {self.preset!r}{changed}: {'OK' if self.ok else 'FAILED'} in {self.seconds:.0f} s"]
        lines += [
            f"  {'ok ' if nb.ok else 'ERR'} {nb.name:<36} {nb.seconds:6.1f} s" + (f"  {nb.error}" if nb.error else "")
            for nb in self.notebooks
        ]
        lines += [f"  --- {name:<36}  not run: an earlier notebook failed" for name in self.skipped]
        lines.append(f"executed notebooks: {self.run_dir}")
        lines.append(f"artefacts (data, adapters, reports): {self.work_dir}")
        if self.ok:
            lines += headline_numbers(self.work_dir)
        else:  # a reused folder still holds an earlier run's files: never show them as this run's numbers
            failed = next(nb for nb in self.notebooks if not nb.ok)
            lines.append(f"no headline numbers: the run failed; the traceback is in {failed.output}")
        return "\n".join(lines)


def reward_lines(work_dir: Path, stage: int) -> list[str]:
    """A stage's sampled reward, first vs last steps, and which component moved it: a teacher reading "1.00 -> 1.52"
    should see at once that it was the format. A fall says where the notebook explains how to read one."""
    from .training import REWARD_WINDOW_FRACTION, component_trends, load_log_history, reward_trend

    history = load_log_history(work_dir, stage)
    first, last = reward_trend(history)
    if first is None or last is None:
        return []
    share = f"{REWARD_WINDOW_FRACTION:.0%}"
    head = (f"stage{stage} GRPO: mean reward {first:.3f} (first {share} of steps) -> {last:.3f} (last {share}) "
            f"over {len(history)} log rows")
    lines = [head]
    parts = [f"{name} {a:.3f} -> {b:.3f}" for name, (a, b) in component_trends(history).items() if name != "total"]
    if parts:
        lines.append("    by component: " + ", ".join(parts))
    if last < first:
        lines.append(f"    it fell: one short sampled run can; notebook 0{stage + 2}, section 5, says how to read the "
                     "curves (and which component fell) before suspecting a bug")
    return lines


LOSSY_STEP_SHARE = 0.5  # a filter step that removes more than this share of what reaches it gets a warning line


def funnel_lines(work_dir: Path) -> list[str]:
    """The run's Mini-WebQA funnel, one line per filter step, with a warning under a step that removed most of what
    reached it (a truncated imgs.tsv or a wrong folder looks like that, not like cleaning)."""
    funnel = work_dir / "mini_webqa" / "funnel.json"
    if not funnel.is_file():
        return []
    try:
        steps = json.loads(funnel.read_text())["steps"]
        lines = [f"Mini-WebQA funnel: {steps[0]['before']} questions in -> {steps[-1]['kept']} kept"]
        for st in steps:
            lines.append(f"    {st['name']:<28} removed {st['removed']:>5}, kept {st['kept']}")
            if st["before"] and st["removed"] > LOSSY_STEP_SHARE * st["before"]:
                lines.append(f"    WARNING: {st['name']} removed {st['removed']} of {st['before']} questions: check the "
                             "source files (truncated imgs.tsv? wrong folder?) before training on what is left")
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return [f"Mini-WebQA funnel: unreadable ({funnel})"]
    return lines


def headline_numbers(work_dir: Path) -> list[str]:
    """What a teacher wants to see at a glance, read from the run folder (see docs/CONTRACTS.md)."""
    lines = funnel_lines(work_dir)
    for stage in (1, 2):
        lines += reward_lines(work_dir, stage)
    results = work_dir / "eval" / "results.md"
    if results.is_file():
        lines.append(f"evaluation ({results}; its notes say what the numbers can mean, e.g. a miniature's):")
        lines += ["    " + row for row in results.read_text().strip().splitlines()[:14]]
    return lines


MINIATURE_CELL_TIMEOUT_S = 900  # cpu-tiny's slowest cell takes ~2 minutes: 15 is a hung kernel, not a slow one


def run_course(
    preset: str | Preset = "cpu-tiny",
    out_dir: str | Path | None = None,
    notebooks: Sequence[Path] | None = None,
    *,
    timeout_per_cell: int | None = None,
    stop_on_error: bool = True,
    extra_parameters: dict | None = None,
    overrides: Mapping[str, Any] | None = None,
    verbose: bool = False,
) -> CourseReport:
    """Execute the course notebooks in order with ``preset`` (and dotted ``overrides`` of it) injected; return the
    report. A notebook failure never raises: the report says which notebook failed and why. Bad overrides raise
    ``ConfigError``, and a preset this machine cannot run (a GPU preset without a GPU) ``modeling.ModelLoadError``,
    before any notebook starts. ``verbose`` prints a line as each notebook starts: a course takes minutes.
    ``timeout_per_cell`` stops a cell after that many seconds (0: never); by default 900 s on the miniature (a stuck
    cell, not a slow one) and never on a hub model, whose training cell runs for hours (300 steps of ~60 s)."""
    try:
        import papermill as pm
    except ModuleNotFoundError as exc:  # the notebooks extra is not installed
        raise ModuleNotFoundError(f"{exc}: the course runs its notebooks with papermill; install the notebooks extra "
                                  "(pip install -e '.[notebooks]', or `make course`, which installs it)") from None

    from .modeling import check_device

    overrides = dict(overrides or {})
    # fail here, naming the field (or the GPU that fits no preset), not inside notebook 01's third cell; "auto" is
    # resolved once, so every notebook and the summary name the preset that ran
    resolved = resolve_preset(preset, **overrides)
    check_device(resolved)  # not after notebooks 01-02 have run, inside 03's model loading
    if timeout_per_cell is None:
        timeout_per_cell = MINIATURE_CELL_TIMEOUT_S if resolved.model.is_miniature else 0
    # the notebooks get the base preset's name and the overrides (a "name" override among them renames it there);
    # a Preset object travels as the overrides that make it from a named preset, or its changes would be lost
    if isinstance(preset, Preset):
        base = preset.name if preset.name in PRESETS else "cpu-tiny"
        overrides = preset_overrides(PRESETS[base], resolved)
    else:
        base = auto_preset_name() if preset == "auto" else preset
    for name in ("MMRAG_HOME", "MMRAG_SHARED_DATA"):  # the kernels run in notebooks/: relative paths would move
        if (path := env_path(name)) is not None:
            os.environ[name] = str(path)
    paths = list(notebooks) if notebooks is not None else notebook_paths()
    if not paths:
        raise FileNotFoundError(f"no course notebooks (NN_topic.ipynb) in {notebooks_dir()}: run the course from a "
                                "clone of the repository")
    # absolute: the kernels run in the notebooks' folder, where a relative path would point somewhere else
    run_dir = (Path(out_dir) if out_dir else runs_dir() / time.strftime("course-%Y%m%d-%H%M%S")).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"the course's output folder {run_dir} is a file: pass another --out-dir")
    work = run_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = CourseReport(preset=resolved.name, run_dir=run_dir, work_dir=work, overrides=overrides)
    for i, path in enumerate(paths):
        output = run_dir / path.name
        start = time.perf_counter()
        if verbose:
            print(f"[{i + 1}/{len(paths)}] {path.name} ...", flush=True)
        try:
            pm.execute_notebook(
                str(path),
                str(output),
                parameters={"preset": base, "work_dir": str(work), "overrides": overrides, **(extra_parameters or {})},
                cwd=str(path.parent),
                kernel_name="python3",
                execution_timeout=timeout_per_cell or None,  # None: no limit
                progress_bar=False,
                kernel_manager_class=_kernel_manager_class(),
            )
            report.notebooks.append(NotebookRun(path.name, time.perf_counter() - start, True, output))
        except Exception as exc:  # noqa: BLE001 - any failure (cell error, dead kernel, timeout) is reported, not raised
            report.notebooks.append(
                NotebookRun(path.name, time.perf_counter() - start, False, output, error=describe_failure(exc)))
            if stop_on_error:
                report.skipped = [p.name for p in paths[i + 1:]]
                break
    return report


def describe_failure(exc: BaseException, limit: int = 400) -> str:
    """One line for the summary: the error's type and message (every line of it, joined) and, for a cell error, which
    cell; the executed notebook holds the full traceback."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        where = f" (cell [{exc.exec_count}], index {exc.cell_index})"
        what = f"{exc.ename}: {exc.evalue}"
    else:
        where, what = "", f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in str(what).strip().splitlines() if line.strip()]
    text = " | ".join(lines) or repr(exc)
    return (text if len(text) <= limit else text[: limit - 3] + "...") + where
