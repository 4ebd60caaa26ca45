"""The project's own promises: dependency lists agree, presets validate, notebooks are committed clean."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from mmrag_lite import config
from mmrag_lite.config import PRESETS, ConfigError, Preset, get_preset, resolve_preset

ROOT = Path(__file__).resolve().parent.parent
TORCH_PINS = {"torch": "==2.14.1", "torchvision": "==0.29.1"}


def _split(requirement: str) -> tuple[str, str]:
    requirement = requirement.split("#")[0].strip()
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    return name.lower().replace("_", "-"), requirement[len(name):].strip()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"])
    for extra in ("notebooks", "dev", "gpu", "colab"):
        wanted.update(_split(r) for r in project["optional-dependencies"].get(extra, []))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    declared = dict(_split(r) for r in pip_list if not r.startswith("-"))
    assert "-c .ci/constraints.txt" in pip_list  # conda's pip installs the tested versions too
    assert {k: v for k, v in declared.items() if k not in TORCH_PINS} == {
        k: v for k, v in wanted.items() if k not in TORCH_PINS}
    assert {k: declared[k] for k in TORCH_PINS} == TORCH_PINS
    # only a floor in the package (an installed build is kept; transformers 5 needs torch 2.6), and torchvision
    # declared: Qwen-VL processors need it
    assert {k: wanted.get(k) for k in TORCH_PINS} == {"torch": ">=2.6", "torchvision": ">=0.21"}


def test_makefile_pins_the_same_torch_as_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in makefile


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make course" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    preset = PRESETS[name]
    assert Preset.from_dict(preset.to_dict()) == preset


def test_gpu_presets_name_a_hub_model_and_use_4bit():
    for name in ("colab-t4", "l4", "a100"):
        preset = PRESETS[name]
        assert "/" in preset.model.model_id and preset.model.load_in_4bit
    assert PRESETS["colab-t4"].model.compute_dtype == "float16"  # T4 has no bf16


def test_unknown_keys_and_impossible_combinations_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key 'stage1.nope'"):
        get_preset("cpu-tiny", **{"stage1.nope": 1})
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        get_preset("cpu-tiny", **{"stage1.grpo.num_generations": 3})
    with pytest.raises(ConfigError, match="unknown components"):
        get_preset("cpu-tiny", **{"stage2.weights": {"format": 1.0, "style": 1.0}})
    with pytest.raises(ConfigError, match="stage1.k"):
        get_preset("cpu-tiny", **{"stage1.k": 99})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("h100-cluster")
    data = PRESETS["cpu-tiny"].to_dict()
    data["lora"]["rank"] = 8
    with pytest.raises(ConfigError, match="unknown key"):
        Preset.from_dict(data)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stage1.k", "abc", "stage1.k must be a whole number"),
    ("stage2.permutations", 1.5, "permutations must be a whole number"),
    ("stage2.min_think_words", 0.5, "min_think_words must be a whole number"),
    ("stage2.weights.ranking", "nan", "weights.ranking must be a finite number"),
    ("stage1.grpo.beta", None, "beta must be a finite number"),
    ("stage1.reasoning", "maybe", "reasoning must be true or false"),
    ("lora.target_modules", "q_proj", "target_modules must be a list of names"),
    ("stage2.init_from", "stage3", "init_from must be one of 'stage1', 'base'"),
    ("stage2.ranking_metric", "mrr", "ranking_metric must be one of"),
    ("stage1.grpo.per_device_train_batch_size", 0, "per_device_train_batch_size"),
])
def test_overrides_of_the_wrong_type_are_clear_errors(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_preset("cpu-tiny", **{key: value})


def test_overrides_given_as_text_are_read_as_their_field_type():
    """What ``--set`` and YAML deliver: ``2e-3`` stays text in YAML 1.1, ``false`` must not be a truthy string."""
    preset = get_preset("cpu-tiny", **{"stage1.k": "3", "stage1.grpo.learning_rate": "2e-3", "stage1.reasoning": "false",
                                       "evaluation.retrain_ablations": "no", "lora.target_modules": ["q_proj"]})
    assert preset.stage1.k == 3 and preset.stage1.grpo.learning_rate == 2e-3
    assert preset.stage1.reasoning is False and preset.evaluation.retrain_ablations is False
    assert preset.lora.target_modules == ("q_proj",)
    assert get_preset("cpu-tiny", name="my-run").name == "my-run"  # no clash with get_preset's own argument


def test_overrides_and_yaml_round_trip(tmp_path):
    preset = get_preset("cpu-tiny", **{"stage1.grpo.max_steps": 3, "stage1.k": 2})
    assert (preset.stage1.grpo.max_steps, preset.stage1.k) == (3, 2)
    assert PRESETS["cpu-tiny"].stage1.grpo.max_steps != 3  # the registry is untouched
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(preset.to_dict()))
    assert config.load_preset_yaml(path) == preset


def test_grpo_loss_type_is_one_trl_supports():
    """A loss type TRL does not know used to pass the preset and fail with "Unknown loss type" after a step."""
    with pytest.raises(ConfigError, match=r"stage1\.grpo\.loss_type must be one of 'grpo', .*'dapo'.*got 'bogus'"):
        get_preset("cpu-tiny", **{"stage1.grpo.loss_type": "bogus"})
    built_in_code = dataclasses.replace(PRESETS["cpu-tiny"], stage2=dataclasses.replace(
        PRESETS["cpu-tiny"].stage2, grpo=dataclasses.replace(PRESETS["cpu-tiny"].stage2.grpo, loss_type="bogus")))
    with pytest.raises(ConfigError, match=r"stage2\.grpo\.loss_type='bogus' must be one of"):
        built_in_code.validate()  # no _coerce on this path: validate checks every Literal field itself
    for accepts in (get_preset, config.resolve_preset):  # a preset object passed as-is is validated too
        with pytest.raises(ConfigError, match="loss_type"):
            accepts(built_in_code)
    for loss_type in config.GRPO_LOSS_TYPES:
        assert get_preset("cpu-tiny", **{"stage1.grpo.loss_type": loss_type}).stage1.grpo.loss_type == loss_type
    from trl import GRPOConfig

    help_text = next(f.metadata["help"] for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type")
    supported = re.search(r"Supported values are (.*?)\. ", help_text).group(1)
    assert set(config.GRPO_LOSS_TYPES) == set(re.findall(r"'(\w+)'", supported))  # the pinned TRL's own list


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stage1.grpo.temperature", 0, "stage1.grpo.temperature=0.0 must be > 0"),
    ("stage2.grpo.temperature", -1, "stage2.grpo.temperature=-1.0 must be > 0"),
    ("stage1.max_examples", 0, "stage1.max_examples=0 must be >= 1"),
    ("stage2.max_examples", -5, "stage2.max_examples=-5 must be >= 1"),
    ("stage1.min_think_words", -1, "stage1.min_think_words=-1 must be >= 0"),
    ("stage1.grpo.save_steps", 0, "stage1.grpo.save_steps=0 must be >= 1"),
    ("stage2.grpo.logging_steps", 0, "stage2.grpo.logging_steps=0 must be >= 1"),
    ("lora.dropout", 1.0, "lora.dropout=1.0 must be in [0, 1)"),
    ("lora.dropout", -0.1, "lora.dropout=-0.1 must be in [0, 1)"),
    ("lora.alpha", 0, "lora.alpha=0 must be > 0"),
    ("lora.r", 0, "lora.r=0 must be >= 1"),
    ("lora.target_modules", [], "lora.target_modules=[] must name at least one module"),
    ("stage1.weights", {"format": 0.0, "relevance": 0.0}, "at least one reward component must have a positive weight"),
    ("stage2.weights", {"format": 0, "ranking": 0, "answer": 0}, "stage2.weights={'format': 0.0, 'ranking': 0.0"),
    ("model.attn_implementation", "bogus",
     ("attn_implementation must be one of 'eager', 'sdpa', 'flash_attention_2', 'flash_attention_3', 'flex_attention', "
      "got 'bogus'")),
])
def test_out_of_range_values_are_errors_naming_key_value_and_range(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_preset("cpu-tiny", **{key: value})


def test_attn_implementations_are_ones_transformers_accepts():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert set(config.ATTN_IMPLEMENTATIONS) <= {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    assert "sdpa" in config.ATTN_IMPLEMENTATIONS and "eager" in config.ATTN_IMPLEMENTATIONS  # default, cpu-tiny's
    assert get_preset("colab-t4", **{"model.attn_implementation": "flash_attention_2"}).model.attn_implementation == \
        "flash_attention_2"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.image_size", 0, "model.image_size=0 must be >= 28 px"),
    ("model.image_size", 27, "model.image_size=27 must be >= 28 px"),
    ("model.min_pixels", 0, "model.min_pixels=0 must be >= 784"),
    ("model.max_pixels", 0, "model.max_pixels=0 must be >= 784"),
    ("data.world_image_size", 0, "data.world_image_size=0 must be >= 28 px"),
    ("data.world_questions", 0, "data.world_questions=0 must be >= 1"),
    ("data.world_questions", -3, "data.world_questions=-3 must be >= 1"),
])
def test_image_sizes_and_world_size_are_checked_before_the_token_arithmetic(key, value, message):
    """``image_tokens`` (run by the prompt-budget check) divided by these: a ZeroDivisionError, not a ConfigError."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_preset("cpu-tiny", **{key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_preset("colab-t4", **{key: value})
    assert get_preset("cpu-tiny", **{"model.image_size": 28}).model.image_size == 28  # the bound itself is fine
    with pytest.raises(ConfigError, match="model.image_size=0"):  # a bare ModelSettings, never validated
        config.image_tokens(dataclasses.replace(PRESETS["cpu-tiny"].model, image_size=0, min_pixels=0, max_pixels=0))


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".", ".hidden", "a\\b", "/abs", "", "-flag", "x y"])
def test_preset_name_must_be_a_plain_folder_name(name, tmp_path, monkeypatch):
    """``--set name=...`` names the run folder runs/<name>: it must not escape runs/."""
    monkeypatch.setenv("MMRAG_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(f"name={name!r} must be a plain folder name")):
        get_preset("cpu-tiny", name=name)
    with pytest.raises(ConfigError, match="plain folder name"):
        config.work_dir(name)
    assert not any(tmp_path.rglob("*"))  # nothing created
    assert config.work_dir(get_preset("cpu-tiny", name="my-run_2.b")) == tmp_path / "runs" / "my-run_2.b"


def test_a_mapping_for_a_section_updates_only_the_keys_it_names():
    base = get_preset("cpu-tiny")
    p = get_preset("cpu-tiny", stage1={"k": 3, "grpo": {"max_steps": 2}})
    assert p.stage1.k == 3 and p.stage1.grpo.max_steps == 2
    assert p.stage1.grpo.learning_rate == base.stage1.grpo.learning_rate and p.stage1.weights == base.stage1.weights
    assert get_preset("cpu-tiny", stage1__grpo={"max_steps": 2}).stage1.grpo == dataclasses.replace(base.stage1.grpo, max_steps=2)
    # a mapping value (reward weights) is replaced whole: the ablations drop components this way
    assert dict(get_preset("cpu-tiny", **{"stage2.weights": {"format": 1.0}}).stage2.weights) == {"format": 1.0}
    assert dict(get_preset("cpu-tiny", stage2={"weights": {"format": 1.0}}).stage2.weights) == {"format": 1.0}


def test_unknown_keys_and_presets_say_what_would_work():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.kk'.*keys of section 'stage1': balance_classes, "
                                          r"grpo, k, max_examples.*did you mean 'stage1.k'\?"):
        PRESETS["cpu-tiny"].with_overrides(**{"stage1.kk": 3})
    with pytest.raises(ConfigError, match=re.escape("""did you mean 'stage1.k'? Dotted keys are not Python names: """
                                                    """pass them as get_preset(name, **{'stage1.k': 3})""")):
        get_preset("cpu-tiny", stage1_k=3)
    assert get_preset("cpu-tiny", stage1__k=3).stage1.k == 3  # the double-underscore spelling the hint offers works
    with pytest.raises(ConfigError, match=r"did you mean 'stage1\.grpo\.max_steps'"):
        get_preset("cpu-tiny", stage1_grpo_max_steps=3)
    with pytest.raises(ConfigError, match=r"keys of section 'stage2\.weights': answer, format, ranking"):
        get_preset("cpu-tiny", **{"stage2.weights.style": 1.0})
    with pytest.raises(ConfigError, match=r"keys of a preset: data, description.*did you mean 'stage1\.k'"):
        get_preset("cpu-tiny", **{"stgae1.k": 3})
    with pytest.raises(ConfigError, match=r"did you mean 'stage1\.k'\?"):  # a bare key that only one section has
        get_preset("cpu-tiny", k=3)
    # one that both stages have: both offered, not whichever difflib met first
    with pytest.raises(ConfigError, match=r"did you mean 'stage1\.grpo\.max_steps' or 'stage2\.grpo\.max_steps'\?"):
        get_preset("cpu-tiny", **{"grpo.max_steps": 3})
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1\.kk'"):  # inside a section mapping too
        get_preset("cpu-tiny", stage1={"kk": 3})
    with pytest.raises(ConfigError, match=r"'stage1\.k' is a value, not a section"):
        get_preset("cpu-tiny", **{"stage1.k.x": 3})
    with pytest.raises(ConfigError, match=re.escape("resolve_preset('auto'")):
        get_preset("auto")
    with pytest.raises(ConfigError, match="did you mean 'cpu-tiny'"):
        get_preset("cpu_tiny")


@pytest.mark.parametrize(("cuda", "bf16", "capability", "gib", "expected"), [
    (False, False, (0, 0), 0, "cpu-tiny"),
    (True, False, (7, 5), 15, "colab-t4"),  # T4: no bf16
    (True, True, (7, 5), 14.7, "colab-t4"),  # a real Colab T4: is_bf16_supported() says True (emulation)
    (True, True, (8, 9), 22, "l4"),
    (True, True, (8, 0), 39.4, "a100"),  # A100 40 GB: above the a100 preset's estimate (35.3 GiB measured at the cap)
    (True, True, (8, 9), 24, "l4"),  # bf16 and 24 GiB: below the a100 preset's estimate
    (True, True, (8, 0), 80, "a100"),
    (True, True, (9, 0), 79.1, "a100"),  # H100 80 GB
    (True, True, (8, 6), 16, "colab-t4"),  # bf16 but too small for l4's estimate
])
def test_auto_preset_follows_the_hardware(monkeypatch, cuda, bf16, capability, gib, expected):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: types.SimpleNamespace(total_memory=gib * 2**30))
    assert config.auto_preset_name() == expected and resolve_preset("auto").name == expected
    assert config.cuda_native_bf16() is (cuda and capability[0] >= 8)
    if expected != "cpu-tiny":
        assert get_preset(expected).expected_memory_gb <= gib  # auto never picks a preset its card cannot hold


def test_auto_preset_refuses_a_gpu_smaller_than_every_gpu_preset(monkeypatch):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: types.SimpleNamespace(total_memory=8 * 2**30))
    with pytest.raises(ConfigError, match=r"8\.0 GiB.*colab-t4.*cpu-tiny"):
        resolve_preset("auto")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_k_images_in_its_stage2_prompt(name):
    """k candidates at the preset's image size, with room for text, fit stage2.max_prompt_tokens (no shrinking)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    preset = PRESETS[name]
    m = preset.model
    h, w = smart_resize(m.image_size, m.image_size, factor=28, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    assert config.image_tokens(m) == (h // 14) * (w // 14) // 4 + 2  # the processor's own arithmetic
    assert preset.check_prompt_budget() is preset
    assert preset.stage1.k * config.image_tokens(m) < config.stage2_prompt_tokens_needed(preset) <= \
        preset.stage2.max_prompt_tokens


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if not p.model.is_miniature])
def test_gpu_presets_answer_with_room_for_every_candidate_within_the_call_cap(name):
    """Zero-shot shows a whole pool: data.max_candidates image candidates fit the answering prompt cap (the budget
    estimate, real Qwen2 tokens), which stays within a generate call's token cap and above stage 2's training cap."""
    preset = PRESETS[name]
    every = config.stage2_prompt_tokens_needed(preset, preset.data.max_candidates)
    assert preset.stage2.max_prompt_tokens < every <= preset.answer_prompt_tokens
    assert preset.answer_prompt_tokens <= preset.evaluation.generation_max_batch_tokens


def test_answering_prompt_cap_never_drops_below_stage2s_and_never_breaks_the_call_cap():
    assert PRESETS["cpu-tiny"].answer_prompt_tokens == PRESETS["cpu-tiny"].stage2.max_prompt_tokens  # 0: stage 2's
    assert get_preset("colab-t4", **{"evaluation.max_prompt_tokens": 0}).answer_prompt_tokens == 2048
    assert get_preset("colab-t4", **{"evaluation.max_prompt_tokens": 1000}).answer_prompt_tokens == 2048
    assert get_preset("colab-t4", **{"stage2.max_prompt_tokens": 4096}).answer_prompt_tokens == 4096  # training's wins
    with pytest.raises(ConfigError, match=r"longest answering prompt \(30000 tokens.*over .*=20480"):
        get_preset("colab-t4", **{"evaluation.max_prompt_tokens": 30_000})
    with pytest.raises(ConfigError, match=r"evaluation.max_prompt_tokens=-1 must be >= 0"):
        get_preset("colab-t4", **{"evaluation.max_prompt_tokens": -1})


def test_prompt_budget_too_small_for_k_images_is_a_clear_error(tmp_path):
    assert config.image_tokens(PRESETS["a100"].model) == 258  # 448 px: 16x16 merged patches + 2 wrappers
    old_a100 = {"stage2.max_prompt_tokens": 2048}  # 8 images alone are 2,064 tokens
    with pytest.raises(ConfigError, match=r"max_prompt_tokens=2048 cannot hold stage1.k=8 .*258 tokens each"):
        get_preset("a100", **old_a100)
    with pytest.raises(ConfigError, match="cannot hold stage1.k=16"):
        resolve_preset("colab-t4", **{"stage1.k": 16})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PRESETS["a100"].with_overrides(**old_a100).to_dict()))
    with pytest.raises(ConfigError, match="max_prompt_tokens=2048"):
        config.load_preset_yaml(path)
    path.write_text("name: x\nstage1: {k: 3\n")  # an unclosed brace: a ConfigError naming the file, not a parser trace
    with pytest.raises(ConfigError, match=r"p.yaml is not valid YAML.*line"):
        config.load_preset_yaml(path)
    # with_overrides checks structure only, so tests can still build a deliberately tight budget (shrink path)
    assert PRESETS["cpu-tiny"].with_overrides(**{"stage2.max_prompt_tokens": 20}).stage2.max_prompt_tokens == 20


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    """Also valid nbformat 4.5 with a unique id per cell: a cell added by hand without one only warns today, and
    nbformat says that becomes an error."""
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks, "no course notebooks found"
    for path in notebooks:
        nb = json.loads(path.read_text())
        ids = [c.get("id") for c in nb["cells"]]
        assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: every cell needs its own id"
        nbformat.validate(nbformat.from_dict(nb))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{path.name} has outputs"
        params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        source = "".join(params[0]["source"])
        assert 'preset = "auto"' in source and "work_dir = None" in source, path.name
        assert "config.resolve_preset(preset, **overrides)" in "".join("".join(c["source"]) for c in code), path.name


def test_package_tests_benchmarks_and_notebooks_pass_the_linter():
    """The same check as ``make lint`` (files chosen in pyproject), so an unused import in a notebook fails CI."""
    import subprocess
    import sys

    pytest.importorskip("ruff", reason="ruff is a dev extra")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_papermill_reads_every_course_parameter():
    """Papermill skips a parameter it cannot parse (an '=' in its comment does it) and only warns at run time."""
    import nbformat
    from papermill.translators import PythonTranslator

    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assert {p.name for p in PythonTranslator.inspect(cell)} >= {"preset", "work_dir", "overrides"}, path.name


def _documented_layers() -> list[set[str]]:
    """The import order pinned in docs/CONTRACTS.md (``atomic → config → ... → cli/course``), one set per layer."""
    line = next(ln for ln in (ROOT / "docs" / "CONTRACTS.md").read_text().splitlines() if ln.startswith("atomic →"))
    return [set(layer.strip().split("/")) for layer in line.split("→")]


def _imported_modules(path: Path, package: Path) -> list[tuple[str, int]]:
    """Top-level ``mmrag_lite`` modules that ``path`` imports anywhere (function-level imports included)."""
    import ast

    depth = len(path.relative_to(package).parts) - 1  # 0 for mmrag_lite/x.py, 1 for mmrag_lite/data/x.py
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mmrag_lite"):
            parts = node.module.split(".")
            names = parts[1:2] or [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > depth:  # relative import that leaves this subpackage
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mmrag_lite.")]
        found += [(name, node.lineno) for name in names]
    return found


def test_imports_only_point_down_the_documented_layers():
    layers = _documented_layers()
    rank = {module: i for i, layer in enumerate(layers) for module in layer}
    package = ROOT / "mmrag_lite"
    modules = {p.relative_to(package).parts[0].removesuffix(".py") for p in package.glob("*") if p.name[0] != "_"}
    assert modules <= set(rank), f"modules missing from docs/CONTRACTS.md's order: {modules - set(rank)}"
    upward = []
    for path in package.rglob("*.py"):
        me = path.relative_to(package).parts[0].removesuffix(".py")
        if me not in rank:
            continue
        upward += [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line in _imported_modules(path, package)
                   if name in rank and rank[name] > rank[me]]
    assert not upward, "imports that point up the documented order:\n" + "\n".join(upward)


def test_project_root_outside_a_checkout_is_the_working_directory(tmp_path, monkeypatch):
    """Installed into site-packages (Colab's pip line), data/ and runs/ go to the working directory, not site-packages."""
    monkeypatch.delenv("MMRAG_HOME", raising=False)
    assert (config.project_root() / "pyproject.toml").is_file()  # this checkout
    installed = tmp_path / "site-packages" / "mmrag_lite" / "config.py"
    installed.parent.mkdir(parents=True)
    monkeypatch.setattr(config, "__file__", str(installed))
    monkeypatch.chdir(tmp_path)
    assert config.project_root() == tmp_path.resolve() and config.runs_dir() == tmp_path.resolve() / "runs"
    monkeypatch.setenv("MMRAG_HOME", str(tmp_path / "home"))
    assert config.project_root() == (tmp_path / "home").resolve()


def test_moving_data_and_runs_with_mmrag_home_keeps_the_shared_data_next_to_the_checkout(tmp_path, monkeypatch):
    """MMRAG_HOME on Drive used to switch off every real-data check of a checkout (it moved ../shared/data too)."""
    monkeypatch.delenv("MMRAG_SHARED_DATA", raising=False)
    checkout = tmp_path / "repo"
    (checkout / "mmrag_lite").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(config, "__file__", str(checkout / "mmrag_lite" / "config.py"))
    monkeypatch.setenv("MMRAG_HOME", str(tmp_path / "drive" / "mmrag"))
    assert config.runs_dir() == (tmp_path / "drive" / "mmrag" / "runs").resolve()
    assert config.shared_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv("MMRAG_SHARED_DATA", str(tmp_path / "nowhere"))
    assert config.shared_data_dir() is None  # the override wins, and an absent folder is None


def test_miniature_and_generation_knobs_are_preset_data():
    from mmrag_lite import evaluation, pipeline

    tiny = get_preset("cpu-tiny")
    assert tiny.model.is_miniature and not any(get_preset(n).model.is_miniature for n in ("colab-t4", "l4", "a100"))
    assert pipeline.default_batch_size(tiny) == tiny.evaluation.generation_batch_size == 64
    assert pipeline.default_batch_size(get_preset("l4")) == 32  # and at most 20,480 prompt tokens a call:
    assert get_preset("l4").evaluation.generation_max_batch_tokens == 20_480  # test_architectures checks it fits
    assert get_preset("a100").evaluation.generation_max_batch_tokens == 65_536  # a 40 GB card
    assert get_preset("a100").evaluation.questions == get_preset("colab-t4").evaluation.questions == 300
    assert tiny.evaluation.generation_max_batch_tokens == 0  # the miniature: no cap
    with pytest.raises(ConfigError, match=r"evaluation.generation_max_batch_tokens=-1 must be >= 0 \(0: no cap\)"):
        tiny.with_overrides(**{"evaluation.generation_max_batch_tokens": -1})
    assert evaluation.default_mmqa_questions(tiny, 40) == 20 and evaluation.default_mmqa_questions(tiny, 5) == 5
    assert evaluation.default_mmqa_questions(get_preset("a100"), 300) == 300  # 0: as many as WebQA questions
    assert evaluation.default_mmqa_questions(tiny.with_overrides(**{"evaluation.mmqa_questions": 0}), 40) == 40
    with pytest.raises(ConfigError, match="evaluation.generation_batch_size=0"):
        tiny.with_overrides(**{"evaluation.generation_batch_size": 0})


def test_k_beyond_the_pool_and_non_square_images_are_handled():
    """Found unguarded by a mutation run: an impossible k is refused; a wide image still becomes the preset's square."""
    from PIL import Image

    from mmrag_lite.config import ConfigError, get_preset
    from mmrag_lite.modeling import prepare_image

    with pytest.raises(ConfigError, match=r"data\.max_candidates"):
        get_preset("cpu-tiny", **{"stage1.k": 99})
    with pytest.raises(ConfigError, match=r"data\.max_candidates=1 must be >= 2 \(a pool of its gold alone"):
        get_preset("cpu-tiny", **{"data.max_candidates": 1, "stage1.k": 1})
    side = get_preset("cpu-tiny").model.image_size
    assert prepare_image(Image.new("RGB", (side, 10)), get_preset("cpu-tiny")).size == (side, side)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stage1.grpo.num_generations", 1, "stage1.grpo.num_generations=1 must be >= 2"),
    ("stage2.grpo.max_steps", 0, "stage2.grpo.max_steps=0 must be >= 1"),
    ("stage1.grpo.learning_rate", 0, "stage1.grpo.learning_rate=0.0 must be > 0"),
    ("stage2.grpo.beta", -0.1, "stage2.grpo.beta=-0.1 must be >= 0"),
    ("stage1.weights", {}, "stage1.weights={} must name at least one of format, relevance"),
    ("stage2.weights", {"format": -0.5, "answer": 1.0}, "stage2.weights {'format': -0.5} must be >= 0"),
    ("stage1.weights", {"format": 1.0, "answer": 1.0}, "stage1.weights has unknown components ['answer']"),
    ("stage2.weights", {"format": 1.0, "relevance": 1.0}, "stage2.weights has unknown components ['relevance']"),
    ("stage1.positive_fraction", 0, "stage1.positive_fraction=0.0 must be in (0, 1)"),
    ("stage1.positive_fraction", 1, "stage1.positive_fraction=1.0 must be in (0, 1)"),
    ("stage1.k", 9, "stage1.k=9 must be in [1, data.max_candidates=8]"),
    ("stage1.k", 0, "stage1.k=0 must be in [1, data.max_candidates=8]"),
    ("stage2.permutations", 0, "stage2.permutations=0 must be >= 1"),
    ("stage2.max_prompt_tokens", 0, "stage2.max_prompt_tokens=0 must be >= 1"),
    ("evaluation.questions", 0, "evaluation.questions=0 must be >= 1"),
    ("evaluation.mmqa_questions", -1, "evaluation.mmqa_questions=-1 must be >= 0"),
    ("expected_memory_gb", -1, "expected_memory_gb=-1.0 must be >= 0"),
    ("seed", 2**32, "seed=4294967296 must be in [0, 2**32 - 1]"),
    ("seed", -1, "seed=-1 must be in [0, 2**32 - 1]"),
    ("model.min_pixels", 783, "model.min_pixels=783 must be >= 784"),
    ("lora.target_modules", ["q_proj", ""], "lora.target_modules=['q_proj', ''] must name at least one module"),
])
def test_each_range_rule_names_its_own_key_a_mutation_run_found_unpinned(key, value, message):
    """Found unpinned by a mutation run of config.py: dropping any one of these rules (or shifting its bound) let the
    value through, or let another rule's message stand in for it; each stage's weights take only its own components."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_preset("cpu-tiny", **{key: value})


def test_range_bounds_themselves_are_accepted_and_validate_checks_the_images_without_the_budget():
    """The edges of the rules above are valid values (k may be the whole pool; an answering prompt may fill the
    call's token cap exactly), and ``with_overrides``, which skips the prompt budget, still checks the pixel rules."""
    tiny = PRESETS["cpu-tiny"]
    assert tiny.with_overrides(**{"stage1.k": tiny.data.max_candidates}).stage1.k == tiny.data.max_candidates
    cap = PRESETS["colab-t4"].evaluation.generation_max_batch_tokens
    assert get_preset("colab-t4", **{"evaluation.max_prompt_tokens": cap}).answer_prompt_tokens == cap
    with pytest.raises(ConfigError, match=r"model\.min_pixels=3137 must be <= model\.max_pixels=3136"):
        tiny.with_overrides(**{"model.min_pixels": 3137})


@pytest.mark.parametrize(("image_size", "min_pixels", "max_pixels"), [
    (100, 784, 10**6),  # 100 px rounds to 112, not down to 84
    (56, 100 * 100, 10**6),  # below min_pixels: scaled up to 100 px, rounded up to 112
    (448, 784, 300 * 300),  # above max_pixels: scaled down to 300 px, rounded down to 280
])
def test_image_tokens_follow_the_processor_off_the_presets_own_sizes(image_size, min_pixels, max_pixels):
    """The presets' own sizes are exact multiples of 28 px inside their pixel budgets, so they never exercise the
    rounding: a mutation run could round the other way in each branch of image_tokens unnoticed."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    model = dataclasses.replace(PRESETS["cpu-tiny"].model, image_size=image_size, min_pixels=min_pixels,
                                max_pixels=max_pixels)
    h, w = smart_resize(image_size, image_size, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert config.image_tokens(model) == (h // 28) * (w // 28) + 2 == (18 if image_size < 448 else 102)


def test_prompt_budget_estimate_by_hand_and_a_budget_of_exactly_that_fits():
    """a100: 8 images of 258 tokens, each with its candidate text, plus the fixed text; a cap equal to the estimate is
    enough (the check refuses only a prompt that needs more), one token less is not."""
    a100 = PRESETS["a100"]
    needed = config.PROMPT_TEXT_FIXED_TOKENS + 8 * (258 + config.PROMPT_TEXT_TOKENS_PER_CANDIDATE)
    assert config.stage2_prompt_tokens_needed(a100) == needed == 128 + 8 * 306
    assert get_preset("a100", **{"stage2.max_prompt_tokens": needed}).stage2.max_prompt_tokens == needed
    with pytest.raises(ConfigError, match=rf"about {needed} tokens needed"):
        get_preset("a100", **{"stage2.max_prompt_tokens": needed - 1})
    tight = a100.with_overrides(**{"stage2.max_prompt_tokens": needed - 1})  # with_overrides skips the budget ...
    for accepts in (get_preset, config.resolve_preset):  # ... but a preset object handed over is checked
        with pytest.raises(ConfigError, match=rf"about {needed} tokens needed"):
            accepts(tight)


@pytest.mark.parametrize(("cuda", "capability", "gib", "expected"), [
    (True, (8, 0), 38.0, "a100"),  # exactly a100's estimate: it fits
    (True, (8, 9), 18.0, "l4"),  # exactly l4's
    (True, (7, 5), 12.0, "colab-t4"),  # exactly colab-t4's
    (True, (7, 0), 32.0, "colab-t4"),  # V100 32 GB: room for l4 and a100 but no native bf16, so fp16's colab-t4
    (False, (9, 0), 80.0, "cpu-tiny"),  # a capability reported without CUDA available is not bf16
])
def test_auto_preset_at_the_memory_boundaries_and_without_bf16(monkeypatch, cuda, capability, gib, expected):
    """Found unpinned by a mutation run: a card exactly as large as a preset's estimate gets it (<=, not <), and a
    large card without native bf16 never gets a bf16 preset."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: types.SimpleNamespace(total_memory=gib * 2**30))
    assert config.auto_preset_name() == expected
    assert config.cuda_native_bf16() is (cuda and capability[0] >= 8)


def test_text_and_numbers_are_coerced_only_where_unambiguous():
    """Found unpinned by a mutation run of _coerce: booleans read any case and the on/off spellings, but a number is
    no boolean; a whole number is no float text and no bool; a float is no bool and no infinity; text is only text."""
    tiny = "cpu-tiny"
    assert get_preset(tiny, **{"stage1.reasoning": " True ", "stage2.reasoning": "ON"}).stage1.reasoning is True
    assert get_preset(tiny, **{"stage2.reasoning": "on"}).stage2.reasoning is True
    assert get_preset(tiny, **{"stage1.reasoning": "off", "stage2.answer_guards": "OFF"}).stage1.reasoning is False
    assert get_preset(tiny, **{"stage1.k": " 3 "}).stage1.k == 3
    for key, value, message in [
        ("stage1.reasoning", 2, "stage1.reasoning must be true or false, got 2"),
        ("stage1.k", True, "stage1.k must be a whole number, got True"),
        ("stage1.k", "2.5", "stage1.k must be a whole number, got '2.5'"),
        ("stage1.k", 3.0, "stage1.k must be a whole number, got 3.0"),
        ("stage1.grpo.learning_rate", True, "learning_rate must be a finite number, got True"),
        ("stage1.grpo.learning_rate", float("inf"), "learning_rate must be a finite number, got inf"),
        ("stage1.grpo.learning_rate", "-inf", "learning_rate must be a finite number, got '-inf'"),
        ("model.model_id", 7, "model.model_id must be text, got 7"),
        ("lora.target_modules", ["q_proj", 1], "target_modules must be a list of names"),
        ("stage2.weights", ["format"], "stage2.weights must be a mapping of component -> weight"),
        ("stage2.weights", {"format": "lots"}, "stage2.weights.format must be a finite number, got 'lots'"),
        ("stage1.positive_fraction", "half", "stage1.positive_fraction must be a finite number, got 'half'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            get_preset(tiny, **{key: value})
    assert get_preset(tiny, **{"stage1.grpo.learning_rate": "2e-3"}).stage1.grpo.learning_rate == 0.002
    weights = get_preset(tiny, **{"stage2.weights": {"format": "2", "answer": 1}}).stage2.weights
    assert dict(weights) == {"format": 2.0, "answer": 1.0} and all(type(w) is float for w in weights.values())


def test_plain_data_of_the_wrong_shape_is_a_config_error_naming_where(tmp_path):
    """Found unpinned by a mutation run: a missing key or a value where a section belongs in a preset's plain data
    (a hand-written YAML file) is a ConfigError naming its place, not a TypeError from the dataclass."""
    data = PRESETS["cpu-tiny"].to_dict()
    del data["stage1"]["k"]
    with pytest.raises(ConfigError, match=re.escape("missing key 'k' in preset.stage1")):
        Preset.from_dict(data)
    data = PRESETS["cpu-tiny"].to_dict()
    data["lora"] = 16
    with pytest.raises(ConfigError, match=re.escape("preset.lora must be a mapping, got int")):
        Preset.from_dict(data)
    path = tmp_path / "p.yaml"
    path.write_text("- cpu-tiny\n")
    with pytest.raises(ConfigError, match=re.escape("preset must be a mapping, got list")):
        config.load_preset_yaml(path)
    for name in (None, 5):  # a folder name is text: str(None) would pass the pattern
        with pytest.raises(ConfigError, match="must be a plain folder name"):
            config.check_preset_name(name)


def test_to_dict_is_plain_json_data_and_each_tier_computes_in_what_its_hardware_runs_fast():
    """to_dict is what preset.json saves and resume compares with (training.changed_on_resume): a tuple left in it
    would never equal its JSON reload, so every resume would report lora.target_modules as changed. And the compute
    dtype per tier: a CPU has no fast fp16 matmul (cpu-tiny: float32), a T4 no bf16 (float16), L4 / A100 have bf16."""
    for preset in PRESETS.values():
        plain = preset.to_dict()
        assert json.loads(json.dumps(plain)) == plain
        assert type(plain["lora"]["target_modules"]) is list
    dtypes = {name: p.model.compute_dtype for name, p in PRESETS.items()}
    assert dtypes == {"cpu-tiny": "float32", "colab-t4": "float16", "l4": "bfloat16", "a100": "bfloat16"}


def test_setting_changes_pairs_every_differing_leaf_by_dotted_key():
    """Found unpinned by a mutation run: a key only the newer tree has (a field added since a run saved its preset)
    is a change paired with None, and equal leaves are not listed."""
    before = {"lr": 1.0, "stage1": {"k": 4, "weights": {"format": 1.0}}, "gone": 1}
    after = {"lr": 2.0, "stage1": {"k": 4, "weights": {"format": 1.0, "answer": 1.0}}}
    assert config.setting_changes(before, after) == {"gone": (1, None), "lr": (1.0, 2.0),
                                                     "stage1.weights.answer": (None, 1.0)}
    assert config.setting_changes(after, after) == {}


def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_lock", ROOT / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_holds_every_dependency_at_a_version_pyproject_allows():
    """A fresh .venv installs with -c .ci/constraints.txt: a dependency missing from it would float to untested
    releases, and a pin pyproject does not allow would make every install fail."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = _lock_module().read_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"] + project["optional-dependencies"]["notebooks"] + \
            project["optional-dependencies"]["dev"]:
        req = Requirement(raw.split("#")[0])
        name = canonicalize_name(req.name)
        if name in TORCH_PINS:
            assert name not in locked  # TORCH_SPEC chooses the build; a GPU machine names its own
            continue
        assert name in locked, f"{name} is not in .ci/constraints.txt: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} breaks {raw}"
    assert not [n for n in locked if n.startswith("nvidia-") or n in {"triton", "setuptools", "pip"}]


def test_the_makefile_installs_with_the_lock_unless_told_not_to():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK ?= .ci/constraints.txt" in makefile
    assert re.search(r"pip install .*\$\(if \$\(LOCK\),-c \$\(LOCK\)\) -e \"\.\[notebooks,dev\]\"", makefile)
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCK\)", makefile, re.MULTILINE)  # a new lock reinstalls


def test_the_lock_leaves_out_a_release_an_older_supported_python_cannot_install(monkeypatch):
    """soupsieve 4.1 needs Python 3.11.5: pinned, it would break every install on Debian 12's 3.11.2."""
    lock = _lock_module()
    monkeypatch.setattr(lock.metadata, "metadata", lambda name: ({"Requires-Python": {
        "soupsieve": ">=3.11.5", "numpy": ">=3.11", "old": ">=3.8,<3.12"}.get(name)}))
    assert lock.needs_newer_python("soupsieve") == ">=3.11.5"
    assert lock.needs_newer_python("old") == ">=3.8,<3.12"
    assert lock.needs_newer_python("numpy") is None
    assert lock.needs_newer_python("no-requirement") is None


def test_this_venv_is_the_locked_set():
    """The suite ran on exactly the versions a fresh install gets (CI installs .venv/ with the lock)."""
    import sys

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"the lock describes the Makefile's .venv/; this interpreter is {sys.prefix}")
    if not (ROOT / ".venv" / ".mmrag-installed").exists():
        pytest.skip(".venv/ was not made by make")
    lock = _lock_module()
    current = {n: v for n, v in lock.installed_closure().items() if not lock.needs_newer_python(n)}
    python = ".".join(map(str, sys.version_info[:2]))
    assert lock.differences(current, lock.read_lock_entries(), python, lock.lock_python()) == []


def test_make_lock_keeps_the_pins_only_another_python_installs(tmp_path, monkeypatch):
    """papermill needs aiohttp on Python 3.12 only: a lock written on 3.11 left aiohttp unpinned there, and the
    3.12 .venv failed the check above. Each Python's `make lock` keeps the other Pythons' pins, marked with theirs."""
    lock = _lock_module()
    path = tmp_path / "constraints.txt"
    monkeypatch.setattr(lock, "LOCK", path)
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    monkeypatch.setattr(lock, "needs_newer_python", lambda name: None)
    monkeypatch.setattr(lock.sys, "version_info", (3, 12, 1))
    path.write_text(lock.HEADER.format(python="3.11", left_out="") + "numpy==2.0.0\noverrides==7.7.0\n")
    monkeypatch.setattr(lock, "installed_closure", lambda: {"aiohttp": "3.14.5", "numpy": "2.0.0"})
    assert lock.main([]) == 0  # make lock on 3.12
    assert lock.read_lock_entries(path) == {"aiohttp": ("3.14.5", None), "numpy": ("2.0.0", None),
                                            "overrides": ("7.7.0", "3.11")}
    assert lock.main(["--check"]) == 0
    monkeypatch.setattr(lock.sys, "version_info", (3, 11, 7))
    monkeypatch.setattr(lock, "installed_closure", lambda: {"numpy": "2.0.0", "overrides": "7.7.0"})
    assert lock.main(["--check"]) == 0  # 3.11 installs overrides at its pin and leaves 3.12's aiohttp alone
    assert lock.main([]) == 0  # make lock on 3.11
    entries = lock.read_lock_entries(path)
    assert entries == {"aiohttp": ("3.14.5", "3.12"), "numpy": ("2.0.0", None), "overrides": ("7.7.0", None)}
    assert lock.lock_python(path) == "3.11" and lock.read_lock(path)["aiohttp"] == "3.14.5"
    assert lock.main(["--check"]) == 0
    # 3.12 reads the unmarked overrides as the writer's (3.11's); a pin its writer no longer installs is stale
    assert lock.differences({"numpy": "2.0.0", "aiohttp": "3.14.5"}, entries, "3.12", "3.11") == []
    assert lock.differences({"numpy": "2.0.0"}, entries, "3.11", "3.11") == ["overrides: locked 7.7.0, installed -"]
    assert lock.differences({"numpy": "2.1.0"}, entries, "3.11", "3.11") == [
        "numpy: locked 2.0.0, installed 2.1.0", "overrides: locked 7.7.0, installed -"]
    assert lock.differences({"numpy": "2.0.0"}, entries, "3.12", "3.11") == ["aiohttp: locked 3.14.5, installed -"]
    monkeypatch.setattr(lock, "installed_closure", lambda: {"numpy": "2.0.0"})
    assert lock.main([]) == 0  # the next make lock on the Python that claimed it drops it
    assert lock.read_lock_entries(path) == {"aiohttp": ("3.14.5", "3.12"), "numpy": ("2.0.0", None)}
