"""Two-stage inference: score every candidate, keep the top-k, then reason, rank and answer over them.

The paper's inference path, restated:

1. **Stage 1 (point-wise, coarse).** The judge sees (question, one candidate) and gives P(relevant);
   cost grows linearly with the pool, so it is cheap to run on every candidate.
2. **Top-k.** Only the ``k`` best-scored candidates go on (``preset.stage1.k``).
3. **Stage 2 (list-wise, fine).** The reasoner sees the question and the k survivors together behind short
   ids ``D1..Dk``, writes its reasoning (``<think>``, the explanation), selects/ranks the supporting ids
   (``<sources>``) and answers (``<answer>``). Short ids are mapped back to WebQA ids for the submission.

The evaluation compares *systems* that differ only in how candidates are chosen and which weights answer
(``SystemSpec``): zero-shot base model, stage 1 only, stage 1 + stage 2, and an *oracle filter*: a perfect stage 1
whose top-k always holds every gold candidate, padded with the best-scored distractors to the same k and shown in
the same stage-1 score order. It changes only *which* documents survive, never how many or in what order, so it
measures the ceiling better retrieval could buy for the stage 2 we trained (on lists of exactly k). Showing stage 2
only the one or two gold documents would not: it never saw such short lists, and its slot habits (say, citing
``D3``) would cite nothing there.

Adapters are tied to the base weights they were trained on: ``ModelBank`` refuses an adapter whose
``adapter_config.json`` names another base (LoRA deltas on other weights are noise), and saved stage-1 scores are
reused only for the judge identity (adapter content + base + rendering) that wrote them (``judge_identity``).

Prompts are never truncated: a stage-2 prompt longer than ``preset.answer_prompt_tokens`` (``evaluation.max_prompt_tokens``,
else ``stage2.max_prompt_tokens``) loses its lowest-ranked candidates (whole documents, images included) until it
fits, and the result says so.
Cutting tokens would slice through an image's placeholder tokens and break the vision features.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from mmrag_lite import prompts
from mmrag_lite.atomic import write_json_atomic
from mmrag_lite.config import Preset
from mmrag_lite.data import one_split, pool_field
from mmrag_lite.metrics import top_k_ids

Row = Mapping[str, Any]  # one Mini-WebQA row (docs/CONTRACTS.md)
FilterKind = Literal["all", "base", "stage1", "oracle"]
ModelKind = Literal["base", "stage1", "stage2"]


# ------------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class SystemSpec:
    """One inference system: how candidates reach stage 2 and which weights write the answer.

    ``filter``: ``all`` shows every candidate (no stage 1), ``base``/``stage1`` keep the top-k by the base /
    stage-1 judge's P(yes), ``oracle`` is a perfect stage-1 filter (every gold candidate plus the stage-1 judge's
    best-scored distractors up to k, in score order: ``oracle_ids``). ``answerer``: the weights that write the
    stage-2 completion. ``k``/``reasoning`` default to the preset's values when None.
    """

    name: str
    filter: FilterKind
    answerer: ModelKind
    k: int | None = None
    reasoning: bool | None = None
    description: str = ""

    def __post_init__(self) -> None:  # a typo would otherwise answer over the pool's first k, unscored
        for field, value, allowed in (("filter", self.filter, get_args(FilterKind)),
                                      ("answerer", self.answerer, get_args(ModelKind))):
            if value not in allowed:
                raise ValueError(f"system {self.name!r}: {field} {value!r} is not one of {', '.join(allowed)}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"system {self.name!r}: k must be at least 1 (got {self.k})")

    def resolved_k(self, preset: Preset) -> int:
        return int(self.k if self.k is not None else preset.stage1.k)

    def resolved_reasoning(self, preset: Preset) -> bool:
        return bool(self.reasoning if self.reasoning is not None else preset.stage2.reasoning)


ORACLE_SYSTEM = "oracle filter (gold in top-k)"
# Which judge's P(yes) each filtering kind ranks by (the oracle pads the gold with the stage-1 judge's best distractors).
FILTER_JUDGE: dict[str, ModelKind] = {"base": "base", "stage1": "stage1", "oracle": "stage1"}


def standard_systems(preset: Preset) -> list[SystemSpec]:
    """The systems of the results table: zero-shot (all candidates, or the base judge's top-k), stage 1 only,
    stage 1 + stage 2, and the oracle filter (gold guaranteed in the stage-1 top-k).

    "stage 1 only" answers with the weights stage 2 *starts from* (``preset.stage2.init_from``), so the gap to
    "stage 1 + stage 2" is exactly what stage-2 RL added, and the gap to zero-shot is what filtering added.
    """
    start: ModelKind = "stage1" if preset.stage2.init_from == "stage1" else "base"
    return [
        SystemSpec("zero-shot", "all", "base", description="base model, no adapters, every candidate shown"),
        SystemSpec("zero-shot, base top-k", "base", "base", description="base model judges and answers, no adapters: top-k by its own P(yes)"),
        SystemSpec("stage 1 only", "stage1", start, description=f"stage-1 top-k, answered by the {start} weights (no stage-2 RL)"),
        SystemSpec("stage 1 + stage 2", "stage1", "stage2", description="stage-1 top-k, stage-2 reasoner (the full method)"),
        SystemSpec(ORACLE_SYSTEM, "oracle", "stage2",
                   description="perfect stage-1 filter (every gold in the top-k, padded to k by stage-1 score), stage-2 "
                               "reasoner: the ceiling of better retrieval"),
    ]


@dataclass(frozen=True)
class PipelineResult:
    """What the pipeline did for one question; ``to_dict()`` is plain JSON.

    ``kept_ids`` is in prompt order, so the short id ``D{i}`` is ``kept_ids[i-1]``. ``scores`` holds the stage-1
    P(yes) of every candidate that was scored (empty when the system does not score). ``reasoning`` is the
    ``<think>`` text: the explanation the paper is about.
    """

    guid: str
    question: str
    system: str
    scores: dict[str, float]
    kept_ids: tuple[str, ...]
    reasoning: str
    completion: str
    sources: tuple[str, ...]
    answer: str
    problems: tuple[str, ...] = ()
    short_sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("kept_ids", "sources", "problems", "short_sources"):
            d[key] = [str(v) for v in d[key]]  # ids as strings both ways (numpy ints are no JSON)
        d["scores"] = {k: (None if v is None or math.isnan(float(v)) else float(v)) for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineResult:
        return cls(
            guid=str(d["guid"]), question=str(d.get("question", "")), system=str(d.get("system", "")),
            scores={str(k): (float("nan") if v is None else float(v)) for k, v in dict(d.get("scores", {})).items()},
            kept_ids=tuple(str(i) for i in d.get("kept_ids", ())), reasoning=str(d.get("reasoning", "")),
            completion=str(d.get("completion", "")), sources=tuple(str(s) for s in d.get("sources", ())),
            answer=str(d.get("answer", "")), problems=tuple(str(p) for p in d.get("problems", ())),
            short_sources=tuple(str(s) for s in d.get("short_sources", ())),
        )


@dataclass(frozen=True)
class Stage2Request:
    """A rendered stage-2 prompt: messages, images in placeholder order, and the id mapping."""

    guid: str
    question: str
    messages: list[dict[str, Any]]
    images: list[Any]
    short_ids: tuple[str, ...]
    source_ids: tuple[str, ...]
    notes: tuple[str, ...] = ()
    prompt_tokens: int | None = None  # rendered length, image placeholders expanded (``fit_prompt`` measures it)


# -------------------------------------------------------------------------------- pure building blocks
def _pool_gold(row: Row) -> set[str]:
    """The row's gold ids that its pool holds (``gold_ids``, else the candidates marked ``is_gold``): a gold source
    missing from the pool cannot be shown, and must not shorten the oracle's list either."""
    gold = {str(g) for g in (row.get("gold_ids") or [c["id"] for c in row["candidates"] if c.get("is_gold")])}
    return gold & {str(c["id"]) for c in row["candidates"]}


def oracle_ids(row: Row, scores: Mapping[str, float] | None, k: int) -> list[str]:
    """A perfect stage-1 filter's top-k (pure): every gold candidate, padded with the best-scored distractors to k.

    The kept ids come in stage-1 score order, exactly as ``top_k_ids`` orders the real filter's, so the oracle row
    differs from "stage 1 + stage 2" only in *which* documents survive: same list length (the one stage 2 was
    trained on), same ordering rule. With more gold candidates than k, all of them are kept (the guarantee wins).
    ``scores`` may be None only when no padding is needed (at least k gold candidates): then pool order.
    """
    ids = [str(c["id"]) for c in row["candidates"]]
    gold = _pool_gold(row)
    n_pad = max(0, k - len(gold))
    if scores is None:
        if n_pad and any(i not in gold for i in ids):
            raise ValueError("the oracle filter pads the gold candidates to k with the best-scored distractors, "
                             "but no stage-1 scores were given")
        ranked = ids
    else:
        ranked = top_k_ids(scores, len(ids), ids)
    keep = gold | set([i for i in ranked if i not in gold][:n_pad])
    return [i for i in ranked if i in keep]


def select_candidates(row: Row, spec: SystemSpec, scores: Mapping[str, float] | None, k: int) -> list[dict[str, Any]]:
    """Candidates shown to stage 2, best first, for one system (pure).

    ``all`` keeps the pool order (no ranking exists); ``oracle`` is ``oracle_ids`` (gold guaranteed, padded to k).
    """
    cands = [dict(c) for c in row["candidates"]]
    ids = [str(c["id"]) for c in cands]
    if len(set(ids)) != len(ids):  # scores, kept ids and citations are keyed by id: a repeat would show one twice
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"question {row.get('guid')!r}: candidate ids must be unique, repeated: {repeated}")
    if spec.filter == "all":
        return cands
    if spec.filter == "oracle":
        by_id = {str(c["id"]): c for c in cands}
        return [by_id[i] for i in oracle_ids(row, scores, k)]
    if scores is None or (cands and not any(c["id"] in scores for c in cands)):  # {} would keep the first k
        raise ValueError(f"system {spec.name!r} filters by {spec.filter} scores but none were given for question "
                         f"{row.get('guid')!r}")
    by_id = {c["id"]: c for c in cands}
    return [by_id[i] for i in top_k_ids(scores, k, [c["id"] for c in cands])]


def build_request(row: Row, candidates: Sequence[Mapping[str, Any]], *, reasoning: bool, image_fn: Callable[[Any], Any] | None = None) -> Stage2Request:
    """Render the stage-2 prompt for one question over the given candidates (pure apart from image resizing)."""
    cands = [dict(c) for c in candidates]
    if image_fn is not None:
        for c in cands:
            if c.get("modality") == "image" and c.get("image") is not None:
                c["image"] = image_fn(c["image"])
    return Stage2Request(
        guid=str(row["guid"]), question=str(row["question"]),
        messages=prompts.stage2_messages(row["question"], cands, reasoning=reasoning),
        images=prompts.stage2_images(cands),
        short_ids=tuple(prompts.short_ids(len(cands))), source_ids=tuple(c["id"] for c in cands),
    )


def map_short_ids(short: Sequence[str], request: Stage2Request) -> tuple[str, ...]:
    """Short ids (``D2``) back to WebQA ids; unknown short ids are dropped (the parser already flagged them)."""
    table = dict(zip(request.short_ids, request.source_ids))
    out: list[str] = []
    for s in short:
        if s in table and table[s] not in out:
            out.append(table[s])
    return tuple(out)


def parse_completion(completion: str, request: Stage2Request, *, reasoning: bool) -> tuple[str, tuple[str, ...], tuple[str, ...], str, tuple[str, ...]]:
    """(think, short ids, WebQA ids, answer, problems) for one completion."""
    from mmrag_lite import parsing

    parsed = parsing.parse_stage2(completion, list(request.short_ids), reasoning=reasoning)
    short = tuple(parsed.source_ids or ())
    return (parsed.think or "", short, map_short_ids(short, request), (parsed.answer or "").strip(),
            tuple(str(p) for p in parsed.problems))


# ------------------------------------------------------------------------------------------ submission
def submission_from_results(results: Iterable[PipelineResult]) -> dict[str, dict[str, Any]]:
    """WebQA submission: ``{guid: {"sources": [...], "answer": "..."}}``; image ids become ints as in WebQA."""
    sub: dict[str, dict[str, Any]] = {}
    for r in results:
        sub[r.guid] = {"sources": [_webqa_id(s) for s in r.sources], "answer": r.answer}
    return sub


def _webqa_id(source_id: str) -> int | str:
    """WebQA writes image ids as ints; only a plain ASCII number that reads back the same becomes one ("0123" and
    "²" stay strings, so they still match their gold and never crash ``int``)."""
    s = str(source_id)
    return int(s) if s.isascii() and s.isdigit() and str(int(s)) == s else s


def write_submission(results: Iterable[PipelineResult], path: str | Path) -> Path:
    """Write a WebQA-style submission file atomically and return its path."""
    return write_json_atomic(path, submission_from_results(results))


def save_results(results: Iterable[PipelineResult], path: str | Path) -> Path:
    """Every field of every result, as JSON (what the reasoning viewer and the eval report read back)."""
    return write_json_atomic(path, [r.to_dict() for r in results])


def load_results(path: str | Path) -> list[PipelineResult]:
    return [PipelineResult.from_dict(d) for d in json.loads(Path(path).read_text(encoding="utf-8"))]


# ------------------------------------------------------------------------------------------ models
class AdapterBaseMismatch(ValueError):
    """An adapter was trained on other base weights than the ones this bank loads (its deltas would be noise)."""


class MissingAdapter(FileNotFoundError):
    """A hub-model bank was asked for an adapter that is not there (``ModelBank(allow_missing_adapters=True)``
    falls back to the base model instead)."""


def base_key(name: str | Path) -> str:
    """How two base-model references are compared: a local folder by its resolved path, a hub id as written."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith(".") or path.exists():
        return str(path.resolve())
    return text


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on (``base_model_name_or_path`` of its ``adapter_config.json``), or
    None when it records none (PEFT cannot load such a folder anyway, and says so)."""
    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.is_file():
        return None
    recorded = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return str(recorded) if recorded else None


def preset_base_model(preset: Preset) -> str:
    """The base weights a preset loads: its hub id, or the miniature's cache folder (``modeling.tiny_model_dir``,
    named by a hash of everything that shapes it, so a rebuilt miniature is another folder)."""
    if preset.model.is_miniature:
        from mmrag_lite import modeling

        return str(modeling.tiny_model_dir(warm=True, preset=preset))
    return str(preset.model.model_id)


def adapter_fingerprint(adapter: str | Path) -> str:
    """sha256 of an adapter's own files (``adapter_*``: config and weights): its identity wherever it is copied."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(adapter).glob("adapter_*")):
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _adapter_stamp(adapter: Path | None) -> tuple[tuple[str, int, int], ...] | None:
    """Name, size and modification time of an adapter's own files: a cheap test that it changed (hashing a 3B's rank-64
    LoRA, ~0.5 GB, at every ``ModelBank.get`` would not be)."""
    if adapter is None:
        return None
    return tuple((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in sorted(adapter.glob("adapter_*")) if f.is_file())


def judge_identity(preset: Preset, adapter: str | Path | None, *, base_model: str | Path | None = None) -> dict[str, Any]:
    """What a stage-1 score depends on: the judge's adapter (content, not file times), the base under it, and how
    the model sees a candidate (``rendering``: image size and pixel budget, 4-bit or not, compute dtype).

    Writers of ``stage1/scores_<split>.json`` store it as ``meta["judge"]``; ``reusable_scores`` reuses a file only
    while it still matches, so a retrained adapter, a rebuilt base or another image size recomputes the scores
    instead of reusing them (a hub base is only its id: ``colab-t4`` and ``l4`` share it at different image sizes).
    """
    base = base_key(base_model if base_model is not None else preset_base_model(preset))
    m = preset.model
    rendering = {"image_size": m.image_size, "min_pixels": m.min_pixels, "max_pixels": m.max_pixels,
                 "load_in_4bit": m.load_in_4bit, "compute_dtype": m.compute_dtype}
    if adapter is None:
        return {"adapter": None, "adapter_sha256": None, "base": base, "rendering": rendering}
    return {"adapter": str(Path(adapter).resolve()), "adapter_sha256": adapter_fingerprint(adapter), "base": base,
            "rendering": rendering}


def save_stage1_scores(scored: Any, preset: Preset, work_dir: str | Path, split: str, adapter: str | Path | None, *,
                       base_model: str | Path | None = None) -> Path:
    """Write a run's ``stage1/scores_<split>.json`` with the judge that computed them (``meta["judge"]``).

    The one writer notebooks 03/04 and the CLI share, so ``reusable_scores`` can tell stale scores from current ones.
    """
    from mmrag_lite import scoring

    meta = {"preset": preset.name, "split": split, "judge": judge_identity(preset, adapter, base_model=base_model)}
    return scoring.save_scores(scored, scoring.scores_path(work_dir, split), meta=meta)


def _same_judge(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two judge identities agree on the adapter's content, the base and the rendering (paths may differ: a run
    folder moves); a file written before the rendering was recorded lacks it, and is scored again."""
    base_a, base_b = a.get("base"), b.get("base")
    return (a.get("adapter_sha256") == b.get("adapter_sha256") and base_a is not None and base_b is not None
            and base_key(base_a) == base_key(base_b) and a.get("rendering") is not None
            and a.get("rendering") == b.get("rendering"))


class SharedWeights:
    """One weight set (``adapter`` None: the base) of a ``ModelBank``'s single base model, on which every adapter is
    loaded by name. Each forward pass and ``generate`` call first switches that adapter on (or every adapter off), so
    views of one model never see each other's LoRA. Reading any other attribute reads the model's; setting one sets
    it on the view only, and ``.model`` is the shared model itself, with whichever adapter was switched on last."""

    def __init__(self, shared: list[Any], adapter: str | None) -> None:
        self._shared = shared  # the bank's [model, processor]: the model object changes when the first adapter loads
        self.adapter = adapter

    @property
    def model(self) -> Any:
        return self._shared[0]

    @contextlib.contextmanager
    def _switched(self) -> Iterator[None]:
        from peft import PeftModel

        model = self.model
        if not isinstance(model, PeftModel):  # no adapter loaded yet: the plain base
            yield
        elif self.adapter is None:
            try:
                with model.disable_adapter():
                    yield
            finally:  # leaving disable_adapter() marks the active adapter trainable again: inference needs no grads
                model.requires_grad_(False)
        else:
            model.set_adapter(self.adapter, inference_mode=True)  # inference_mode: its weights stay frozen
            yield

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._switched():
            return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._switched():
            return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # not set yet (copy, unpickling): never recurse through ``model``
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"SharedWeights({self.adapter or 'base'} of {type(self.model).__name__})"


class ModelBank:
    """Loads (model, processor) per weight set lazily and keeps them, so the systems load each at most once.

    ``base`` is the base model; ``stage1``/``stage2`` attach the adapter saved by notebook 03/04 in ``work_dir``.
    With the default loader the three share ONE base model (the adapters are loaded into it by name, and
    ``SharedWeights`` switches between them per call): a GPU holds one 4-bit copy, not three. A custom ``loader``
    is called once per weight set instead.
    A missing adapter is an error (``MissingAdapter``) for a preset that loads a hub model: on Colab each notebook
    gets a fresh runtime, and a run folder left on another machine (not on Drive, ``MMRAG_HOME``) would otherwise
    make notebooks 04/05 spend hours on the base model. ``allow_missing_adapters=True`` (the default for the offline
    miniature, where it costs seconds) falls back to the base weights with a printed note (recorded in ``notes``),
    so a student who skipped a notebook still gets a table, clearly labelled. An adapter trained on *other* base weights (its
    ``adapter_config.json`` names another base, e.g. a miniature rebuilt since) is an error, not a note: its LoRA
    deltas would be applied to weights they were never trained against. ``base_model`` (a local folder or hub id)
    overrides the preset's base, e.g. to evaluate adapters against the base they were trained on.
    """

    def __init__(self, preset: Preset, work_dir: str | Path, *, loader: Callable[..., tuple[Any, Any]] | None = None,
                 adapters: Mapping[str, str | Path | None] | None = None, verbose: bool = True,
                 base_model: str | Path | None = None, allow_missing_adapters: bool | None = None) -> None:
        self.preset = preset
        self.work_dir = Path(work_dir)
        # None: the miniature falls back (the course relies on it), a hub model refuses
        self.allow_missing_adapters = (preset.model.is_miniature if allow_missing_adapters is None
                                       else bool(allow_missing_adapters))
        self._loader = loader
        self._adapters = dict(adapters or {})
        self._base_model = None if base_model is None else str(base_model)
        self._base_cache: str | None = None
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._stamps: dict[str, tuple[tuple[str, int, int], ...] | None] = {}  # each loaded adapter's files, as loaded
        self._shared: list[Any] = []  # [model, processor] that the default loader's weight sets share (filled in place)
        self.notes: list[str] = []
        self.verbose = verbose

    def adapter_path(self, which: ModelKind) -> Path | None:
        """Where ``which``'s adapter is (None for base or when it was never trained: no ``adapter_config.json``)."""
        if which == "base":
            return None
        path = Path(self._adapters[which]) if self._adapters.get(which) else self.work_dir / which / "adapter"
        from mmrag_lite.training import is_adapter_dir

        return path if is_adapter_dir(path) else None

    def base_model(self) -> str:
        """The base weights this bank loads: ``base_model`` when given, else the preset's (``preset_base_model``)."""
        if self._base_cache is None:
            self._base_cache = self._base_model if self._base_model is not None else preset_base_model(self.preset)
        return self._base_cache

    def check_adapter(self, which: ModelKind) -> None:
        """Raise ``AdapterBaseMismatch`` when ``which``'s adapter was trained on another base than ``base_model()``."""
        path = self.adapter_path(which)
        recorded = adapter_base(path) if path is not None else None
        if recorded is None:
            return
        base = self.base_model()
        if base_key(recorded) != base_key(base):
            raise AdapterBaseMismatch(
                f"the {which} adapter in {path} was trained on the base model {recorded!r}, but this run loads "
                f"{base!r}" + (" (the miniature was rebuilt since: its build or warm-up settings changed)"
                               if self.preset.model.is_miniature and self._base_model is None else "")
                + f". Its LoRA weights would be applied to weights they were never trained on. Retrain {which} "
                f"(notebook {'03' if which == 'stage1' else '04'}) against this base, or pass the matching base: "
                f"ModelBank(..., base_model={recorded!r}).")

    def judge_identity(self, which: ModelKind = "stage1") -> dict[str, Any]:
        """``judge_identity`` of the judge this bank would score with for ``which`` (checked against its base)."""
        self.check_adapter(which)
        return judge_identity(self.preset, self.adapter_path(which), base_model=self.base_model())

    def resolved(self, which: ModelKind) -> str:
        """What ``which`` really loads: ``stage2`` or ``base (stage2 adapter missing)``."""
        if which == "base" or self.adapter_path(which) is not None:
            return which
        return f"base ({which} adapter missing)"

    def unload(self) -> None:
        """Drop the loaded weight sets and free their memory; the next ``get`` loads again (adapters saved since too).

        For a notebook that trains next: the bank's 4-bit copy would otherwise sit beside the trainer's (about
        2.7 GiB on ``a100``). A view handed out earlier keeps working on the old copy while someone holds it."""
        from mmrag_lite.modeling import release_memory

        self._cache = {}
        self._shared = []  # replaced, not cleared: views from earlier ``get`` calls hold the old list
        release_memory()

    def require_adapters(self, kinds: Iterable[ModelKind]) -> None:
        """Refuse now, before hours of work, when an adapter a later ``get`` needs is missing and may not fall back."""
        for which in kinds:
            if which != "base" and self.adapter_path(which) is None and not self.allow_missing_adapters:
                raise self._missing(which)

    def _missing(self, which: ModelKind) -> MissingAdapter:
        where = self._adapters.get(which) or self.work_dir / which / "adapter"
        return MissingAdapter(
            f"no {which} adapter in {where} (no adapter_config.json there). Preset {self.preset.name!r} loads "
            f"{self.preset.model.model_id}, and the base model in its place would spend this notebook evaluating or "
            f"training the wrong model. Train it first (notebook {'03' if which == 'stage1' else '04'}), or point at "
            "the run folder that holds it: on Colab each notebook runs on a fresh machine, so the run folder must be "
            "on Google Drive (the notebooks' first cell puts it there unless keep_on_drive = False; elsewhere set "
            "os.environ['MMRAG_HOME'] to the folder that holds runs/ before importing mmrag_lite), or pass "
            f"work_dir= / ModelBank(..., adapters={{{which!r}: <adapter folder>}}). To use the base model on "
            "purpose: ModelBank(..., allow_missing_adapters=True) (--allow-untrained on the CLI).")

    def get(self, which: ModelKind) -> tuple[Any, Any]:
        key = self.resolved(which)
        if key.startswith("base"):
            key_cache = "base"
            if which != "base":
                where = self._adapters.get(which) or self.work_dir / which / "adapter"
                if not self.allow_missing_adapters:
                    raise self._missing(which)
                note = f"no {which} adapter in {where}: using the base model instead"
                if note not in self.notes:
                    self.notes.append(note)
                    if self.verbose:
                        print("note:", note)
        else:
            key_cache = which
            self.check_adapter(which)  # before loading: a mismatch fails fast, with what to do
        stamp = _adapter_stamp(self.adapter_path(which)) if key_cache != "base" else None
        if key_cache in self._cache and self._stamps.get(key_cache) != stamp:
            # retrained (or replaced) since it was loaded: the cached weights are not the ones on disk, whose identity
            # judge_identity reports; every set goes, as they share one base the old adapter is loaded into
            note = f"the {which} adapter changed on disk since it was loaded: loading it again"
            self.notes.append(note)
            if self.verbose:
                print("note:", note)
            self.unload()
        if key_cache not in self._cache:
            self._stamps[key_cache] = stamp
            extra = {} if self._base_model is None else {"model_path": self._base_model}
            adapter = None if key_cache == "base" else self.adapter_path(which)
            if self._loader is not None:
                self._cache[key_cache] = self._loader(self.preset, adapter_path=adapter, **extra)
            else:
                self._cache[key_cache] = self._share(key_cache, adapter, extra)
        return self._cache[key_cache]

    def _share(self, key: str, adapter: Path | None, extra: Mapping[str, Any]) -> tuple[SharedWeights, Any]:
        """Load the shared base once, then each adapter into it under its weight set's name."""
        if not self._shared:  # in place: the views hold this list (not the bank, so ``del bank`` frees the model)
            self._shared.extend(_default_loader(self.preset, adapter_path=None, **extra))
        if adapter is not None:
            from peft import PeftModel

            model = self._shared[0]
            if isinstance(model, PeftModel):
                model.load_adapter(str(adapter), adapter_name=key, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, str(adapter), adapter_name=key, is_trainable=False)
                self._shared[0] = model
            model.eval()
            model.requires_grad_(False)
        return SharedWeights(self._shared, None if adapter is None else key), self._shared[1]


def _default_loader(preset: Preset, *, adapter_path: Path | None, model_path: str | Path | None = None) -> tuple[Any, Any]:
    from mmrag_lite import modeling

    model, processor = modeling.load_model_and_processor(preset, adapter_path=adapter_path, for_training=False,
                                                         model_path=model_path)
    model.eval()
    return model, processor


def image_fn(preset: Preset) -> Callable[[Any], Any]:
    """Resize images to the preset's fixed size (fixed token count per image; the mRoPE trap in docs/modeling.md).

    Pass it to ``build_request`` / ``fit_prompt`` to render a prompt exactly as ``run_pipeline`` does."""
    from mmrag_lite import modeling

    return lambda img: modeling.prepare_image(img, preset)


# ------------------------------------------------------------------------------------------ scoring
def score_rows(model: Any, processor: Any, rows: Sequence[Row], preset: Preset, *, progress: bool = False) -> dict[str, dict[str, float]]:
    """``{guid: {candidate id: P(yes)}}`` for many questions (``scoring.score_split``: pairs share batches)."""
    from mmrag_lite import scoring

    return _as_lookup(scoring.score_split(model, processor, rows, preset, progress=progress))


def _as_lookup(scored: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    return {str(guid): {str(cid): float(s) for cid, s in pairs} for guid, pairs in scored.items()}


def load_cached_scores(work_dir: str | Path, split: str) -> dict[str, dict[str, float]]:
    """Stage-1 scores notebook 03 saved for ``split`` (``{guid: {candidate id: score}}``), or ``{}`` when there are
    none readable (no file, an older layout, a damaged file: score the split again)."""
    return _as_lookup(_read_saved_scores(work_dir, split)[0])


def _read_saved_scores(work_dir: str | Path, split: str) -> tuple[Any, dict[str, Any]]:
    """(scores, meta) of a run's ``stage1/scores_<split>.json``; ``({}, {})`` without a readable one (no file, an
    older layout, a damaged file): the caller scores again, never guesses."""
    from mmrag_lite import scoring

    path = scoring.scores_path(work_dir, split)
    if not path.is_file():
        return {}, {}
    try:
        return scoring.load_scores_and_meta(path)
    except (ValueError, KeyError, TypeError):
        return {}, {}


def _own_stage1_judge(bank: ModelBank) -> Path | None:
    """The run's own ``stage1/adapter`` when it is the bank's stage-1 filter (the judge of ``stage1/scores_*``)."""
    used = bank.adapter_path("stage1")
    return used if used is not None and used.resolve() == (bank.work_dir / "stage1" / "adapter").resolve() else None


def reusable_scores(bank: ModelBank, split: str) -> dict[str, dict[str, float]]:
    """The saved stage-1 scores of ``split`` when they are the filter ``bank`` would compute, else ``{}``.

    They are the run's own ``stage1/adapter``'s, so they count only when the bank filters with that adapter (not with
    one passed in ``adapters``), and only while the judge the file records (``meta["judge"]``, see
    ``judge_identity``) still matches the adapter's content, the base and the rendering; a file that records no judge
    (or, written before the rendering was recorded, no rendering) is recomputed,
    never trusted. An adapter trained on another base raises ``AdapterBaseMismatch`` here, before any score is read.
    """
    from mmrag_lite import scoring

    path = scoring.scores_path(bank.work_dir, split)
    if _own_stage1_judge(bank) is None or not path.is_file():
        return {}
    bank.check_adapter("stage1")
    scored, meta = _read_saved_scores(bank.work_dir, split)
    recorded = meta.get("judge")
    if isinstance(recorded, Mapping) and _same_judge(recorded, bank.judge_identity("stage1")):
        return _as_lookup(scored)
    note = f"{path} was scored by another (or an unrecorded) stage-1 judge: recomputing its scores"
    if note not in bank.notes:
        bank.notes.append(note)
        if bank.verbose:
            print("note:", note)
    return {}


def _pool_ids(split_ds: Any, n: int | None) -> dict[str, set[str]]:
    """``{guid: candidate ids}`` of the first ``n`` questions of a split (all for None), no image decoded."""
    return {guid: {str(i) for i in ids} for guid, ids in pool_field(split_ds, "id", n)}


def ensure_stage1_scores(bank: ModelBank, split_ds: Any, split: str) -> Path:
    """The run's ``stage1/scores_<split>.json``, brought up to date: kept while ``reusable_scores`` accepts it and it
    covers the questions the run reads (``scoring.questions_to_score``), else scored again with the bank's stage-1
    judge. The one refresher notebook 04 and ``train-stage2`` share."""
    from mmrag_lite import scoring

    judge_adapter = _own_stage1_judge(bank)
    if judge_adapter is None:
        raise ValueError(f"the run's stage-1 scores are its own judge's: {bank.work_dir / 'stage1' / 'adapter'} holds "
                         f"no adapter, or the bank filters with another ({bank.adapter_path('stage1')}); train stage 1 "
                         "in this run folder first")
    n = scoring.questions_to_score(bank.preset, split)
    pools = _pool_ids(split_ds, n)
    path = scoring.scores_path(bank.work_dir, split)
    current = reusable_scores(bank, split)
    # the same questions and the same pools: a rebuilt Mini-WebQA (say, another data.max_candidates) keeps the guids
    if current and all(g in current and set(current[g]) == ids for g, ids in pools.items()):
        return path
    judge, processor = bank.get("stage1")
    scored = scoring.score_split(judge, processor, split_ds, bank.preset, max_questions=n, progress=bank.verbose)
    path = save_stage1_scores(scored, bank.preset, bank.work_dir, split, judge_adapter, base_model=bank.base_model())
    if bank.verbose:
        print(f"stage-1 scores for {split} ({len(scored)} questions, judge {judge_adapter}): {path}")
    return path


# ------------------------------------------------------------------------------------------ generation
def fit_prompt(row: Row, candidates: Sequence[Mapping[str, Any]], processor: Any, *, reasoning: bool, max_tokens: int,
               image_fn: Callable[[Any], Any] | None = None, keep: Collection[str] = ()) -> Stage2Request:
    """The stage-2 request with as many of the (best-first) candidates as fit in ``max_tokens``, in their order.

    Whole candidates are dropped from the end (the lowest-ranked) — never tokens — so image placeholders stay
    intact; the ids in ``keep`` go last (the oracle's gold, which it promises to show, as training's shrinking drops
    distractors first). How many to drop is found by bisection: a handful of processor calls, whatever the pool size.
    """
    cands = list(candidates)
    full = build_request(row, cands, reasoning=reasoning, image_fn=image_fn)
    n_full = prompt_length(processor, full)
    if n_full <= max_tokens or len(cands) <= 1:
        notes = () if n_full <= max_tokens else (f"prompt {n_full} > {max_tokens} tokens with one candidate; sent whole (never truncated)",)
        return replace(full, notes=notes, prompt_tokens=n_full)
    last_first = list(reversed(range(len(cands))))
    drop_order = [i for i in last_first if str(cands[i]["id"]) not in keep] + [i for i in last_first if str(cands[i]["id"]) in keep]

    def shown(n: int) -> list[Mapping[str, Any]]:  # the n candidates left after dropping in drop_order, in order
        gone = set(drop_order[:len(cands) - n])
        return [c for i, c in enumerate(cands) if i not in gone]

    lo, hi = 1, len(cands) - 1  # invariant: the answer is in [lo, hi] or 1 if even lo does not fit
    best: Stage2Request | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        req = build_request(row, shown(mid), reasoning=reasoning, image_fn=image_fn)
        if (n := prompt_length(processor, req)) <= max_tokens:
            best, lo = replace(req, prompt_tokens=n), mid + 1
        else:
            hi = mid - 1
    still_over = best is None
    if best is None:
        best = build_request(row, shown(1), reasoning=reasoning, image_fn=image_fn)
        best = replace(best, prompt_tokens=prompt_length(processor, best))
    dropped = [c["id"] for c in cands if c["id"] not in best.source_ids]
    which = "lowest-ranked candidate(s)" if not keep else "candidate(s), lowest-ranked distractors first,"
    note = f"prompt too long: dropped {len(dropped)} {which} {dropped} to fit {max_tokens} tokens"
    if still_over:
        note += "; still over with one candidate, sent whole (never truncated)"
    return replace(best, notes=(note,))


def _encode(processor: Any, requests: Sequence[Stage2Request]) -> Any:
    from mmrag_lite.modeling import encode_prompts

    texts = [processor.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in requests]
    return encode_prompts(processor, texts, [r.images for r in requests])


def prompt_length(processor: Any, request: Stage2Request) -> int:
    """Tokens of the rendered prompt, image placeholders expanded (what the model really reads)."""
    from mmrag_lite.modeling import prompt_token_count

    return prompt_token_count(processor, request.messages, request.images)


def token_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int = 0) -> list[list[int]]:
    """Consecutive index batches of at most ``batch_size`` prompts whose padded size (prompts x the longest) stays
    within ``max_batch_tokens`` (0: no cap). A prompt longer than the cap gets a call of its own."""
    if batch_size < 1 or max_batch_tokens < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and max_batch_tokens={max_batch_tokens} >= 0 (0: no cap)")
    batches: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if batches and len(batches[-1]) < batch_size and (not max_batch_tokens or grown * (len(batches[-1]) + 1) <= max_batch_tokens):
            batches[-1].append(i)
            longest = grown
        else:
            batches.append([i])
            longest = n
    return batches


def generate(model: Any, processor: Any, requests: Sequence[Stage2Request], *, max_new_tokens: int, batch_size: int = 8,
             max_batch_tokens: int = 0, progress: bool = True, desc: str = "stage 2") -> list[str]:
    """Greedy completions for stage-2 requests, batched with left padding (decoder-only generation); with
    ``max_batch_tokens``, a call's padded prompt tokens stay within it (``token_batches``)."""
    import torch
    from tqdm.auto import tqdm

    from mmrag_lite.modeling import GREEDY_DECODING

    tok = getattr(processor, "tokenizer", processor)
    old_side = getattr(tok, "padding_side", "right")
    tok.padding_side = "left"
    outs: list[str] = []
    device = getattr(model, "device", torch.device("cpu"))
    try:
        lengths = [0] * len(requests)
        if max_batch_tokens:
            lengths = [r.prompt_tokens if r.prompt_tokens is not None else prompt_length(processor, r) for r in requests]
        batches = [[requests[i] for i in idx] for idx in token_batches(lengths, batch_size, max_batch_tokens)]
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = _encode(processor, batch).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=getattr(tok, "pad_token_id", None),
                                     **GREEDY_DECODING)
            new = gen[:, enc["input_ids"].shape[-1]:]
            outs.extend(processor.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return outs


# ------------------------------------------------------------------------------------------ the pipeline
def run_pipeline(rows: Sequence[Row] | Any, preset: Preset, *, system: SystemSpec | None = None, bank: ModelBank | None = None,
                 work_dir: str | Path | None = None, split: str | None = None,
                 scores: Mapping[str, Mapping[str, float]] | None = None, batch_size: int | None = None,
                 max_new_tokens: int | None = None, progress: bool = True) -> list[PipelineResult]:
    """Run one system over many questions: (stage-1 scores →) top-k → stage-2 generation → parse → WebQA ids.

    ``scores`` (``{guid: {id: P(yes)}}``) skips the stage-1 forward passes; otherwise, for the ``stage1`` and
    ``oracle`` filters the scores notebook 03 saved for ``split`` are reused when they are still the bank's filter
    (``reusable_scores``) and their candidate ids match, and recomputed if not.
    """

    if system is None:
        system = next(s for s in standard_systems(preset) if s.name == "stage 1 + stage 2")
    if bank is None:
        from mmrag_lite.config import work_dir as _wd

        bank = ModelBank(preset, _wd(preset, work_dir))
    rows = list(one_split(rows, "run_pipeline"))
    k = system.resolved_k(preset)
    reasoning = system.resolved_reasoning(preset)
    resize = image_fn(preset)
    cached: dict[str, dict[str, float]] = dict(scores or {})
    if not cached and FILTER_JUDGE.get(system.filter) == "stage1" and split:
        cached = reusable_scores(bank, split)

    # stage 1: score (only for filtering systems); pairs of all questions share forward passes
    all_scores: list[dict[str, float]] = [{} for _ in rows]
    if system.filter in FILTER_JUDGE:
        todo = []
        for i, row in enumerate(rows):
            hit = cached.get(str(row["guid"]))
            if hit is not None and set(hit) == {c["id"] for c in row["candidates"]}:
                all_scores[i] = dict(hit)
            else:
                todo.append(i)
        if todo:
            judge, judge_proc = bank.get(FILTER_JUDGE[system.filter])
            fresh = score_rows(judge, judge_proc, [rows[i] for i in todo], preset, progress=progress)
            for i in todo:
                all_scores[i] = fresh[str(rows[i]["guid"])]

    # stage 2: render within budget, generate in batches, parse
    model, processor = bank.get(system.answerer)
    requests = [
        fit_prompt(row, select_candidates(row, system, sc, k), processor, reasoning=reasoning,
                   max_tokens=preset.answer_prompt_tokens, image_fn=resize,
                   keep=_pool_gold(row) if system.filter == "oracle" else ())
        for row, sc in zip(rows, all_scores)
    ]
    budget = generation_kwargs(preset)
    budget.update({k: v for k, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)) if v})
    completions = generate(model, processor, requests, **budget, progress=progress, desc=f"stage 2 [{system.name}]")
    results: list[PipelineResult] = []
    for row, sc, req, comp in zip(rows, all_scores, requests, completions):
        think, short, sources, answer, problems = parse_completion(comp, req, reasoning=reasoning)
        results.append(PipelineResult(
            guid=str(row["guid"]), question=str(row["question"]), system=system.name, scores=sc,
            kept_ids=req.source_ids, reasoning=think, completion=comp, sources=sources, answer=answer,
            problems=tuple(req.notes) + problems, short_sources=short,
        ))
    return results


def default_batch_size(preset: Preset) -> int:
    """Prompts per ``generate`` call (``preset.evaluation.generation_batch_size``)."""
    return preset.evaluation.generation_batch_size


def generation_kwargs(preset: Preset) -> dict[str, int]:
    """``generate``'s budget and batching as the preset sets them for evaluation: ``generate(model, processor,
    requests, **generation_kwargs(preset))`` answers as ``run_pipeline`` does."""
    return {"max_new_tokens": preset.stage2.grpo.max_completion_length, "batch_size": default_batch_size(preset),
            "max_batch_tokens": preset.evaluation.generation_max_batch_tokens}


def answer_question(row: Row, preset: Preset, *, system: SystemSpec | None = None, bank: ModelBank | None = None,
                    work_dir: str | Path | None = None) -> PipelineResult:
    """The whole two-stage pipeline for one question. For several, pass one ``bank`` (else each call loads the
    models again) or call ``run_pipeline`` on the list: it batches the forward passes of all of them."""
    return run_pipeline([row], preset, system=system, bank=bank, work_dir=work_dir, progress=False)[0]


__all__ = [
    "FILTER_JUDGE",
    "ORACLE_SYSTEM",
    "AdapterBaseMismatch",
    "MissingAdapter",
    "ModelBank",
    "PipelineResult",
    "SharedWeights",
    "Stage2Request",
    "SystemSpec",
    "adapter_base",
    "adapter_fingerprint",
    "answer_question",
    "base_key",
    "build_request",
    "default_batch_size",
    "ensure_stage1_scores",
    "fit_prompt",
    "generate",
    "generation_kwargs",
    "image_fn",
    "judge_identity",
    "load_cached_scores",
    "load_results",
    "map_short_ids",
    "oracle_ids",
    "parse_completion",
    "preset_base_model",
    "prompt_length",
    "reusable_scores",
    "run_pipeline",
    "save_results",
    "save_stage1_scores",
    "score_rows",
    "select_candidates",
    "standard_systems",
    "submission_from_results",
    "token_batches",
    "top_k_ids",
    "write_submission",
]
