"""The local fallback: when it may run, what it passes on, and how the user learns of it.

A fallback kernel replaces a remote one: it gets the environment policy of the target it
replaces (never the server's whole environment), it is refused where this server may run
in a Kubernetes pod (:func:`provisioners.podenv.maybe_in_pod`) unless the kernelspec asks
for it, its port records name the target it replaces (so ``jupyter-provisioners list``
shows it), and an IPython kernel prints a notice in the output of its first execution.
"""

from __future__ import annotations

import os

#: What a local process needs to run at all, and that carries no secret; a container's
#: image or a remote login gives its kernel the same.
PROCESS_BASICS = ("PATH", "LANG", "LC_ALL")
#: The notice is cut to this many characters of the engine's error.
_CAUSE_CHARS = 300

# Run once by the kernel at start (IPython's exec_lines): prints the notice to stderr
# during the first execution, so the notebook shows it in that cell's output.
_NOTICE_CODE = """
def _notice(*_args):
    ip.events.unregister('pre_run_cell', _notice)
    import sys
    print(message, file=sys.stderr, flush=True)
ip.events.register('pre_run_cell', _notice)
"""


def while_unreachable(fallback: str, fallback_in_pod: bool, in_pod: bool) -> str:
    """What happens to a kernelspec's kernels while its engine is unreachable, as a
    ``kernelspec install`` warning says it (``fallback``, ``fallback_in_pod`` settings;
    ``in_pod``: this server may run in a Kubernetes pod)."""
    if fallback != "local":
        return "until it answers, kernels of this kernelspec fail to start (fallback='none')"
    if in_pod and not fallback_in_pod:
        return (
            "until it answers, kernels of this kernelspec fail to start: the local fallback "
            "is refused in a Kubernetes pod (fallback_in_pod=false)"
        )
    return (
        "until it answers, kernels of this kernelspec start as local processes of the "
        "Jupyter server instead (fallback='local'; set fallback='none' to fail instead)"
    )


def refusal_in_pod(target: str, cause: str) -> str:
    """The error text when a fallback would run inside this server's pod."""
    return (
        f"the {target} engine is unreachable ({cause}); the local fallback is refused "
        "because this server runs in a Kubernetes pod, where a local kernel would run next "
        "to the pod's service-account token and the server's secrets. Fix the engine, or "
        "set 'fallback_in_pod = true' in the kernelspec to allow it anyway"
    )


def notice_text(target: str, cause: str) -> str:
    """What the person at the notebook is told about a fallback kernel."""
    cause = cause if len(cause) <= _CAUSE_CHARS else cause[:_CAUSE_CHARS] + "..."
    return (
        f"[cluster-provisioners] This kernel is NOT running on {target}: the {target} engine "
        f"was unreachable ({cause}), so it runs as a local process on the Jupyter server "
        "(fallback = 'local'). Its files, packages and resources are the server's."
    )


def notice_arguments(argv: list[str], message: str) -> list[str]:
    """Extra kernel arguments that print ``message`` on the first execution.

    Only an IPython kernel (ipykernel) understands them; other kernels get none and the
    server log's warning is the only notice.
    """
    if not any("ipykernel" in arg for arg in argv):
        return []
    line = f"exec({_NOTICE_CODE!r}, {{'ip': get_ipython(), 'message': {message!r}}})"
    return [f"--IPKernelApp.exec_lines={line}"]


def fallback_env(env: dict[str, str]) -> dict[str, str]:
    """The process basics of the server's environment a local fallback kernel needs."""
    return {name: os.environ[name] for name in PROCESS_BASICS if name in os.environ} | env
