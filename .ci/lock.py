"""Write (or check) .ci/constraints.txt: the exact versions of everything `make` installs, as this .venv has them.

Why: pyproject.toml gives most libraries only a floor, so a fresh machine months from now would resolve numpy,
pillow, spaCy, ... to releases nobody tested. The Makefile installs with `-c .ci/constraints.txt`, so every fresh
`.venv/` gets the versions the test suite last passed with. torch, torchvision and their CUDA libraries stay out:
the Makefile's TORCH_SPEC chooses the torch build (a GPU machine names its own), and build tools stay pip's choice.

    .venv/bin/python .ci/lock.py           # rewrite the file from the installed .venv (make lock)
    .venv/bin/python .ci/lock.py --check   # exit 1, naming each difference, if the .venv is not the locked set
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "constraints.txt"
PROJECT = "mmrag-lite"
EXTRAS = ("notebooks", "dev")  # what the Makefile installs: ".[notebooks,dev]"
# chosen by TORCH_SPEC, not by the lock; their own dependencies are locked only where something else needs them
TORCH_FAMILY = {"torch", "torchvision", "triton"}
# build tools stay pip's choice: torch before 2.13 (a GPU machine's TORCH_SPEC) wants setuptools<82
BUILD_TOOLS = {"setuptools", "pip", "wheel"}
# The oldest release of each Python the course supports (pyproject: >=3.11): a pin that one of them cannot install
# (soupsieve 4.1 wants 3.11.5+; Debian 12 ships 3.11.2) is left out, so pip picks a release that fits there.
SUPPORTED_PYTHONS = ("3.11.0", "3.12.0", "3.13.0")
HEADER = """\
# The versions `make` installs (pip install -c): the set the test suite last passed with, on Python {python}.
# Written by `make lock` (.ci/lock.py) from the installed .venv; do not edit by hand. torch and torchvision are
# chosen by the Makefile's TORCH_SPEC instead. To install without it: make test LOCK=
{left_out}"""


def _not_locked(name: str) -> bool:
    return name in TORCH_FAMILY or name in BUILD_TOOLS or name.startswith("nvidia-")


def needs_newer_python(name: str) -> str | None:
    """The installed release's Requires-Python where some supported Python cannot install it, else None."""
    requires = metadata.metadata(name).get("Requires-Python")
    if requires and not all(SpecifierSet(requires).contains(v) for v in SUPPORTED_PYTHONS):
        return requires
    return None


def installed_closure() -> dict[str, str]:
    """Every distribution the project (with its Makefile extras) needs, transitively, as installed: name -> version."""
    pinned: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(PROJECT, EXTRAS)]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            child = canonicalize_name(req.name)
            if _not_locked(child):
                continue
            for extra in sorted(req.extras) or [""]:
                if (child, extra) in seen:
                    continue
                seen.add((child, extra))
                try:
                    pinned[child] = metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    raise SystemExit(f"{req.name} (needed by {name}) is not installed: run make test first") from None
                todo.append((req.name, (extra,) if extra else ()))
    pinned.pop(canonicalize_name(PROJECT), None)
    return dict(sorted(pinned.items()))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """The lock file's pins: name -> version."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the .venv with the lock instead of writing it")
    args = parser.parse_args(argv)
    current = installed_closure()
    if args.check:
        current = {n: v for n, v in current.items() if not needs_newer_python(n)}
        locked = read_lock()
        differences = [f"{n}: locked {locked.get(n, '-')}, installed {current.get(n, '-')}"
                       for n in sorted(set(locked) | set(current)) if locked.get(n) != current.get(n)]
        print("\n".join(differences) or f"the installed set is the locked one ({len(locked)} distributions)")
        return 1 if differences else 0
    python = ".".join(map(str, sys.version_info[:2]))
    narrow = {n: r for n in current if (r := needs_newer_python(n))}
    left_out = "".join(f"# left out: {n}=={current[n]} (Python {r}; pip picks a release each Python can install)\n"
                       for n, r in narrow.items())
    pins = {n: v for n, v in current.items() if n not in narrow}
    LOCK.write_text(HEADER.format(python=python, left_out=left_out) + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} distributions ({len(narrow)} left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
