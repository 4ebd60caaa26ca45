"""Write (or check) .ci/constraints.txt: the exact versions of everything `make` installs, as this .venv has them.

Why: pyproject.toml gives most libraries only a floor, so a fresh machine months from now would resolve numpy,
pillow, spaCy, ... to releases nobody tested. The Makefile installs with `-c .ci/constraints.txt`, so every fresh
`.venv/` gets the versions the test suite last passed with. torch, torchvision and their CUDA libraries stay out:
the Makefile's TORCH_SPEC chooses the torch build (a GPU machine names its own), and build tools stay pip's choice.

    .venv/bin/python .ci/lock.py           # rewrite the file from the installed .venv (make lock)
    .venv/bin/python .ci/lock.py --check   # exit 1, naming each difference, if the .venv is not the locked set

Some dependencies hold on one Python only (papermill needs aiohttp on 3.12, jupyter-server needs overrides below
3.12), so one .venv cannot see them all. A pin this .venv does not install is kept from the lock it replaces, marked
with the Python that wrote it (``# on Python 3.12``): `make lock` on each supported Python in turn gives one file
that pins all of them (a constraint only limits, it never installs, so a pin another Python needs costs nothing here).
"""

from __future__ import annotations

import argparse
import re
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
# A line "# on Python X" pins what only Python X installs, kept from `make lock` there.
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


def read_lock(path: Path | None = None) -> dict[str, str]:
    """The lock file's pins: name -> version."""
    return {name: version for name, (version, _) in read_lock_entries(path).items()}


def read_lock_entries(path: Path | None = None) -> dict[str, tuple[str, str | None]]:
    """name -> (version, the Python that pinned it where a line says ``# on Python X``, else None)."""
    entries = {}
    for line in (path or LOCK).read_text().splitlines():
        pin, _, comment = line.partition("#")
        if pin.strip():
            name, _, version = pin.strip().partition("==")
            match = re.fullmatch(r"\s*on Python (\d+\.\d+)\s*", comment)
            entries[canonicalize_name(name)] = (version, match.group(1) if match else None)
    return entries


def lock_python(path: Path | None = None) -> str | None:
    """The Python whose .venv wrote the lock at ``path`` (its header says so)."""
    path = path or LOCK
    match = re.search(r"on Python (\d+\.\d+)\.\n", path.read_text()) if path.is_file() else None
    return match.group(1) if match else None


def differences(installed: dict[str, str], entries: dict[str, tuple[str, str | None]], python: str,
                writer: str | None) -> list[str]:
    """Why ``installed`` (this Python's closure) is not the locked set: a pin that differs or is missing, or a pin
    nothing here installs that this Python claims (a dependency since dropped). A pin is claimed by the Python its
    line names, else by ``writer``, the Python whose ``make lock`` wrote the file (jupyter-server needs overrides
    below 3.12: a 3.11 lock pins it unmarked, and 3.12 does not install it)."""
    out = [f"{n}: locked {entries[n][0] if n in entries else '-'}, installed {v}"
           for n, v in installed.items() if entries.get(n, (None,))[0] != v]
    out += [f"{n}: locked {version}, installed -" for n, (version, other) in entries.items()
            if n not in installed and (other or writer) in (None, python)]
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the .venv with the lock instead of writing it")
    args = parser.parse_args(argv)
    python = ".".join(map(str, sys.version_info[:2]))
    current = installed_closure()
    narrow = {n: r for n in current if (r := needs_newer_python(n))}
    pins = {n: v for n, v in current.items() if n not in narrow}
    entries, writer = (read_lock_entries(LOCK), lock_python(LOCK)) if LOCK.is_file() else ({}, None)
    if args.check:
        found = differences(pins, entries, python, writer)
        print("\n".join(found) or f"the installed set is the locked one ({len(entries)} distributions)")
        return 1 if found else 0
    others = {n: (v, other or writer) for n, (v, other) in entries.items()
              if n not in current and (other or writer) not in (None, python)}
    left_out = "".join(f"# left out: {n}=={current[n]} (Python {r}; pip picks a release each Python can install)\n"
                       for n, r in narrow.items())
    lines = {n: f"{n}=={v}\n" for n, v in pins.items()} | {n: f"{n}=={v}  # on Python {other}\n"
                                                          for n, (v, other) in others.items()}
    LOCK.write_text(HEADER.format(python=python, left_out=left_out) + "".join(lines[n] for n in sorted(lines)))
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} distributions from this .venv, {len(others)} kept for other "
          f"Pythons ({len(narrow)} left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
