"""Where the stage-1 scorer reads its verdict on the REAL Qwen2 vocabulary, offline but for a package registry.

    .venv/bin/python benchmarks/check_real_qwen2_tokenizer.py            # downloads ~77 MB from PyPI once

The GPU presets' models (Qwen2-VL-2B, Qwen2.5-VL-3B) share Qwen2's byte-level BPE, and the hub is out of reach here.
But llama.cpp keeps a vocabulary-only GGUF of it with the token ids that Hugging Face's own tokenizer gives for 47
test strings (``models/ggml-vocab-qwen2.gguf`` + ``.inp`` / ``.out``), and the ``llama-cpp-python`` source package on
PyPI vendors that tree. This script fetches the package once (``pip download``, cached), extracts those three files,
loads the vocabulary with transformers' GGUF reader (needs ``gguf``, installed into the cache when missing), checks
it against the 47 reference strings, and then prints what the course's scorer does with it:

* how ``<answer>`` followed by each verdict spelling tokenises (the miniature cannot tell: its tags are added tokens);
* ``scoring.verdict_readout``: the prefill and the token ids it reads for yes and no;
* that real stage-1 prompts (the course's prompt under Qwen2-VL's chat template, text and image candidates) end
  with that prefill, as ``score_candidates`` checks at run time.

Qwen2-VL adds its vision tokens (``<|vision_start|>`` ...) to this vocabulary; they are added here as special tokens
(at other ids than the hub's, which no check below depends on). ``tests/test_scoring.py`` repeats the checks when the
cache is there (``MMRAG_QWEN2_VOCAB`` names another folder) and skips, saying how to fetch it, when it is not.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

SDIST = "llama-cpp-python==0.3.36"
GGUF = "ggml-vocab-qwen2.gguf"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def default_cache() -> Path:
    """``$MMRAG_QWEN2_VOCAB``, else ``~/.cache/mmrag-lite/qwen2-vocab``."""
    env = os.environ.get("MMRAG_QWEN2_VOCAB")
    return Path(env) if env else Path.home() / ".cache" / "mmrag-lite" / "qwen2-vocab"


def is_fetched(cache: Path) -> bool:
    return all((cache / f"{GGUF}{ext}").is_file() for ext in ("", ".inp", ".out"))


def fetch(cache: Path) -> Path:
    """The cache folder holding the GGUF and its reference files (downloaded and extracted the first time)."""
    if is_fetched(cache):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST} (source) from the package index into {cache} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", str(cache)], check=True)
    (sdist,) = cache.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if Path(member.name).name.startswith(GGUF) and "/models/" in member.name:
                member.name = Path(member.name).name
                tar.extract(member, cache, filter="data")
    sdist.unlink()
    return cache


def ensure_gguf(cache: Path) -> None:
    """transformers reads GGUF files through the ``gguf`` package: installed into the cache when it is missing."""
    site = cache / "site"
    sys.path.insert(0, str(site))
    if importlib.util.find_spec("gguf") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "gguf==0.19.0"], check=True)
        importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args(argv)
    cache = fetch(args.cache)
    ensure_gguf(cache)

    from transformers import AutoTokenizer

    from mmrag_lite import config, modeling, prompts, scoring

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(cache), gguf_file=GGUF)
    print(f"loaded {type(tok).__name__}, {len(tok)} ids, in {time.perf_counter() - t0:.1f} s")

    cases = (cache / f"{GGUF}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (cache / f"{GGUF}.out").read_text(encoding="utf-8").split("\n")
    pairs = list(zip(cases, expected))
    matched = sum(tok(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids.split()] for text, ids in pairs)
    print(f"reference strings tokenised as Hugging Face's Qwen2 tokenizer does: {matched} of {len(pairs)}")

    prefix = scoring.answer_prefix()
    spellings = {}
    for word in (prompts.YES, *scoring.VERDICT_VARIANTS[prompts.YES], prompts.NO, *scoring.VERDICT_VARIANTS[prompts.NO]):
        spellings[word] = tok.tokenize(prefix + word)
        print(f"  {prefix + word!r:>14} -> {spellings[word]}")
    readout = scoring.verdict_readout(tok)
    yes = [tok.decode([i]) for i in readout.yes_ids]
    no = [tok.decode([i]) for i in readout.no_ids]
    print(f"verdict_readout: prefill {readout.prefill!r} {list(readout.prefill_ids)}; yes read as {yes}, no as {no}")

    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = modeling.build_tiny_processor().tokenizer.chat_template  # Qwen2-VL's template
    preset = config.get_preset("colab-t4")
    question = "What colour is the roof of the station?"
    candidates = {"snippet": {"id": "t1", "modality": "text", "text": "The station's roof is painted green."},
                  "image": {"id": "i1", "modality": "image", "text": "A station with a green roof.", "image": "pixels"}}
    ends = {}
    for kind, cand in candidates.items():
        for reasoning in (preset.stage1.reasoning, not preset.stage1.reasoning):
            text = tok.apply_chat_template(prompts.stage1_messages(question, cand, reasoning=reasoning),
                                           add_generation_prompt=True, tokenize=False) + prefix
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ok = ids[-len(readout.prefill_ids):] == list(readout.prefill_ids)
            if kind == "image" and "<|image_pad|>" not in tok.convert_ids_to_tokens(ids):
                raise SystemExit("the image candidate's prompt holds no image placeholder: the check would not be real")
            ends[f"{kind}, reasoning {'on' if reasoning else 'off'}"] = ok
            print(f"  stage-1 prompt ({kind}, reasoning {'on' if reasoning else 'off'}, {len(ids)} tokens) ends with "
                  f"the prefill: {ok}; last tokens {tok.convert_ids_to_tokens(ids[-4:])}")
    return {"reference_matched": matched, "reference_cases": len(pairs), "spellings": spellings,
            "prefill": readout.prefill, "yes": yes, "no": no, "prompts_end_with_prefill": ends}


if __name__ == "__main__":
    main()
