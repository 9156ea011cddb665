"""Run the benchmarks and print each ratio against its same-run baseline.

    python -m benchmarks.run [local docker ssh kubernetes curve pool server_pool persist idle]

Each benchmark measures its baseline in the same run (jupyter_client's provisioner, a
bare ``docker run``, a direct connection...), so the ratios hold across machines. Goals
are printed beside the ratios; a missed goal is reported, not fatal.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = (
    "local",
    "docker",
    "ssh",
    "kubernetes",
    "curve",
    "pool",
    "server_pool",
    "persist",
    "idle",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}")
        sys.argv = [str(module.__file__)]  # each benchmark parses its own (empty) arguments
        try:
            module.main()
        except Exception as exc:  # one unavailable engine must not hide the others
            print(f"{name}: not measured: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
