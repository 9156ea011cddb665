"""jupyter_client's own tests, unchanged, with our local provisioner as the default.

The test files for provisioning, kernel managers and multi-kernel managers come from
jupyter_client's sdist for the installed version (``pip download``, cached under
``~/.cache/cluster-provisioners``; never committed). They run in a subprocess with
``JUPYTER_DEFAULT_PROVISIONER_NAME=cluster-local-provisioner`` under jupyter_client's
own pytest config, plus ``jupyter_client_suite_plugin`` (it registers our entry point
in ``test_provisioning``'s mocked entry-point list and counts the provisioners made).

The cases in :data:`CANNOT_PASS` are deselected, each with the reason it cannot pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import jupyter_client
import pytest

VERSION = jupyter_client.__version__
CACHE = Path(
    os.environ.get("CLUSTER_PROVISIONERS_CACHE", Path.home() / ".cache" / "cluster-provisioners")
)
SUITE_FILES = [
    "tests/test_provisioning.py",
    "tests/test_kernelmanager.py",
    "tests/test_manager.py",
    "tests/test_multikernelmanager.py",
]
_IS_LOCAL = "asserts that the default provisioner is jupyter_client's LocalProvisioner class"
#: test id -> why it cannot pass with another default provisioner
CANNOT_PASS = {
    "tests/test_provisioning.py::TestRuntime::test_existing[no_provisioner]": (
        f"{_IS_LOCAL} (isinstance), after its lifecycle checks passed with ours"
    ),
    "tests/test_provisioning.py::TestRuntime"
    "::test_local_provisioner_pre_launch_generates_curve_keys_under_transport_encryption": (
        f"{_IS_LOCAL} before it looks at the curve keys"
    ),
    "tests/test_provisioning.py::TestRuntime"
    "::test_local_provisioner_pre_launch_generates_curve_keys_over_ipc": (
        f"{_IS_LOCAL} before it looks at the curve keys"
    ),
}
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def fetch_suite() -> Path:
    """jupyter_client's ``tests/`` and ``pyproject.toml`` for ``VERSION``, cached."""
    target = CACHE / f"jupyter_client-{VERSION}-tests"
    if (target / "pyproject.toml").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", "jupyter_client", f"jupyter_client=={VERSION}", "-d", tmp),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        sdists = list(Path(tmp).glob("jupyter_client-*.tar.gz"))
        if download.returncode != 0 or not sdists:
            pytest.fail(f"cannot download jupyter_client {VERSION}'s sdist: {download.stderr}")
        staging = Path(tmp) / "staging"
        prefix = f"jupyter_client-{VERSION}/"
        with tarfile.open(sdists[0]) as sdist:
            members = [
                m
                for m in sdist.getmembers()
                if m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml"
            ]
            sdist.extractall(staging, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging / prefix.rstrip("/")), target)
    return target


def _run_suite(
    suite: Path, env: dict[str, str], report: Path, args: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run jupyter_client's pytest on ``args`` in ``suite`` with our plugin."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-p", "jupyter_client_suite_plugin", f"--junitxml={report}"),
            # pytest-asyncio >= 0.24 warns while this is unset, and the suite's own
            # filterwarnings=error turns the warning into an INTERNALERROR (exit 3).
            *("-o", "asyncio_default_fixture_loop_scope=function"),
            *args,
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _failed_ids(report: Path) -> list[str]:
    """Node ids of the failed or erroring cases in a junit report ([] if unreadable)."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return []
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").split(".")
            # classname "tests.test_kernelmanager.TestParallel": module path, then classes
            module = [p for p in path if p.startswith("test_")][:1]
            if not module:
                continue
            index = path.index(module[0])
            node = "/".join(path[: index + 1]) + ".py"
            node = "::".join([node, *path[index + 1 :], case.get("name", "")])
            failed.append(node)
    return failed


#: Up to two runs of the suite (the second only for failed cases), 900 s each at most:
#: the suite alone takes about 300 s on a loaded 2-core machine, the global default.
@pytest.mark.timeout(1900)
def test_jupyter_client_suite_passes_with_our_default(tmp_path: Path) -> None:
    suite = fetch_suite()
    counts = tmp_path / "counts.json"
    report = tmp_path / "junit.xml"
    # jupyter_client's tests import "tests.*": the suite's root comes first, and ours
    # (also a "tests" package) never reaches its sys.path.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(suite), str(HERE / "jc_suite"), str(REPO)]),
        "JUPYTER_DEFAULT_PROVISIONER_NAME": "cluster-local-provisioner",
        "CLUSTER_PROVISIONERS_SUITE_COUNTS": str(counts),
    }
    deselect = [arg for test in CANNOT_PASS for arg in ("--deselect", test)]
    result = _run_suite(suite, env, report, [*SUITE_FILES, *deselect])
    tail = "\n".join(result.stdout.splitlines()[-60:])
    print(tail)
    failed = _failed_ids(report)
    if result.returncode != 0 and failed:
        # Upstream's parallel-start cases carry fixed timeouts (120 s for three kernel
        # starts) that a loaded 2-core machine can overrun: each failed case gets one more
        # run, alone, and must pass there. Both runs are printed.
        print(f"rerunning {len(failed)} failed upstream case(s) once: {failed}")
        rerun_env = {**env, "CLUSTER_PROVISIONERS_SUITE_COUNTS": str(tmp_path / "rerun.json")}
        rerun = _run_suite(suite, rerun_env, tmp_path / "rerun.xml", failed)
        print("\n".join(rerun.stdout.splitlines()[-60:]))
        assert rerun.returncode == 0, f"failed twice: {failed}"
    else:
        assert result.returncode == 0, tail
    suites = ET.parse(report).getroot()
    ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites.iter("testsuite"))
    assert ran >= 70, tail
    made = json.loads(counts.read_text())
    # every kernelspec that names no provisioner ran on ours
    assert made.get("LocalClusterProvisioner", 0) >= 50, made
    assert made.get("LocalProvisioner", 0) <= 2, made  # specs naming "local-provisioner"
    print(f"jupyter_client {VERSION}: {ran} passed; provisioners made: {made}")
    for test, why in CANNOT_PASS.items():
        print(f"cannot pass: {test}: {why}")
