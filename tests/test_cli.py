"""The CLI parses, errors clearly, and its cheap subcommands really run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmrag_lite import cli


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "mmrag_lite", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("build-data", "train-stage1", "train-stage2", "evaluate", "course"):
        assert name in out


@pytest.mark.parametrize("command", ["build-data", "train-stage1", "train-stage2", "evaluate", "course"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--preset" in out
    assert out.split("\n\n")[1].strip().endswith(".")  # the subcommand's own description, not just its usage


def test_unknown_preset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["build-data", "--preset", "tpu-huge"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown preset 'tpu-huge'" in err and "cpu-tiny" in err and "did you mean" not in err
    with pytest.raises(SystemExit):
        cli.main(["build-data", "--preset", "cpu_tiny"])
    assert "unknown preset 'cpu_tiny'; did you mean 'cpu-tiny'?" in capsys.readouterr().err


def test_a_gpu_preset_on_a_cpu_machine_is_refused_for_that_before_asking_for_earlier_steps(tmp_path, monkeypatch,
                                                                                          capsys):
    """evaluate used to answer "run train-stage1 first", which then refused the preset: a loop for a CPU user."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["evaluate", "--preset", "colab-t4", "--work-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--preset cpu-tiny" in err and "run train-stage1" not in err


def test_an_underscored_set_key_names_the_dotted_one_in_command_line_form(tmp_path, capsys):
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "stage1_k=3"]) == 2
    assert "--set stage1.k=3" in capsys.readouterr().err


def test_missing_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


@pytest.mark.parametrize("text, expected", [
    ("stage1.grpo.max_steps=5", ("stage1.grpo.max_steps", 5)),
    ("stage1.grpo.learning_rate=2e-3", ("stage1.grpo.learning_rate", 2e-3)),
    ("stage2.reasoning=true", ("stage2.reasoning", True)),
    ("model.model_id=Qwen/Qwen2-VL-2B-Instruct", ("model.model_id", "Qwen/Qwen2-VL-2B-Instruct")),
    ("stage1.weights={format: 1, relevance: 3}", ("stage1.weights", {"format": 1, "relevance": 3})),
    ("seed=0042", ("seed", 42)),  # zero-padded (seq -w): decimal, not YAML 1.1's octal 34
    ("stage1.k=08", ("stage1.k", 8)),  # not the float 8.0 that YAML makes of an invalid octal
    ("seed=-010", ("seed", -10)),
    ("seed=0", ("seed", 0)),
])
def test_parse_override(text, expected):
    assert cli.parse_override(text) == expected
    assert type(cli.parse_override(text)[1]) is type(expected[1])  # 8, not 8.0 (which compares equal)


@pytest.mark.parametrize("bad", ["stage1.k", "=3", "stage1..k=3"])
def test_bad_override_syntax(bad):
    with pytest.raises(cli.CLIError, match="--set"):
        cli.parse_override(bad)


def test_a_mapping_without_spaces_after_its_colons_is_refused_with_the_fix():
    """YAML reads {format:1.0} as one key with no value, which the preset would only call "not a number"."""
    with pytest.raises(cli.CLIError, match="space after each colon"):
        cli.parse_override("stage1.weights={format:1.0,relevance:3.0}")


def test_bad_set_key_and_value_exit_2_with_message(tmp_path, capsys):
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "stage9.k=3"]) == 2
    assert "unknown config key 'stage9.k'" in capsys.readouterr().err
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "stage1.k=99"]) == 2
    assert "stage1.k" in capsys.readouterr().err  # validation says which field and why
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "nokey"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "stage1.k=abc"]) == 2
    assert "stage1.k must be a whole number" in capsys.readouterr().err  # not a TypeError traceback
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--set", "stage1.k=[1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read value '[1'" in err and len(err.splitlines()) == 1  # one line, not YAML's report


def test_overrides_reach_the_preset(tmp_path):
    args = cli.build_parser().parse_args(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path),
                                          "--set", "stage1.k=3", "--set", "stage2.grpo.max_steps=2"])
    preset, wd = cli.resolve(args)
    assert preset.stage1.k == 3 and preset.stage2.grpo.max_steps == 2 and wd == tmp_path


def test_a_bool_setting_reads_1_and_0_as_the_text_1_and_0_are_read(tmp_path):
    """YAML reads `--set stage1.reasoning=1` as the number 1, which was refused while the text "1" was accepted."""
    for raw, expected in (("1", True), ("0", False), ("'1'", True), ("true", True)):
        args = cli.build_parser().parse_args(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path),
                                              "--set", f"stage1.reasoning={raw}", "--set", f"stage2.reasoning={raw}"])
        preset, _ = cli.resolve(args)
        assert preset.stage1.reasoning is expected and preset.stage2.reasoning is expected
    for raw in ("2", "-1", "1.0"):  # no other number is a yes or a no
        args = cli.build_parser().parse_args(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path),
                                              "--set", f"stage1.reasoning={raw}"])
        with pytest.raises(cli.CLIError, match="stage1.reasoning must be true or false"):
            cli.resolve(args)


def test_build_data_runs_on_cpu_tiny(tmp_path, capsys):
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "test" in out and "Mini-WebQA funnel" in out and "WARNING" not in out
    assert (tmp_path / "mini_webqa").is_dir()


def test_a_filter_step_that_removes_most_questions_is_flagged(tmp_path):
    import json

    from mmrag_lite.course import funnel_lines

    steps = [{"name": "unreadable", "before": 400, "removed": 2, "kept": 398},
             {"name": "broken_gold_image", "before": 398, "removed": 258, "kept": 140}]  # a truncated imgs.tsv
    (tmp_path / "mini_webqa").mkdir()
    (tmp_path / "mini_webqa" / "funnel.json").write_text(json.dumps({"steps": steps}))
    lines = funnel_lines(tmp_path)
    assert lines[0] == "Mini-WebQA funnel: 400 questions in -> 140 kept"
    assert [line.split(":")[0].strip() for line in lines if "WARNING" in line] == ["WARNING"]
    assert "broken_gold_image removed 258 of 398" in lines[-1]


def test_paths_that_are_files_are_clear_errors(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(a_file)]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    assert cli.main(["course", "--out-dir", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"


def test_a_source_the_builder_refuses_is_a_one_line_error(tmp_path, capsys):
    test_only = tmp_path / "webqa"
    test_only.mkdir()
    (test_only / "WebQA_test.json").write_text("{}")
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "run"),
                     "--webqa-dir", str(test_only)]) == 2
    err = capsys.readouterr().err
    assert "needs WebQA_train_val.json" in err and "Traceback" not in err


def test_course_refuses_a_gpu_preset_without_a_gpu_before_any_notebook(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["course", "--preset", "colab-t4", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "cpu-tiny" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before notebook 01 ran (it used to fail in notebook 03)


def test_a_mistyped_webqa_dir_is_named_even_where_a_mini_webqa_exists(tmp_path, monkeypatch, capsys):
    from mmrag_lite import data

    # a run folder whose Mini-WebQA does not match the source asked for: the settings check would speak first
    monkeypatch.setattr(data, "mini_webqa_is_current", lambda *a, **k: False)
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "run"),
                     "--webqa-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no WebQA_train_val.json" in err and str(tmp_path / "nope") in err and "other settings" not in err


def test_course_finds_its_notebooks_wherever_mmrag_home_points(tmp_path, monkeypatch):
    from mmrag_lite import course

    monkeypatch.setenv("MMRAG_HOME", str(tmp_path))  # data and runs move; the course's notebooks do not
    assert [p.name[:3] for p in course.notebook_paths()] == ["01_", "02_", "03_", "04_", "05_"]
    with pytest.raises(FileNotFoundError, match="no course notebooks"):
        course.run_course(out_dir=tmp_path / "run", notebooks=[])


def test_run_course_hands_the_notebooks_a_preset_objects_changes_and_an_absolute_home(tmp_path, monkeypatch):
    import papermill

    from mmrag_lite import course
    from mmrag_lite.config import get_preset, resolve_preset

    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, out, parameters, **kw: seen.append(parameters))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMRAG_HOME", "home")  # relative: the kernels run in notebooks/, not here
    monkeypatch.setenv("MMRAG_SHARED_DATA", "shared")
    nb = course.notebook_paths()[:1]
    mine = get_preset("cpu-tiny", **{"stage1.k": 3, "stage1.grpo.max_steps": 2, "stage2.weights": {"format": 1.0, "answer": 2.0}})
    for preset in (mine, get_preset("cpu-tiny", name="my-run", seed=7)):
        course.run_course(preset, out_dir=tmp_path / "run", notebooks=nb, verbose=False)
        got = seen[-1]
        assert resolve_preset(got["preset"], **got["overrides"]) == preset  # nothing the object held is lost
    assert seen[0]["preset"] == "cpu-tiny" and seen[1]["overrides"]["name"] == "my-run"
    assert os.environ["MMRAG_HOME"] == str(tmp_path / "home")
    assert os.environ["MMRAG_SHARED_DATA"] == str(tmp_path / "shared")
    monkeypatch.setenv("MMRAG_HOME", "~/mmrag data")
    monkeypatch.setenv("HOME", str(tmp_path))
    from mmrag_lite.config import project_root

    assert project_root() == tmp_path / "mmrag data"  # no literal "~" folder
    from mmrag_lite.config import shared_data_dir

    (tmp_path / "shared data").mkdir()
    monkeypatch.setenv("MMRAG_SHARED_DATA", "~/shared data")
    assert shared_data_dir() == tmp_path / "shared data"


def test_a_course_cell_may_run_for_hours_on_a_gpu_preset_but_not_on_the_miniature(tmp_path, monkeypatch):
    """Every cell had 900 s, so notebook 03's training cell (300 steps of ~60 s on a T4) always failed the course on a
    GPU preset. The miniature keeps the limit (a hung kernel); a hub model has none unless asked."""
    import papermill

    from mmrag_lite import course, modeling

    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, out, parameters, **kw: seen.append(kw["execution_timeout"]))
    monkeypatch.setattr(modeling, "check_device", lambda preset: None)  # no GPU here: the check is another test's
    nb = course.notebook_paths()[:1]
    for preset, asked in [("cpu-tiny", None), ("colab-t4", None), ("colab-t4", 7200), ("cpu-tiny", 0)]:
        course.run_course(preset, out_dir=tmp_path / "run", notebooks=nb, timeout_per_cell=asked)
    assert seen == [course.MINIATURE_CELL_TIMEOUT_S, None, 7200, None]
    calls = {}
    monkeypatch.setattr(course, "run_course", lambda **kw: calls.update(kw) or type("R", (), {"ok": True, "summary": lambda self: ""})())
    assert cli.main(["course", "--timeout-per-cell", "0"]) == 0 and calls["timeout_per_cell"] == 0


def test_preset_overrides_round_trip_between_any_two_presets():
    from mmrag_lite.config import PRESETS, get_preset, preset_overrides

    for a in PRESETS.values():
        for b in PRESETS.values():
            assert a.with_overrides(**preset_overrides(a, b)) == b
    assert preset_overrides(PRESETS["cpu-tiny"], PRESETS["cpu-tiny"]) == {}
    changed = get_preset("colab-t4", **{"stage1.grpo.learning_rate": 2e-5, "stage2.weights": {"format": 1.0, "ranking": 1.0}})
    assert preset_overrides(PRESETS["colab-t4"], changed) == {"stage1.grpo.learning_rate": 2e-5,
                                                             "stage2.weights": {"format": 1.0, "ranking": 1.0}}


def test_course_calls_run_course(monkeypatch, capsys):
    from mmrag_lite import course

    calls = {}

    class Report:
        ok = True

        def summary(self):
            return "all good"

    def fake_run_course(preset="cpu-tiny", out_dir=None, overrides=None, **kw):
        calls.update(preset=preset, out_dir=out_dir, overrides=overrides)
        return Report()

    monkeypatch.setattr(course, "run_course", fake_run_course)
    assert cli.main(["course", "--preset", "cpu-tiny", "--out-dir", "x"]) == 0
    assert calls == {"preset": "cpu-tiny", "out_dir": "x", "overrides": {}} and "all good" in capsys.readouterr().out
    assert cli.main(["course", "--set", "evaluation.retrain_ablations=false", "--set", "stage1.grpo.max_steps=20"]) == 0
    assert calls["overrides"] == {"evaluation.retrain_ablations": False, "stage1.grpo.max_steps": 20}


def test_course_refuses_a_bad_override_before_running_anything(tmp_path, capsys):
    assert cli.main(["course", "--out-dir", str(tmp_path / "run"), "--set", "stage1.grpo.max_step=20"]) == 2
    assert "stage1.grpo.max_step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no run folder, no notebook started


def test_unknown_split_is_refused_by_the_parser():
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["evaluate", "--split", "val"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train-stage1", "--score-splits", "train", "val"])


def test_build_data_refuses_a_run_folder_built_with_other_settings(tmp_path, capsys):
    """Pointing a command at another preset's run folder must not rebuild its data over the top."""
    run = str(tmp_path / "run")
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", run]) == 0
    other = ["build-data", "--preset", "cpu-tiny", "--work-dir", run, "--set", "data.max_candidates=6"]
    assert cli.main(other) == 2
    assert "built with max_candidates=8, the preset asks 6" in capsys.readouterr().err  # says what differs
    assert cli.main([*other, "--rebuild"]) == 0


def test_build_data_from_a_webqa_dir(tmp_path, capsys):
    from mmrag_lite import data

    source = data.make_world(tmp_path / "webqa", n_questions=60, seed=3, progress=False)
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "run"),
                     "--webqa-dir", str(source)]) == 0
    report = data.FunnelReport.load(tmp_path / "run" / "mini_webqa")
    assert report.source == str((source / "WebQA_train_val.json").resolve()) and report.n_read == 60


def test_gpu_preset_without_a_gpu_stops_before_touching_data(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train-stage1", "--preset", "colab-t4", "--work-dir", str(tmp_path / "new")]) == 2
    assert "cpu-tiny" in capsys.readouterr().err and not (tmp_path / "new").exists()  # no empty run folder left


def test_evaluate_and_train_stage2_refuse_what_is_not_there(tmp_path, capsys):
    assert cli.main(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "typo")]) == 2
    assert "no run folder" in (err := capsys.readouterr().err) and not (tmp_path / "typo").exists()
    assert "run train-stage1 and train-stage2 first" in err
    assert cli.main(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path),
                     "--stage1-adapter", str(tmp_path / "nope")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["evaluate", "--questions", "0"])
    assert exc.value.code == 2
    assert cli.main(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path)]) == 2  # nothing trained yet
    assert "--allow-untrained" in capsys.readouterr().err and not (tmp_path / "mini_webqa").exists()
    assert cli.main(["train-stage2", "--preset", "cpu-tiny", "--work-dir", str(tmp_path)]) == 2
    assert "run train-stage1 first" in capsys.readouterr().err and not (tmp_path / "mini_webqa").exists()  # no data built
    (tmp_path / "stage1" / "adapter").mkdir(parents=True)  # an empty adapter folder (a crashed save) is no adapter
    assert cli.main(["train-stage2", "--preset", "cpu-tiny", "--work-dir", str(tmp_path)]) == 2
    assert "run train-stage1 first" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert cli.main(["train-stage2", "--preset", "cpu-tiny", "--work-dir", str(fresh), "--init-adapter",
                     str(tmp_path / "stage1" / "adapter")]) == 2
    assert "--init-adapter" in capsys.readouterr().err and not fresh.exists()  # refused before any folder is made
    assert cli.main(["train-stage2", "--preset", "cpu-tiny", "--work-dir", str(fresh)]) == 2
    assert "no run folder" in (err := capsys.readouterr().err) and not fresh.exists()
    assert "run train-stage1 first" in err


@pytest.mark.slow
def test_the_readme_cli_journey_runs_end_to_end(tmp_path, capsys):
    """build-data -> train-stage1 -> train-stage2 -> evaluate, as the README lists them (one GRPO step each)."""
    import json

    small = ["--preset", "cpu-tiny", "--work-dir", str(tmp_path)]
    for key, value in {"stage1.grpo.max_steps": 1, "stage1.grpo.per_device_train_batch_size": 8,
                       "stage1.grpo.max_completion_length": 6, "stage2.grpo.max_steps": 1,
                       "stage2.grpo.per_device_train_batch_size": 4, "stage2.grpo.max_completion_length": 10,
                       "stage2.max_examples": 8, "evaluation.questions": 3}.items():
        small += ["--set", f"{key}={value}"]
    assert cli.main(["build-data", *small]) == 0
    assert cli.main(["train-stage1", *small]) == 0
    assert (tmp_path / "stage1" / "adapter" / "adapter_config.json").is_file()
    assert all((tmp_path / "stage1" / f"scores_{split}.json").is_file() for split in ("train", "test"))  # the defaults
    assert cli.main(["train-stage2", *small]) == 0
    out = capsys.readouterr().out
    assert "stage-2 dataset: 8 rows" in out and (tmp_path / "stage2" / "adapter" / "adapter_config.json").is_file()
    assert cli.main(["evaluate", *small, "--no-mmqa", "--no-ablations", "--no-robustness", "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    systems = [row["system"] for row in report["table"]]
    assert len(systems) == 5 and systems[-1].startswith("oracle") and all(row["n"] == "3 WebQA" for row in report["table"])
    assert not any("adapter missing" in note for note in report["notes"])  # both trained adapters were used


def test_cli_details_a_mutation_run_found_unguarded(tmp_path, monkeypatch, capsys):
    from mmrag_lite import course, data

    assert cli.build_parser().parse_args(["build-data"]).preset == "auto"  # the default passes its own type check
    assert cli.parse_override("description=a=b") == ("description", "a=b")  # only the first "=" splits
    assert cli.parse_override("description=inf")[1] == "inf"  # not turned into a float
    # quoted text stays text; YAML's comment and base-60 readings are refused rather than applied silently
    assert cli.parse_override("name='2024'") == ("name", "2024")
    assert cli.parse_override('description="1e3"') == ("description", "1e3")
    with pytest.raises(cli.CLIError, match="comment: put the text that holds it in quotes"):
        cli.parse_override("description=exp #2")
    with pytest.raises(cli.CLIError, match="base 60"):
        cli.parse_override("stage1.grpo.max_steps=1:30")
    assert cli.parse_override("description='exp #2, 1:30'") == ("description", "exp #2, 1:30")
    assert cli.parse_override('d=["run #2", "b"]') == ("d", ["run #2", "b"])  # inside quotes, in a list: text
    assert cli.parse_override("d=0:30") == ("d", "0:30")  # YAML 1.1 reads no base 60 from a leading 0
    with pytest.raises(cli.CLIError, match="comment"):
        cli.parse_override('description="a" # c')  # a quoted start does not hide a comment after it
    with pytest.raises(cli.CLIError, match="base 60"):
        cli.parse_override("d=[1:30]")
    failed = course.CourseReport("cpu-tiny", tmp_path, tmp_path, notebooks=[
        course.NotebookRun("01_x.ipynb", 1.0, ok=False, output=tmp_path / "01_x.ipynb", error="boom")])
    monkeypatch.setattr(course, "run_course", lambda **_: failed)
    assert cli.main(["course", "--preset", "cpu-tiny"]) == 1  # a failed course must fail CI
    assert not course.CourseReport("cpu-tiny", tmp_path, tmp_path).ok  # nothing ran: not OK

    def bad_file(*_a, **_k):
        raise data.WebQAFormatError("WebQA_train_val.json: invalid JSON at character 7")

    monkeypatch.setattr(data, "ensure_mini_webqa", bad_file)
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "w")]) == 2
    assert "invalid JSON at character 7" in capsys.readouterr().err  # one line, no traceback
    wd = tmp_path / "run"
    (wd / "stage1" / "adapter").mkdir(parents=True)  # an empty adapter folder is no adapter
    assert cli.main(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(wd)]) == 2
    (tmp_path / "nb").mkdir()
    for name in ("02_b.ipynb", "01_a.ipynb", "notes.ipynb", "01_a-Copy1.ipynb"):  # Jupyter's File > Duplicate
        (tmp_path / "nb" / name).write_text("{}")
    assert [p.name for p in course.notebook_paths(tmp_path / "nb")] == ["01_a.ipynb", "02_b.ipynb"]


def test_file_permission_and_missing_extra_errors_are_one_line_and_a_bad_webqa_dir_leaves_no_folder(
        tmp_path, monkeypatch, capsys):
    """From a CLI audit: a read-only run folder and a missing notebooks extra printed tracebacks; a mistyped
    --webqa-dir left an empty run folder that a later `evaluate` took for a run."""
    from mmrag_lite import config, course

    wd = tmp_path / "w1"
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(wd), "--webqa-dir", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err and not wd.exists()

    def read_only(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(wd))

    monkeypatch.setattr(config, "work_dir", read_only)
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(wd)]) == 2
    assert "Permission denied" in capsys.readouterr().err

    def no_papermill(**_k):
        raise ModuleNotFoundError("No module named 'papermill': install the notebooks extra")

    monkeypatch.setattr(course, "run_course", no_papermill)
    assert cli.main(["course", "--preset", "cpu-tiny"]) == 2
    assert "install the notebooks extra" in capsys.readouterr().err


def test_data_parallel_ranks_wait_for_the_main_process_longer_than_nccls_ten_minutes(monkeypatch):
    """Under `accelerate launch` the main process may re-score stage 1's pools (~11 min for a100 on an H100) while the
    other ranks wait at a barrier; the first PartialState fixes the process group's timeout, so ours must set it."""
    import contextlib
    from datetime import timedelta

    import accelerate

    from mmrag_lite import cli

    made = []

    class FakeState:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def main_process_first(self):
            return contextlib.nullcontext("waited")

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with cli._main_process_first() as got:
        assert got is None and not made  # one process: no distributed state at all
    monkeypatch.setenv("WORLD_SIZE", "4")
    with cli._main_process_first() as got:
        assert got == "waited"
    assert made == [{"timeout": cli.DISTRIBUTED_WAIT}] and cli.DISTRIBUTED_WAIT >= timedelta(hours=1)


def test_evaluate_flags_reach_the_evaluation(tmp_path, monkeypatch):
    """--split, --questions and --stage1-adapter change what is evaluated; each must arrive, not be dropped."""
    import json

    from mmrag_lite import evaluation

    seen = {}

    class Report:
        def markdown(self):
            return ""

    def fake_evaluate(preset, wd, **kw):
        seen.update(kw)
        return Report()

    adapter = tmp_path / "elsewhere"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(cli, "run_data", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    assert cli.main(["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "run"), "--split", "validation",
                     "--questions", "2", "--stage1-adapter", str(adapter)]) == 0
    assert seen["split"] == "validation" and seen["n_questions"] == 2
    assert seen["bank"].adapter_path("stage1") == adapter


def test_training_flags_reach_training_and_scoring(tmp_path, monkeypatch):
    """--resume reaches both trainers; --score-splits picks what stage 1 scores and --no-score scores nothing."""
    from types import SimpleNamespace

    from mmrag_lite import pipeline, scoring, training
    from mmrag_lite.config import get_preset

    calls = {"resume": [], "scored": [], "saved": []}
    adapter = tmp_path / "stage1" / "adapter"
    monkeypatch.setattr(cli, "run_data", lambda *a, **k: {s: [] for s in ("train", "validation", "test")})
    monkeypatch.setattr(cli, "_stage1_adapter", lambda wd: adapter)
    monkeypatch.setattr(training, "build_stage1_dataset", lambda *a, **k: "rows")
    monkeypatch.setattr(training, "train_stage1", lambda preset, ds, wd, resume=False: (
        calls["resume"].append(("stage1", resume)) or SimpleNamespace(model=None, processor=None)))
    monkeypatch.setattr(scoring, "score_split", lambda model, proc, rows, preset, max_questions=None: (
        calls["scored"].append(max_questions) or {}))
    monkeypatch.setattr(pipeline, "save_stage1_scores", lambda scored, preset, wd, split, adapter: (
        calls["saved"].append(split) or wd / split))
    run = ["--preset", "cpu-tiny", "--work-dir", str(tmp_path)]
    assert cli.main(["train-stage1", *run, "--resume", "--score-splits", "validation"]) == 0
    assert calls["resume"] == [("stage1", True)] and calls["saved"] == ["validation"]
    preset = get_preset("cpu-tiny")
    assert calls["scored"] == [scoring.questions_to_score(preset, "validation")]
    assert cli.main(["train-stage1", *run, "--no-score"]) == 0
    assert calls["resume"][-1] == ("stage1", False) and calls["saved"] == ["validation"]  # nothing scored this time

    class Bank:
        def __init__(self, *a, **k):
            pass

        def unload(self):
            pass

    monkeypatch.setattr(cli, "resolve", lambda args, **k: (preset, tmp_path))
    monkeypatch.setattr(pipeline, "ModelBank", Bank)
    monkeypatch.setattr(pipeline, "ensure_stage1_scores", lambda *a, **k: None)
    monkeypatch.setattr(training, "stage2_dataset_for_run", lambda *a, **k: ("rows", "stage-2 dataset: 0 rows"))
    monkeypatch.setattr(training, "train_stage2", lambda preset, ds, wd, init_adapter=None, resume=False: (
        calls["resume"].append(("stage2", resume, init_adapter))))
    assert cli.main(["train-stage2", *run, "--resume"]) == 0
    assert calls["resume"][-1] == ("stage2", True, None)


def test_build_data_from_a_folder_without_images_says_what_to_do_and_leaves_nothing(tmp_path, capsys):
    """The CLI cannot build a text-only Mini-WebQA, yet the error told its user to pass check_images=False; and the
    refused run left a run folder with a .mini_webqa.lock behind. Now the message says what the CLI needs and how
    Python builds text-only, and the refusal comes before any folder or lock is made."""
    from mmrag_lite import data

    source = data.make_world(tmp_path / "webqa", n_questions=20, seed=3, progress=False)
    (source / "imgs.tsv").unlink()
    run = tmp_path / "run"
    assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(run), "--webqa-dir", str(source)]) == 2
    err = capsys.readouterr().err
    assert "has no imgs.tsv + imgs.lineidx" in err and "build-data command" in err and "Traceback" not in err
    assert "build_mini_webqa(source, out_dir, filters=MiniWebQAFilters(check_images=False))" in err
    assert not run.exists()


def test_build_data_prints_that_the_question_file_ends_mid_record(tmp_path, capsys):
    from mmrag_lite import data

    source = data.make_world(tmp_path / "webqa", n_questions=60, seed=3, progress=False)
    question_file = source / "WebQA_train_val.json"
    text = question_file.read_text()
    question_file.write_text(text[: int(len(text) * 0.9)])
    with pytest.warns(UserWarning, match="keeping the records before it"):
        assert cli.main(["build-data", "--preset", "cpu-tiny", "--work-dir", str(tmp_path / "run"),
                         "--webqa-dir", str(source)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: WebQA_train_val.json: the file ends mid-record after" in out


def test_evaluate_checks_the_device_for_inference_and_lets_allow_untrained_reach_the_bank(tmp_path, monkeypatch):
    """evaluate trains nothing, so the trainer-only device checks (one GPU per process) must not refuse it; and
    --allow-untrained is what lets a hub model's bank fall back to the base model (labelled) instead of refusing."""
    from mmrag_lite import evaluation, modeling, pipeline

    seen: dict = {}
    monkeypatch.setattr(modeling, "check_device", lambda preset, **kw: seen.setdefault("device", kw))
    monkeypatch.setattr(cli, "run_data", lambda *a, **k: None)

    class Bank:
        def __init__(self, preset, wd, **kw):
            seen["bank"] = kw

    class Report:
        def markdown(self):
            return "table"

    monkeypatch.setattr(pipeline, "ModelBank", Bank)
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: Report())
    (tmp_path / "stage1").mkdir()
    args = ["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--no-mmqa"]
    assert cli.main(args + ["--allow-untrained"]) == 0
    assert seen["device"] == {"for_training": False} and seen["bank"]["allow_missing_adapters"] is True
    (tmp_path / "stage1" / "adapter").mkdir()
    (tmp_path / "stage1" / "adapter" / "adapter_config.json").write_text("{}")
    assert cli.main(args) == 0
    assert seen["bank"]["allow_missing_adapters"] is None  # the bank's own default: the miniature falls back
    calls = []
    monkeypatch.setattr(modeling, "check_device", lambda preset, **kw: calls.append(kw))
    assert cli.main(args + ["--set", "evaluation.retrain_ablations=true"]) == 0  # it trains: the trainer's checks too
    assert calls == [{"for_training": False}, {}]
    calls.clear()
    assert cli.main(args + ["--set", "evaluation.retrain_ablations=true", "--no-ablations"]) == 0
    assert calls == [{"for_training": False}]


def test_set_traps_at_their_edges(monkeypatch):
    """From a mutation run: each of YAML 1.1's silent readings, at a spot the other tests left open."""
    with pytest.raises(cli.CLIError, match="comment"):
        cli.parse_override("description=#2")  # a leading '#': YAML reads nothing at all
    for raw in ("1:5", "1:30.5", "0:30.5", "[2, 1:5]"):  # one-digit seconds (65), base-60 floats (90.5; 30.5)
        with pytest.raises(cli.CLIError, match="base 60"):
            cli.parse_override(f"d={raw}")
    assert cli.parse_override("description=") == ("description", "")  # empty text, not YAML's null


def test_a_mistyped_preset_gets_a_did_you_mean(capsys):
    for typo in ("cpu-tny", "CPU_TINY"):
        with pytest.raises(SystemExit):
            cli.main(["build-data", "--preset", typo])
        assert f"unknown preset {typo!r}; did you mean 'cpu-tiny'?" in capsys.readouterr().err


def test_evaluate_refuses_retrained_ablations_only_with_no_ablations(tmp_path, capsys):
    args = ["evaluate", "--preset", "cpu-tiny", "--work-dir", str(tmp_path), "--retrained-ablations-only", "--no-ablations"]
    assert cli.main(args) == 2
    assert "choose one" in capsys.readouterr().err


def test_two_processes_already_wait_for_the_main_one(monkeypatch):
    import contextlib

    import accelerate

    class FakeState:
        def __init__(self, **kwargs):
            pass

        def main_process_first(self):
            return contextlib.nullcontext("waited")

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with cli._main_process_first() as got:
        assert got == "waited"


def test_the_course_summary_marks_the_failure_and_what_never_ran(tmp_path):
    from mmrag_lite import course

    runs = [course.NotebookRun("01_a.ipynb", 1.0, True, tmp_path / "01_a.ipynb"),
            course.NotebookRun("02_b.ipynb", 2.0, False, tmp_path / "02_b.ipynb", error="ValueError: boom"),
            course.NotebookRun("03_c.ipynb", 3.0, True, tmp_path / "03_c.ipynb")]
    report = course.CourseReport("cpu-tiny", tmp_path, tmp_path, notebooks=runs, skipped=["04_d.ipynb"])
    lines = report.summary().splitlines()
    assert "FAILED" in lines[0] and "OK" not in lines[0]
    assert lines[1].split()[:2] == ["ok", "01_a.ipynb"] and lines[2].split()[:2] == ["ERR", "02_b.ipynb"]
    assert "ValueError: boom" in lines[2]
    assert "04_d.ipynb" in lines[4] and "not run" in lines[4]
    assert lines[-1].endswith(f"the traceback is in {tmp_path / '02_b.ipynb'}")  # the failed one, not the last
    ok = course.CourseReport("cpu-tiny", tmp_path, tmp_path, notebooks=runs[:1])
    assert ": OK in" in ok.summary().splitlines()[0]


def test_the_course_summary_says_which_reward_component_moved_and_flags_a_fall(tmp_path):
    """"stage2 GRPO: 0.940 -> 0.781" alone sends a teacher hunting for a bug: the summary names the component that
    fell (format) and where the notebook says how to read a fall; a rise gets no such line."""
    from mmrag_lite import course

    def log(stage, rows):
        (tmp_path / f"stage{stage}").mkdir()
        (tmp_path / f"stage{stage}" / "log_history.json").write_text(json.dumps(rows))

    log(1, [{"reward": 1.0, "rewards/format/mean": 0.3, "rewards/relevance/mean": 0.7},
            {"reward": 1.5, "rewards/format/mean": 0.9, "rewards/relevance/mean": 0.6}, {"train_runtime": 9.0}])
    log(2, [{"reward": 0.9 + d, "rewards/format/mean": 0.7 + d} for d in (0.0, 0.1, -0.2, -0.3, -0.4)])
    lines = course.headline_numbers(tmp_path)
    assert lines[0] == "stage1 GRPO: mean reward 1.000 (first 20% of steps) -> 1.500 (last 20%) over 3 log rows"
    assert lines[1] == "    by component: format 0.300 -> 0.900, relevance 0.700 -> 0.600"
    assert lines[2].startswith("stage2 GRPO: mean reward 0.900 (first 20% of steps) -> 0.500 (last 20%)")
    assert lines[3] == "    by component: format 0.700 -> 0.300"
    assert lines[4].startswith("    it fell: one short sampled run can; notebook 04, section 5,")
    assert len(lines) == 5  # no fall line under stage 1, no evaluation without eval/results.md
    assert course.reward_lines(tmp_path, 3) == []  # a stage never trained


def test_a_failed_notebook_stops_the_course_unless_asked_not_to(tmp_path, monkeypatch):
    import papermill

    from mmrag_lite import course

    ran = []

    def execute(src, out, **_kw):
        ran.append(os.path.basename(src))
        if src.endswith("02_b.ipynb"):
            raise RuntimeError("cell failed\nsecond line")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    nbs = [tmp_path / n for n in ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb")]
    report = course.run_course("cpu-tiny", out_dir=tmp_path / "run", notebooks=nbs)
    assert ran == ["01_a.ipynb", "02_b.ipynb"] and report.skipped == ["03_c.ipynb"] and not report.ok
    assert report.notebooks[1].error == "RuntimeError: cell failed | second line"
    ran.clear()
    report = course.run_course("cpu-tiny", out_dir=tmp_path / "run", notebooks=nbs, stop_on_error=False)
    assert ran == ["01_a.ipynb", "02_b.ipynb", "03_c.ipynb"] and report.skipped == []


def test_a_step_that_removes_exactly_half_is_not_flagged(tmp_path):
    import json

    from mmrag_lite.course import funnel_lines

    (tmp_path / "mini_webqa").mkdir()
    for removed, flagged in ((50, False), (51, True)):  # "more than half"
        steps = [{"name": "step", "before": 100, "removed": removed, "kept": 100 - removed}]
        (tmp_path / "mini_webqa" / "funnel.json").write_text(json.dumps({"steps": steps}))
        assert any("WARNING" in line for line in funnel_lines(tmp_path)) is flagged


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    """Only user errors become a one-line exit 2: a bug must still show where it happened."""
    from mmrag_lite import course

    def bug(**_kw):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(course, "run_course", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["course", "--preset", "cpu-tiny"])


def test_describe_failure_names_the_cell_and_stays_within_its_limit():
    from papermill.exceptions import PapermillExecutionError

    from mmrag_lite import course

    cell = PapermillExecutionError(cell_index=7, exec_count=4, source="x", ename="ValueError", evalue="bad k",
                                   traceback=[])
    assert course.describe_failure(cell) == "ValueError: bad k (cell [4], index 7)"
    long = course.describe_failure(RuntimeError("x" * 1000), limit=50)
    assert len(long) == 50 and long.endswith("...")


def test_run_course_hands_a_named_preset_object_over_by_name_and_an_absolute_work_dir(tmp_path, monkeypatch):
    import papermill

    from mmrag_lite import course, modeling
    from mmrag_lite.config import get_preset

    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, out, parameters, **kw: seen.append(parameters))
    monkeypatch.setattr(modeling, "check_device", lambda preset: None)  # no GPU here
    monkeypatch.chdir(tmp_path)
    course.run_course(get_preset("colab-t4"), out_dir="rel", notebooks=course.notebook_paths()[:1])
    assert seen[0]["preset"] == "colab-t4" and seen[0]["overrides"] == {}  # not cpu-tiny plus every difference
    assert seen[0]["work_dir"] == str(tmp_path / "rel" / "work")  # the kernel runs in notebooks/: absolute


def test_the_course_kernel_is_not_interrupted_while_it_shuts_down():
    import asyncio

    from mmrag_lite import course

    km = course._kernel_manager_class()()
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())  # no kernel to signal, and none asked for: returns quietly
