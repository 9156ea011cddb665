"""Write the versions installed for cluster-provisioners[test] as a pip constraints file.

Walks the installed distributions' requirements from ``cluster-provisioners[test,server]``
down (markers evaluated for this interpreter, extras followed), so the file pins exactly
what the project and its tests run with, and nothing else the machine happens to have.

Usage (after a green ``bash .ci/run --newest``)::

    python3 .ci/freeze-constraints.py > .ci/constraints.txt
"""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "cluster-provisioners"
ROOT_EXTRAS = ("test", "server")


def closure() -> dict[str, str]:
    """Canonical name -> installed version of every distribution the root needs."""
    found: dict[str, str] = {}
    pending: list[tuple[str, tuple[str, ...]]] = [(ROOT, ROOT_EXTRAS)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"freeze-constraints: {name} is required but not installed")
        key = canonicalize_name(dist.metadata["Name"])
        if key != ROOT:
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in environments):
                continue
            pending.append((req.name, tuple(sorted(req.extras))))
    return found


def main() -> None:
    pins = closure()
    print(
        f"# Versions cluster-provisioners[test] passed CI with "
        f"(Python {platform.python_version()}, {datetime.date.today()})."
    )
    print("# Refresh: bash .ci/run --newest, then")
    print("#   python3 .ci/freeze-constraints.py > .ci/constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
