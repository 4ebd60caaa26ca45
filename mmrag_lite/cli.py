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
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmrag_lite.config import PRESETS, ConfigError, Preset
from mmrag_lite.data import SPLITS


class CLIError(Exception):
    """A user error with a message that says what to do; printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------ options
def parse_override(text: str) -> tuple[str, Any]:
    """``"stage1.grpo.max_steps=5"`` → ``("stage1.grpo.max_steps", 5)``; the value is a YAML scalar or list."""
    import yaml

    if "=" not in text:
        raise CLIError(f"--set expects key=value (e.g. --set stage1.grpo.max_steps=5), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CLIError(f"--set: bad key {key!r} in {text!r} (dotted path like stage1.k)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise CLIError(f"--set {key}: cannot read value {raw!r}: {exc}") from None
    if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string; a learning rate is a number
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


def resolve(args: argparse.Namespace) -> tuple[Preset, Path]:
    """The preset with overrides applied, and the run folder (created)."""
    from mmrag_lite.config import resolve_preset, work_dir

    try:
        preset = resolve_preset(args.preset, **overrides_of(args))
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    return preset, work_dir(preset, args.work_dir)


# ------------------------------------------------------------------------------------------ commands
def cmd_build_data(args: argparse.Namespace) -> int:
    from mmrag_lite import data

    preset, wd = resolve(args)
    ds = data.ensure_mini_webqa(preset, wd)
    sizes = {name: len(split) for name, split in ds.items()}
    print(f"Mini-WebQA ({preset.name}) in {wd / 'mini_webqa'}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return 0


def _stage1_adapter(wd: Path) -> Path | None:
    path = wd / "stage1" / "adapter"
    return path if path.exists() else None


def cmd_train_stage1(args: argparse.Namespace) -> int:
    from mmrag_lite import data, modeling, pipeline, scoring, training

    preset, wd = resolve(args)
    ds = data.ensure_mini_webqa(preset, wd)
    dataset = training.build_stage1_dataset(ds["train"], preset, seed=preset.seed)
    result = training.train_stage1(preset, dataset, wd, resume=args.resume)
    adapter = _stage1_adapter(wd)
    print(f"stage 1 trained: adapter {adapter}")
    if args.no_score or adapter is None or not training.is_main_process():  # one process scores, not every GPU
        return 0
    model, processor = modeling.load_model_and_processor(preset, adapter_path=adapter, for_training=False)
    for split in args.score_splits:
        scored = scoring.score_split(model, processor, ds[split], preset)
        path = pipeline.save_stage1_scores(scored, preset, wd, split, adapter)
        print(f"stage-1 scores for {split}: {path}")
    del result
    return 0


def cmd_train_stage2(args: argparse.Namespace) -> int:
    from mmrag_lite import data, training

    preset, wd = resolve(args)
    ds = data.ensure_mini_webqa(preset, wd)
    dataset, build_report = training.stage2_dataset_for_run(preset, wd, ds["train"])
    print(build_report)
    init = Path(args.init_adapter) if args.init_adapter else None  # None: train_stage2 follows stage2.init_from
    if init is not None and not init.exists():
        raise CLIError(f"--init-adapter {init} does not exist")
    training.train_stage2(preset, dataset, wd, init_adapter=init, resume=args.resume)
    print(f"stage 2 trained: adapter {wd / 'stage2' / 'adapter'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmrag_lite import evaluation
    from mmrag_lite.pipeline import ModelBank

    preset, wd = resolve(args)
    adapters = {"stage1": args.stage1_adapter} if args.stage1_adapter else None
    bank = ModelBank(preset, wd, adapters=adapters)
    report = evaluation.evaluate(preset, wd, split=args.split, n_questions=args.questions, mmqa=not args.no_mmqa,
                                 ablations=not args.no_ablations, robustness=not args.no_robustness, bank=bank,
                                 progress=not args.quiet)
    print(report.markdown())
    print(f"written to {wd / 'eval'}")
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    from mmrag_lite import course

    try:
        report = course.run_course(preset=args.preset, out_dir=args.out_dir, overrides=overrides_of(args))
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    print(report.summary() if hasattr(report, "summary") else json.dumps(report, indent=2, default=str))
    return 0 if getattr(report, "ok", True) else 1


# ------------------------------------------------------------------------------------------ parser
def _preset_name(value: str) -> str:
    if value != "auto" and value not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {value!r}; choose one of: auto, {', '.join(sorted(PRESETS))}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", type=_preset_name, default="auto", help="hardware preset: auto, " + ", ".join(sorted(PRESETS)))
    p.add_argument("--work-dir", default=None, help="run folder (default runs/<preset>)")
    _add_set_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmrag_lite", description="mmrag-lite: build data, train stage 1 / stage 2, evaluate, or run the whole course headless.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("build-data", help="build Mini-WebQA (synthetic world on cpu-tiny) into the run folder")
    _common(p)
    p.set_defaults(func=cmd_build_data)

    p = sub.add_parser("train-stage1", help="stage-1 point-wise GRPO, then score the splits with the new judge")
    _common(p)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in the run folder")
    p.add_argument("--no-score", action="store_true", help="skip writing stage1/scores_<split>.json")
    p.add_argument("--score-splits", nargs="+", default=["train", "test"], choices=SPLITS,
                   help="splits to score (default: train test)")
    p.set_defaults(func=cmd_train_stage1)

    p = sub.add_parser("train-stage2", help="stage-2 list-wise GRPO over the stage-1 top-k")
    _common(p)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-adapter", default=None, help="start from this adapter (default: <work-dir>/stage1/adapter when stage2.init_from=stage1, else the base model)")
    p.set_defaults(func=cmd_train_stage2)

    p = sub.add_parser("evaluate", help="systems x metrics table, ablations, robustness -> <work-dir>/eval/")
    _common(p)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--questions", type=int, default=None, help="questions to evaluate (default preset.evaluation.questions)")
    p.add_argument("--stage1-adapter", default=None, help="stage-1 adapter (default <work-dir>/stage1/adapter)")
    p.add_argument("--no-mmqa", action="store_true", help="skip the MultimodalQA columns")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-robustness", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("course", help="run every course notebook headless (papermill) and print a summary")
    p.add_argument("--preset", type=_preset_name, default="cpu-tiny")
    p.add_argument("--out-dir", default=None, help="where executed notebooks and the run folder go")
    _add_set_option(p, "; passed to every notebook (--set evaluation.retrain_ablations=false saves time on a slow machine)")
    p.set_defaults(func=cmd_course)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except CLIError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
