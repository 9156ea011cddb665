"""The house's rules: the shared connection layer stays small and apart (every module
under 600 lines, its public SSH names importable where they always were, no engine on
asyncio's default executor); the lifecycle imports no target and no pool; no module
reads another class's private attributes; every engine implements the same hook set and
provisioners hold settings only; no file imports a test module."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "provisioners"
TESTS = Path(__file__).resolve().parents[1]
MAX_LINES = 600


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "connection").glob("*.py")), ids=lambda p: p.name
)
def test_connection_modules_stay_under_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by responsibility"


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            "provisioners.connection.sshlink",
            [
                "SSHLink",
                "SSHSettings",
                "CommandResult",
                "parse_server",
                "format_server",
                "ENV_KNOWN_HOSTS",
                "ENV_ACCEPT_UNKNOWN",
                "ENV_CONNECT_TIMEOUT",
                "THREAD_PREFIX",
                "SSH_EXECUTOR",
            ],
        ),
        (
            "provisioners.connection.tunnels",
            [
                "KERNEL_PORT_NAMES",
                "ForwardServer",
                "KernelTunnels",
                "TunnelPorts",
                "TunnelProcess",
                "forward_tunnel",
                "ssh_tunnel",
                "tunnel_to_kernel",
            ],
        ),
    ],
)
def test_public_ssh_names_stay_importable(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert [n for n in names if not hasattr(imported, n)] == []
    assert set(names) <= set(imported.__all__)


def test_no_engine_call_uses_the_default_executor() -> None:
    """Blocking engine calls go to their engine's EngineExecutor (provisioners.executor)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            default_pool = name == "run_in_executor" and (
                not node.args
                or (isinstance(node.args[0], ast.Constant) and node.args[0].value is None)
            )
            if name == "to_thread" or default_pool:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every module ``path`` imports, relative imports resolved
    (``from a import b`` counts as ``a`` and ``a.b``: ``b`` may be a module)."""
    parts = list(path.relative_to(TESTS.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_no_file_imports_a_test_module_or_a_conftest() -> None:
    """Shared test code lives in helper modules (tests/helpers/, tests/targets.py, ...) and
    shared fixtures in plugins (tests/engine_fixtures.py): a test module (``test_*.py``) or
    a ``conftest.py`` is loaded by pytest alone, never imported by another file."""

    def is_test_or_conftest(name: str) -> bool:
        return name.startswith("tests.") and any(
            part.startswith("test_") or part == "conftest" for part in name.split(".")[1:]
        )

    offenders: dict[str, str] = {}  # one per import statement
    for path in sorted(TESTS.rglob("*.py")):
        for line, name in _imported(path):
            if is_test_or_conftest(name):
                offenders.setdefault(f"{path.relative_to(TESTS.parent)}:{line}", name)
    assert offenders == {}


# ---------------------------------------------------------------------- the house's rules

#: The targets' packages and the pools: what the lifecycle must not import.
TARGET_PACKAGES = ("local", "docker", "ssh", "k8s", "pool")
#: Private names of third-party objects a module must reach, with the reason.
THIRD_PARTY_PRIVATES = {
    # docker-py keeps its transport adapter and API version in private fields; the SSH
    # daemon adapter replaces them (there is no public way to give it our SSH settings).
    ("docker/sshdaemon.py", "_custom_adapter"),
    ("docker/sshdaemon.py", "_version"),
    ("docker/sshdaemon.py", "_retrieve_server_version"),
}


def _package_imports(path: Path) -> list[str]:
    """Absolute ``provisioners.*`` names ``path`` imports (relative imports resolved)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("provisioners")]


def test_the_lifecycle_imports_no_target_and_no_pool() -> None:
    """``lifecycle/`` (``base.py`` and what serves it) knows engines only through
    :class:`Engine`; the package plugs the local fallback and the pools in."""
    offenders = [
        f"{path.name}: {name}"
        for path in sorted((PACKAGE / "lifecycle").glob("*.py"))
        for name in _package_imports(path)
        if name.partition(".")[2].split(".")[0] in TARGET_PACKAGES
    ]
    assert offenders == []


def _privates_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: its functions, classes, class fields, and the
    attributes its code assigns on any object."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def test_no_module_reads_another_class_private_attributes() -> None:
    """``x._name`` only where the module itself defines ``_name`` (its own classes'
    fields): an engine reads its provisioner's settings, the lifecycle its engine's
    record, through public names."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        own = _privates_defined(tree)
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in own:
                continue
            if (where, node.attr) in THIRD_PARTY_PRIVATES:
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue  # inherited: a base class of this module's class
            offenders.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def _hooks(engine: type) -> set[str]:
    """The hooks of an engine class: its public methods (not its fields or properties)."""
    return {
        name
        for name, value in vars(engine).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }


def _engine_classes() -> list[type]:
    from provisioners.docker import DockerClusterProvisioner
    from provisioners.k8s import KubernetesClusterProvisioner
    from provisioners.local import LocalClusterProvisioner
    from provisioners.ssh import SSHClusterProvisioner

    provisioners = (
        LocalClusterProvisioner,
        DockerClusterProvisioner,
        SSHClusterProvisioner,
        KubernetesClusterProvisioner,
    )
    return [p.engine_class for p in provisioners]


def test_every_engine_implements_the_same_hook_set() -> None:
    """Each target's engine implements every hook the lifecycle cannot do without, and
    adds no public coroutine of its own: what the lifecycle calls is an :class:`Engine`
    hook, stated once with its error contract."""
    from provisioners.lifecycle.base import ClusterProvisioner
    from provisioners.lifecycle.engine import Engine

    required = {
        "start_kernel",
        "poll_kernel",
        "signal_kernel",
        "stop_kernel",
        "remove_kernel",
        "kernel_state",
        "load_kernel_state",
    }
    hooks = _hooks(Engine)
    problems = []
    for engine in _engine_classes():
        assert issubclass(engine, Engine) and not issubclass(engine, ClusterProvisioner)
        missing = sorted(
            name for name in required if getattr(engine, name) is getattr(Engine, name)
        )
        extra = sorted(
            name
            for klass in engine.__mro__
            if klass not in (Engine, object)
            for name, value in vars(klass).items()
            if not name.startswith("_") and name not in hooks and inspect.iscoroutinefunction(value)
        )
        if missing or extra:
            problems.append(f"{engine.__name__}: missing {missing}, not a hook {extra}")
    assert problems == []


def test_provisioners_hold_settings_only() -> None:
    """A target's provisioner class defines settings (traits, their checks) and names its
    engine; every hook lives on the engine."""
    from provisioners.lifecycle.engine import Engine

    hooks = _hooks(Engine) - {"progress"}
    engines = _engine_classes()
    problems = []
    for engine in engines:
        module = sys.modules[engine.__module__.rsplit(".", 1)[0]]
        provisioner = next(
            getattr(module, n)
            for n in dir(module)
            if getattr(getattr(module, n), "engine_class", None) is engine
        )
        for klass in provisioner.__mro__:
            if klass.__module__.startswith(
                "provisioners.lifecycle"
            ) or not klass.__module__.startswith("provisioners"):
                continue
            overridden = sorted(set(vars(klass)) & hooks)
            if overridden:
                problems.append(f"{klass.__qualname__} defines hooks {overridden}")
    assert problems == []
