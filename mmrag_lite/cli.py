"""``python -m mmrag_lite``: everything a notebook does, for scripts, CI and multi-GPU runs.

Each subcommand calls the same functions as the notebooks (nothing here is logic of its own):

    build-data     data.ensure_mini_webqa                         (notebook 01)
    train-stage1   training.train_stage1 + scoring.score_split    (notebook 03)
    train-stage2   training.build_stage2_dataset + train_stage2   (notebook 04)
    evaluate       evaluation.evaluate                            (notebook 05)
    course         course.run_course: every notebook, headless

Common options: ``--preset`` (``auto`` picks by hardware), ``--work-dir`` (default ``runs/<preset>``) and repeated
``--set key=value`` dotted overrides of the preset (``--set stage1.grpo.max_steps=5 --set stage1.k=3``); values are
read as YAML scalars, so ``5`` is an int, ``2e-3`` a float, ``true`` a bool. Under ``accelerate launch`` the
training subcommands run data-parallel (see docs/multi-gpu.md).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrag_lite.config import PRESETS, ConfigError, Preset
from mmrag_lite.data import SPLITS

if TYPE_CHECKING:
    from datasets import DatasetDict


class CLIError(Exception):
    """A user error with a message that says what to do; printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------ options
_QUOTED = re.compile(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"")
# YAML 1.1's base-60 integers and floats (1:30, 1:30.5), alone or as an item of a list or mapping
_SEXAGESIMAL = re.compile(r"(?<![\w.:])[+-]?(?:[1-9][0-9_]*(?::[0-5]?[0-9])+|[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*)(?![\w:])")


def parse_override(text: str) -> tuple[str, Any]:
    """``"stage1.grpo.max_steps=5"`` → ``("stage1.grpo.max_steps", 5)``; the value is a YAML scalar or list."""
    import yaml

    if "=" not in text:
        raise CLIError(f"--set expects key=value (e.g. --set stage1.grpo.max_steps=5), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CLIError(f"--set: bad key {key!r} in {text!r} (dotted path like stage1.k)")
    if re.fullmatch(r"[+-]?0\d+", raw.strip()):  # YAML 1.1 reads 010 as octal 8 (and 08 as the float 8.0)
        return key, int(raw.strip(), 10)
    quoted = raw.strip()[:1] in ("'", '"')
    bare = _QUOTED.sub(" ", raw)  # what YAML reads outside quotes
    if re.search(r"(^|\s)#", bare):  # YAML would drop the rest as a comment
        raise CLIError(f"--set {key}: {raw.strip()!r} holds ' #' outside quotes, which YAML reads as a comment: put "
                       "the text that holds it in quotes, e.g. --set 'description=\"run #2\"' or ['run #2', b]")
    if _SEXAGESIMAL.search(bare):  # YAML 1.1 reads 1:30 as the number 90
        raise CLIError(f"--set {key}: {raw.strip()!r} holds a number YAML reads in base 60 (1:30 is 90): quote it")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:  # one line, not YAML's multi-line report with a caret under the column
        why = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise CLIError(f"--set {key}: cannot read value {raw!r} ({why}); lists look like [1, 2]") from None
    if isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items()):
        # YAML reads {format:1.0} as the key "format:1.0" with no value: a colon needs a space after it
        raise CLIError(f"--set {key}: write a space after each colon in {raw.strip()!r}, "
                       f"e.g. --set '{key}={{format: 1.0, relevance: 3.0}}'")
    if isinstance(value, str) and not quoted:  # YAML 1.1 reads "2e-3" as a string; a learning rate is a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key, value


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` options as ``{dotted key: value}``."""
    return dict(parse_override(s) for s in (args.set or []))


def _add_set_option(p: argparse.ArgumentParser, help_example: str = "") -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help=f"dotted preset override, repeatable (e.g. --set stage1.grpo.max_steps=5){help_example}")


def resolve(args: argparse.Namespace, *, existing: str | None = None, needs_device: bool = False,
            for_training: bool = True) -> tuple[Preset, Path]:
    """The preset with overrides applied, and the run folder (created; with ``existing``, the commands that make it,
    it must already exist).

    ``needs_device``: refuse a GPU preset without a GPU (or bf16 on a T4) first, so a refused command leaves no
    empty run folder behind and builds or overwrites no data; ``for_training=False`` (evaluate) skips the checks only
    TRL's trainer needs (``modeling.check_device``).
    """
    from mmrag_lite.config import resolve_preset, runs_dir, work_dir

    try:
        preset = resolve_preset(args.preset, **overrides_of(args))
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    folder = Path(args.work_dir) if args.work_dir else runs_dir() / preset.name
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--work-dir {folder} is a file, not a run folder: pass a folder")
    if needs_device:  # first: a GPU preset on a CPU machine is refused for that, not sent to run an earlier step
        from mmrag_lite import modeling

        modeling.check_device(preset, for_training=for_training)
    if existing and not folder.is_dir():
        raise CLIError(f"no run folder at {folder}: run {existing} first (same --preset / --work-dir), or pass the "
                       "--work-dir of an existing run")
    # a mistyped folder (or one without imgs.tsv + imgs.lineidx) fails here: before the run folder is created, and
    # before run_data's cache check could blame the settings of a Mini-WebQA already there
    if getattr(args, "webqa_dir", None) is not None:
        from mmrag_lite import data

        data.check_webqa_source(args.webqa_dir)  # the question file, and the images beside it
    return preset, work_dir(preset, args.work_dir)


def run_data(args: argparse.Namespace, preset: Preset, wd: Path) -> DatasetDict:
    """The run's Mini-WebQA, as notebook 01 builds it, with two guards a script needs.

    * A run folder whose Mini-WebQA was built with other settings (another preset's folder, say) is refused, not
      silently rebuilt over the top (``--rebuild`` allows it).
    * Under ``accelerate launch`` the main process builds first and the others then load what it wrote (several
      processes building one folder at once race on the atomic rename).
    """
    from mmrag_lite import data, training

    webqa_dir = getattr(args, "webqa_dir", None)
    rebuild = bool(getattr(args, "rebuild", False))  # (a mistyped --webqa-dir was already named by ``resolve``)
    if (stale := data.mini_webqa_staleness(preset, wd, webqa_dir)) and not rebuild:
        fix = ("--rebuild to replace it" if hasattr(args, "rebuild") else
               f"rebuild it first (build-data --rebuild with the same --preset and --work-dir {wd})")
        raise CLIError(f"{wd / 'mini_webqa'} is not what preset {preset.name!r}"
                       + (f" would build from {webqa_dir}" if webqa_dir else " would build") + f" ({'; '.join(stale)}): "
                       f"pass the preset (and --set overrides) it was built with, another --work-dir, or {fix}")
    with _main_process_first():  # --rebuild: the main process rebuilds; the others then load what it wrote
        return data.ensure_mini_webqa(preset, wd, webqa_dir=webqa_dir, force=rebuild and training.is_main_process())


# How long the other GPUs may wait at a barrier while the main process builds data or re-scores the stage-1 pools:
# `a100`'s train pools, ~11 minutes on an H100 at its measured scoring speed (benchmarks/RESULTS.md), slower cards several times that,
# and NCCL's default (10 minutes) would kill the job. Only the first PartialState sets it: these helpers come first.
DISTRIBUTED_WAIT = timedelta(hours=3)


def _main_process_first():
    """``accelerate``'s main-process-first context when launched data-parallel, else nothing to wait for."""
    import contextlib
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState(timeout=DISTRIBUTED_WAIT).main_process_first()


# ------------------------------------------------------------------------------------------ commands
def cmd_build_data(args: argparse.Namespace) -> int:
    from mmrag_lite.course import funnel_lines

    preset, wd = resolve(args)
    ds = run_data(args, preset, wd)
    sizes = {name: len(split) for name, split in ds.items()}
    print(f"Mini-WebQA ({preset.name}) in {wd / 'mini_webqa'}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    print("\n".join(funnel_lines(wd)))
    for warning in _funnel_warnings(wd):  # e.g. a question file that ends mid-record: the counts alone hide it
        print(f"WARNING: {warning}")
    return 0


def _funnel_warnings(wd: Path) -> list[str]:
    """``FunnelReport.warnings`` of the run's Mini-WebQA (none for a funnel.json from before they were recorded)."""
    from mmrag_lite.data import FunnelReport

    try:
        return list(FunnelReport.load(wd / "mini_webqa").warnings)
    except (OSError, ValueError, TypeError):
        return []


def _stage1_adapter(wd: Path) -> Path | None:
    from mmrag_lite.training import is_adapter_dir

    path = wd / "stage1" / "adapter"
    return path if is_adapter_dir(path) else None


def cmd_train_stage1(args: argparse.Namespace) -> int:
    from mmrag_lite import pipeline, scoring, training

    preset, wd = resolve(args, needs_device=True)
    ds = run_data(args, preset, wd)
    dataset = training.build_stage1_dataset(ds["train"], preset, seed=preset.seed)
    result = training.train_stage1(preset, dataset, wd, resume=args.resume)
    adapter = _stage1_adapter(wd)
    print(f"stage 1 adapter: {adapter}")
    if args.no_score or adapter is None or not training.is_main_process():  # one process scores, not every GPU
        return 0
    for split in args.score_splits:  # the trained model scores, as in notebook 03 (no second copy in memory)
        scored = scoring.score_split(result.model, result.processor, ds[split], preset,
                                     max_questions=scoring.questions_to_score(preset, split))
        path = pipeline.save_stage1_scores(scored, preset, wd, split, adapter)
        print(f"stage-1 scores for {split}: {path}")
    return 0


def cmd_train_stage2(args: argparse.Namespace) -> int:
    from mmrag_lite import pipeline, training

    init = Path(args.init_adapter) if args.init_adapter else None  # None: train_stage2 follows stage2.init_from
    if init is not None and not training.is_adapter_dir(init):  # checked before any folder, data or scoring
        raise CLIError(f"--init-adapter {init} holds no adapter_config.json (a PEFT adapter folder, e.g. "
                       "<work-dir>/stage1/adapter)")
    preset, wd = resolve(args, existing="train-stage1", needs_device=True)  # stage 2 continues a stage-1 run
    if _stage1_adapter(wd) is None:  # before the run's data is built or checked: that can take minutes
        raise CLIError(f"no stage-1 adapter in {wd / 'stage1'}: stage-2 pools are the stage-1 top-k, so run "
                       "train-stage1 first (with the same --preset / --work-dir)")
    ds = run_data(args, preset, wd)
    bank = pipeline.ModelBank(preset, wd)
    with _main_process_first():  # the main process re-scores when needed; the others then read what it wrote
        if training.is_main_process():  # missing, another judge's, or too few questions: scored again
            pipeline.ensure_stage1_scores(bank, ds["train"], "train")
    bank.unload()  # the 4-bit judge leaves the GPU: it is not needed while stage 2 trains
    dataset, build_report = training.stage2_dataset_for_run(preset, wd, ds["train"])
    print(build_report)
    training.train_stage2(preset, dataset, wd, init_adapter=init, resume=args.resume)
    print(f"stage 2 adapter: {wd / 'stage2' / 'adapter'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmrag_lite import evaluation
    from mmrag_lite.pipeline import ModelBank
    from mmrag_lite.training import is_adapter_dir

    preset, wd = resolve(args, existing="train-stage1 and train-stage2", needs_device=True, for_training=False)
    if args.retrained_ablations_only and args.no_ablations:
        raise CLIError("--retrained-ablations-only runs an ablation table; --no-ablations skips them: choose one")
    if args.retrained_ablations_only or (preset.evaluation.retrain_ablations and not args.no_ablations):  # it trains
        from mmrag_lite import modeling

        modeling.check_device(preset)
    if args.stage1_adapter and not is_adapter_dir(args.stage1_adapter):
        raise CLIError(f"--stage1-adapter {args.stage1_adapter} holds no adapter_config.json (a PEFT adapter folder)")
    if not (args.stage1_adapter or is_adapter_dir(wd / "stage1" / "adapter")) and not args.allow_untrained:
        raise CLIError(f"no stage-1 adapter in {wd / 'stage1'}: every system but zero-shot would silently use the base "
                       "model. Run train-stage1 and train-stage2 first (same --preset / --work-dir), pass "
                       "--stage1-adapter, or --allow-untrained to evaluate the untrained base model on purpose")
    run_data(args, preset, wd)  # refuses a run folder built with other settings instead of rebuilding it
    if args.retrained_ablations_only:  # merged into the saved report: nothing else runs again or is overwritten
        report = evaluation.add_retrained_ablations(preset, wd, split=args.split, progress=not args.quiet)
        print(evaluation.markdown_table(report.ablations[evaluation.RETRAINED_ABLATION_TITLE]))
        print(f"merged into {wd / 'eval' / 'results.json'} and results.md (every other section kept)")
        return 0
    adapters = {"stage1": args.stage1_adapter} if args.stage1_adapter else None
    # --allow-untrained: a hub model's missing adapters fall back to the base model too (labelled in the table)
    bank = ModelBank(preset, wd, adapters=adapters, allow_missing_adapters=True if args.allow_untrained else None)
    report = evaluation.evaluate(preset, wd, split=args.split, n_questions=args.questions, mmqa=not args.no_mmqa,
                                 ablations=not args.no_ablations, robustness=not args.no_robustness, bank=bank,
                                 progress=not args.quiet)
    print(report.markdown())
    print(f"written to {wd / 'eval'}")
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    from mmrag_lite import course

    try:
        report = course.run_course(preset=args.preset, out_dir=args.out_dir, overrides=overrides_of(args), verbose=True,
                                   timeout_per_cell=args.timeout_per_cell)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    print(report.summary())
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------------ parser
def _preset_name(value: str) -> str:
    if value != "auto" and value not in PRESETS:
        close = difflib.get_close_matches(value.replace("_", "-").lower(), ["auto", *PRESETS], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise argparse.ArgumentTypeError(f"unknown preset {value!r}; {hint}choose one of: auto, {', '.join(sorted(PRESETS))}")
    return value


def _common(p: argparse.ArgumentParser, *, data_options: bool = True) -> None:
    p.add_argument("--preset", type=_preset_name, default="auto",
                   help="hardware preset (default: auto, which picks by this machine's GPU): " + ", ".join(sorted(PRESETS)))
    p.add_argument("--work-dir", default=None, help="run folder (default: runs/<preset> in the repository, or under "
                   "$MMRAG_HOME when set; a relative path is taken from the current folder)")
    _add_set_option(p)
    if data_options:
        p.add_argument("--webqa-dir", default=None, help="folder with the real WebQA_train_val.json + imgs.tsv + "
                       "imgs.lineidx (default: the synthetic world, or the Mini-WebQA already in the run folder)")
        p.add_argument("--rebuild", action="store_true", help="rebuild the run folder's Mini-WebQA (and its synthetic "
                       "world) even when it looks current; without it, one built with other settings is refused")


RESUME_HELP = ("resume from the last checkpoint in the run folder (an interrupted run with the same settings; a "
               "changed setting is named in a warning)")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _subcommand(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` page opens with the line ``python -m mmrag_lite --help`` shows for it."""
    return sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmrag_lite", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subcommand(sub, "build-data", "build Mini-WebQA into the run folder (from --webqa-dir, else a synthetic "
                                          "world in the real layout)")
    _common(p)
    p.set_defaults(func=cmd_build_data)

    p = _subcommand(sub, "train-stage1", "stage-1 point-wise GRPO, then score the splits with the new judge")
    _common(p)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--no-score", action="store_true", help="skip writing stage1/scores_<split>.json")
    p.add_argument("--score-splits", nargs="+", default=["train", "test"], choices=SPLITS,
                   help="splits to score (default: train test)")
    p.set_defaults(func=cmd_train_stage1)

    p = _subcommand(sub, "train-stage2", "stage-2 list-wise GRPO over the stage-1 top-k")
    _common(p)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--init-adapter", default=None, help="start from this adapter (default: <work-dir>/stage1/adapter when stage2.init_from=stage1, else the base model)")
    p.set_defaults(func=cmd_train_stage2)

    p = _subcommand(sub, "evaluate", "systems x metrics table, ablations, robustness -> <work-dir>/eval/")
    _common(p, data_options=False)
    p.add_argument("--split", default="test", choices=SPLITS, help="Mini-WebQA split to evaluate (default: test)")
    p.add_argument("--questions", type=_positive_int, default=None,
                   help="questions to evaluate (default preset.evaluation.questions)")
    p.add_argument("--stage1-adapter", default=None, help="stage-1 adapter (default <work-dir>/stage1/adapter)")
    p.add_argument("--no-mmqa", action="store_true", help="skip the MultimodalQA columns")
    p.add_argument("--no-ablations", action="store_true", help="skip the ablation tables: k and reasoning at inference, "
                   "and stage 2 retrained without the ranking reward, without the answer reward and with reasoning "
                   "flipped (retrained only with evaluation.retrain_ablations, on by default only on cpu-tiny)")
    p.add_argument("--no-robustness", action="store_true", help="skip the conflicting/misleading-distractor check")
    p.add_argument("--retrained-ablations-only", action="store_true",
                   help="only retrain stage 2 per ablation variant and merge that table into the saved "
                        "<work-dir>/eval/results.json and results.md (the full system's saved predictions are the "
                        "baseline; every other section, submission and predictions file is kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--allow-untrained", action="store_true", help="evaluate even without the stage-1 or stage-2 "
                   "adapter (systems that need a missing one use the base model, labelled so; a baseline, not the "
                   "method)")
    p.set_defaults(func=cmd_evaluate)

    p = _subcommand(sub, "course", "run every course notebook headless (papermill) and print a summary")
    p.add_argument("--preset", type=_preset_name, default="cpu-tiny",
                   help="hardware preset (default cpu-tiny: the course's offline miniature, minutes on a CPU)")
    p.add_argument("--out-dir", default=None, help="where executed notebooks and the run folder go (default: "
                   "runs/course-<date>-<time>)")
    _add_set_option(p, "; passed to every notebook (--set evaluation.retrain_ablations=false saves time on a slow machine)")
    p.add_argument("--timeout-per-cell", type=int, default=None, metavar="SECONDS",
                   help="stop a cell after this long, 0 for never (default: 900 s on cpu-tiny; never on a GPU preset, "
                        "whose training cells run for hours)")
    p.set_defaults(func=cmd_course)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what to do: printed without a traceback. The model-side ones are looked up
    only when their module was imported (importing it here would load torch for ``--help``)."""
    # the file errors and the data builder's refusals: raised naming the path and what to do
    from mmrag_lite.data import MiniWebQABuildError, WebQAFormatError

    errors: list[type[BaseException]] = [CLIError, ConfigError, FileNotFoundError, NotADirectoryError,
                                         FileExistsError, PermissionError, ModuleNotFoundError,  # a missing extra
                                         MiniWebQABuildError, WebQAFormatError]
    for module, name in (("mmrag_lite.modeling", "ModelLoadError"), ("mmrag_lite.pipeline", "AdapterBaseMismatch")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
