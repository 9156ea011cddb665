"""``jupyter-provisioners``: install kernelspecs, run code on a kernel, list and clean up."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from .connection.ports import ClusterPortCache
from .exceptions import ProvisionerError
from .lifecycle.engine import kernel_row
from .lifecycle.owner import ServerIdentity, detached_since, owner_alive
from .manager import AsyncKernelManager
from .progress import ProgressRenderer
from .targets import ENTRY_POINTS, TARGETS, load_target, our_kernelspecs, provisioner_for

#: The first ipykernel release that takes CurveZMQ keys from its connection file.
CURVE_IPYKERNEL = (7, 4)

PYTHON_ARGV = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def _parse_setting(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON when it parses, else kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        msg = f"--set takes KEY=VALUE, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _kernel_argv(
    parser: argparse.ArgumentParser, after_dashes: list[str], argv_json: str | None
) -> list[str]:
    """The kernel command from ``-- CMD ...`` or ``--argv JSON_LIST`` (not both)."""
    if after_dashes and argv_json:
        parser.error("give the kernel command after '--' or as --argv JSON_LIST, not both")
    if after_dashes:
        return after_dashes
    if not argv_json:
        return []
    try:
        value = json.loads(argv_json)
    except ValueError:
        value = None
    if not (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
        parser.error(
            "--argv takes a JSON list of strings, e.g. "
            '\'["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]\'; '
            "or put the command after '--'"
        )
    return value


def local_ipykernel_has_curve() -> bool:
    """Whether this Python's ipykernel takes CurveZMQ keys from its connection file (7.4+)."""
    try:
        version = importlib.metadata.version("ipykernel")
    except importlib.metadata.PackageNotFoundError:
        return False
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return release >= CURVE_IPYKERNEL


def build_kernelspec(args: argparse.Namespace) -> dict[str, Any]:
    """The kernel.json for ``kernelspec install``, its config validated by the provisioner."""
    config: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    config.update(dict(args.set or []))
    if args.image:
        config["image"] = args.image
    encrypt = args.encrypt
    if encrypt is None:  # a local kernel of this Python: encrypted when its ipykernel can
        explicit = "transport_encryption" in config or args.kernel_argv
        encrypt = args.target == "local" and not explicit and local_ipykernel_has_curve()
    if encrypt:
        config["transport_encryption"] = "required"
    entry_point = TARGETS[args.target][0]
    remote = args.target != "local"
    python = "python3" if remote else sys.executable
    argv = args.kernel_argv or [python if a == "{python}" else a for a in PYTHON_ARGV]
    spec = {
        "argv": argv,
        "display_name": args.display_name or f"Python ({args.target})",
        "language": "python",
        "interrupt_mode": args.interrupt_mode,
        "metadata": {"kernel_provisioner": {"provisioner_name": entry_point, "config": config}},
    }
    if encrypt:  # the kernel (ipykernel >= 7.4) takes Curve keys from its connection file
        spec["metadata"]["supported_encryption"] = ["curve"]
    kernel_spec = KernelSpec(**{k: v for k, v in spec.items() if k != "metadata"})
    kernel_spec.metadata = spec["metadata"]
    kernel_spec.name = args.name
    provisioner = load_target(args.target)(kernel_id="validate", kernel_spec=kernel_spec, **config)
    for warning in asyncio.run(provisioner.preflight()):
        print(f"jupyter-provisioners: warning: kernelspec {args.name}: {warning}", file=sys.stderr)
    return spec


def cmd_kernelspec_install(args: argparse.Namespace) -> int:
    spec = build_kernelspec(args)
    with tempfile.TemporaryDirectory() as tmp:
        # The temp dir is 0700 and install copies modes: a spec is public (0755/0644),
        # like jupyter_client's, so other users of a shared prefix can read it.
        kernel_json = Path(tmp) / "kernel.json"
        kernel_json.write_text(json.dumps(spec, indent=2))
        kernel_json.chmod(0o644)
        Path(tmp).chmod(0o755)
        dest = KernelSpecManager().install_kernel_spec(
            tmp, kernel_name=args.name, user=args.user, prefix=args.prefix
        )
    print(f"Installed kernelspec {args.name} ({args.target}) in {dest}")
    return 0


async def _run(args: argparse.Namespace) -> int:
    code = args.code if args.code is not None else Path(args.file).read_text()
    km = AsyncKernelManager(kernel_name=args.kernel)
    if args.kernel_dir:
        km.kernel_spec_manager = KernelSpecManager(kernel_dirs=[args.kernel_dir])
    try:
        km.kernel_spec  # noqa: B018 - fail early on an unknown kernel name
    except NoSuchKernel as exc:
        msg = f"no kernelspec named {args.kernel!r}; see 'jupyter kernelspec list'"
        raise ProvisionerError(msg) from exc
    renderer = _attach_progress(km, quiet=args.quiet)
    try:
        await km.start_kernel()
    finally:
        renderer.finish()
    status = 1
    try:
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=args.timeout)
            reply = await kc.execute_interactive(
                code, timeout=args.timeout, output_hook=_print_output
            )
            status = 0 if reply["content"]["status"] == "ok" else 1
        finally:
            kc.stop_channels()
    finally:
        await km.shutdown_kernel()
    return status


def _attach_progress(km: AsyncKernelManager, *, quiet: bool) -> ProgressRenderer:
    """Show the start's steps on stderr (live on a terminal); with ``quiet``, warnings only."""
    log = logging.getLogger("jupyter-provisioners.run")
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    renderer = ProgressRenderer(sys.stderr)
    log.addHandler(renderer)
    km.log = log
    return renderer


def _print_output(msg: dict[str, Any]) -> None:
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        stream = sys.stderr if content["name"] == "stderr" else sys.stdout
        stream.write(content["text"])
        stream.flush()
    elif kind in ("execute_result", "display_data"):
        print(content["data"].get("text/plain", ""))
    elif kind == "error":
        print("\n".join(content["traceback"]), file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _over_kernelspecs(
    kernel_dirs: list[str] | None, action: str
) -> tuple[list[tuple[str, Any]], list[str]]:
    """Run ``sweep_orphans`` or ``list_kernels`` on the engine of each of our kernelspecs.

    A kernelspec whose engine fails (unreachable, refused credentials or host key, an API
    error) is reported on stderr with its cause as it happens, and the others still run.
    Returns the (kernelspec name, item) pairs and the names of the failed kernelspecs.
    """
    results: list[tuple[str, Any]] = []
    failures: list[str] = []
    for name, spec in our_kernelspecs(kernel_dirs):
        target = ENTRY_POINTS[spec.metadata["kernel_provisioner"]["provisioner_name"]]
        try:
            provisioner = provisioner_for(spec)
            items = await getattr(provisioner, action)()
        except Exception as exc:  # any engine's failure: report it, go on with the others
            cause = f"{type(exc).__name__}: {exc}"
            print(f"jupyter-provisioners: kernelspec {name!r} ({target}): {cause}", file=sys.stderr)
            failures.append(name)
            continue
        results.extend((name, item) for item in items)
    return results, failures


def _report_failures(action: str, failures: list[str]) -> int:
    """Name the failed kernelspecs on stderr (each cause was printed as it happened);
    return the exit status: 1 if any failed."""
    if not failures:
        return 0
    print(
        f"jupyter-provisioners: {action} failed for {len(failures)} kernelspec(s): "
        + ", ".join(failures),
        file=sys.stderr,
    )
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    found, failures = asyncio.run(_over_kernelspecs(args.kernel_dir, "list_kernels"))
    rows = kernel_rows(found)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No running kernels of ours.")
    else:
        print(_table(rows))
    return _report_failures("list", failures)


def kernel_rows(engine_rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per kernel: what the engines report, joined with the port store's records
    (which alone know local kernels and which kernels run on the local fallback)."""
    by_kernel: dict[str, dict[str, Any]] = {}
    for spec_name, row in engine_rows:
        row = {**row, "kernelspec": row.get("kernelspec") or spec_name}
        row.update(fallback=False, fallback_for="")
        by_kernel.setdefault(row["kernel_id"], row)
    for kernel_id, record in _port_records().items():
        listed = by_kernel.get(kernel_id)
        if listed is not None:
            listed["ports"] = record["ports"]
            continue
        runner = record.get("target") or ("local" if record.get("kernel_pid") else "?")
        fallback_for = record.get("fallback_for", "")
        server = ServerIdentity(
            record.get("hostname", ""), int(record.get("pid", 0)), record.get("start") or "0"
        )
        by_kernel[kernel_id] = {
            **kernel_row(
                kernel_id,
                target=runner,
                kernelspec=record.get("kernelspec", ""),
                where=(
                    f"{record.get('hostname', '?')} pid {record['kernel_pid']}"
                    if record.get("kernel_pid")
                    else f"{runner} engine (kernelspec not installed here)"
                ),
                state="running" if record.get("kernel_pid") else "?",
                owner=str(server) if server.hostname else "",
                created=float(record.get("t") or 0),
            ),
            # a local kernel standing in for an unreachable engine
            "fallback": bool(fallback_for),
            "fallback_for": fallback_for,
            "ports": record["ports"],
        }
    now = time.time()
    for row in by_kernel.values():
        created = row.get("created") or 0
        row["age"] = round(now - created) if created else None
        row["owner_alive"] = owner_alive(row.get("owner", ""))
        # a persisted kernel whose server stopped: waiting for the next one to adopt it
        since = detached_since(row.get("owner", ""))
        row["detached_for"] = round(now - since) if since is not None else None
    return sorted(by_kernel.values(), key=lambda r: (r.get("created") or 0, r["kernel_id"]))


def _port_records() -> dict[str, dict[str, Any]]:
    """Per kernel id: its port records' fields and the ports it holds (live holders only)."""
    found: dict[str, dict[str, Any]] = {}
    for host, ports in ClusterPortCache.instance().held().items():
        for port, record in ports.items():
            owner = str(record.get("owner", ""))
            if owner.startswith("kernel-"):
                entry = found.setdefault(owner[7:], {**record, "port_host": host, "ports": []})
                entry["ports"].append(port)
    for entry in found.values():
        entry["ports"].sort()
    return found


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("KERNEL ID", "KERNELSPEC", "TARGET", "STATE", "WHERE", "FALLBACK", "AGE", "SERVER")
    lines = [header]
    for row in rows:
        alive = {True: "alive", False: "gone", None: "?"}[row["owner_alive"]]
        if row.get("detached_for") is not None:
            alive = f"detached {_age(row['detached_for'])} ago"
        lines.append(
            (
                row["kernel_id"],
                row.get("kernelspec") or "?",
                row["target"],
                row.get("state") or "?",
                row.get("where") or "?",
                f"for {row['fallback_for']}" if row.get("fallback") else "no",
                _age(row.get("age")),
                alive,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.release:
        return asyncio.run(_remove_release(args))
    ClusterPortCache.instance().held()  # reclaims the port records of dead processes
    removed, failures = asyncio.run(_over_kernelspecs(args.kernel_dir, "sweep_orphans"))
    for spec_name, item in removed:
        print(f"removed {item} (kernelspec {spec_name})")
    print(f"Removed {len(removed)} orphaned resource(s).")
    return _report_failures("cleanup", failures)


async def _remove_release(args: argparse.Namespace) -> int:
    """``cleanup --release``: delete every kernel pod and Secret of the installation in
    each ``--namespace`` (the chart's pre-delete hook runs this)."""
    from .k8s.client import KubeClient
    from .k8s.sweep import remove_release

    if not args.namespace:
        print("jupyter-provisioners: cleanup --release needs --namespace", file=sys.stderr)
        return 2
    log = logging.getLogger("provisioners.cleanup")
    client = await KubeClient.connect(args.kubeconfig or "")
    status = 0
    try:
        for namespace in args.namespace:
            try:
                removed = await remove_release(client, namespace, args.release, log)
            except ProvisionerError as exc:
                print(f"jupyter-provisioners: namespace {namespace}: {exc}", file=sys.stderr)
                status = 1
                continue
            for name in removed:
                print(f"removed {namespace}/{name}")
            print(f"Removed {len(removed)} resource(s) of {args.release} in {namespace}.")
    finally:
        await client.close()
    return status


def cmd_config(args: argparse.Namespace) -> int:
    """Print every config key of a target with its default and help."""
    cls = load_target(args.target)
    traits = cls.class_traits(config=True)
    for name in sorted(traits):
        trait = traits[name]
        default = trait.default_value_repr()
        print(f"{name} (default {default})")
        print(f"    {' '.join((trait.help or '').split())}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter-provisioners",
        description="Kernels in local processes, Docker containers, SSH hosts and Kubernetes pods.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ks = sub.add_parser("kernelspec", help="manage kernelspecs that select our provisioners")
    ks_sub = ks.add_subparsers(dest="kernelspec_command", required=True)
    install = ks_sub.add_parser(
        "install",
        help="write a kernel.json selecting a provisioner",
        usage="%(prog)s NAME [options] [-- KERNEL COMMAND ...]",
        description="""Write a kernel.json that selects one of our provisioners. The kernel
        command goes last, after '--', the way you would type it; '{connection_file}' is
        filled in at start. Example: jupyter-provisioners kernelspec install py-docker
        --target docker --image my/kernel:1 -- python3 -m ipykernel_launcher -f
        {connection_file}""",
    )
    install.add_argument("name", help="kernelspec name, e.g. python-docker")
    install.add_argument("--target", choices=sorted(TARGETS), default="local")
    install.add_argument("--display-name", help="name shown in JupyterLab")
    install.add_argument("--image", help="kernel image (docker, kubernetes)")
    install.add_argument(
        "--set",
        action="append",
        type=_parse_setting,
        metavar="KEY=VALUE",
        help="a provisioner config value (JSON or text); repeatable",
    )
    install.add_argument("--config-json", help="provisioner config as a JSON object")
    install.add_argument(
        "--interrupt-mode",
        choices=["message", "signal"],
        default="message",
        help="how interrupts reach the kernel",
    )
    install.add_argument(
        "--argv",
        dest="argv_json",
        metavar="JSON_LIST",
        help="""the kernel command as a JSON list, e.g. '["python3", "-m", "ipykernel_launcher",
        "-f", "{connection_file}"]'; or give it after '--' (see above)""",
    )
    install.add_argument(
        "--encrypt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encrypt the kernel's channels with CurveZMQ (needs ipykernel >= 7.4); a "
        "kernel that cannot is an error, never plain text. Default: on for a local "
        "kernelspec of this Python when its ipykernel can, off otherwise",
    )
    install.add_argument("--user", action="store_true", help="install for this user only")
    install.add_argument("--prefix", help="install under this prefix")
    install.set_defaults(func=cmd_kernelspec_install)

    run = sub.add_parser("run", help="start a kernel, run code, stream its output, stop it")
    run.add_argument("--kernel", default="python3", help="kernelspec name")
    run.add_argument("--kernel-dir", help="look for kernelspecs in this directory only")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--code", help="code to run")
    source.add_argument("file", nargs="?", help="file of code to run")
    run.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    run.add_argument(
        "-q", "--quiet", action="store_true", help="no start progress on stderr, warnings only"
    )
    run.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list the running kernels of ours")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--kernel-dir", action="append", help="kernelspec dir to read (repeatable)")
    ls.set_defaults(func=cmd_list)

    config = sub.add_parser("config", help="list a target's config keys with their help")
    config.add_argument("target", choices=sorted(TARGETS))
    config.set_defaults(func=cmd_config)

    clean = sub.add_parser(
        "cleanup",
        help="remove what kernels of dead servers left behind, on the engine of every "
        "installed kernelspec that selects one of our provisioners",
    )
    clean.add_argument("--kernel-dir", action="append", help="kernelspec dir to read (repeatable)")
    clean.add_argument(
        "--release",
        help="Kubernetes: instead, delete every kernel pod and Secret labelled with this "
        "installation (cluster-provisioners/release), whether its server lives or not",
    )
    clean.add_argument("--namespace", action="append", help="namespace for --release (repeatable)")
    clean.add_argument("--kubeconfig", help="kubeconfig for --release (default: in-cluster)")
    clean.set_defaults(func=cmd_cleanup)
    return parser


def split_kernel_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``kernelspec install ... -- CMD ...`` into our options and the kernel command."""
    if argv[:2] == ["kernelspec", "install"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ours, kernel_argv = split_kernel_argv(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(ours)
    if getattr(args, "kernelspec_command", None) == "install":
        args.kernel_argv = _kernel_argv(parser, kernel_argv, args.argv_json)
    try:
        return int(args.func(args))
    except (ProvisionerError, OSError, ValueError) as exc:
        print(f"jupyter-provisioners: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
