"""pytest plugin for jupyter_client's own suite (run by tests/core/test_jupyter_client_suite.py).

It changes no test: it registers our local provisioner in ``tests/test_provisioning.py``'s
stand-in for the installed entry points (what installing this package does for real),
and counts the provisioner classes the factory creates, into the JSON file named by
``CLUSTER_PROVISIONERS_SUITE_COUNTS``, to show that the kernels ran on ours.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory

OUR_ENTRY_POINT = ("cluster-local-provisioner", "provisioners.local:LocalClusterProvisioner")
CREATED: Counter[str] = Counter()


def pytest_configure(config: Any) -> None:
    original = KernelProvisionerFactory.create_provisioner_instance

    def counting(self: KernelProvisionerFactory, *args: Any, **kwargs: Any) -> Any:
        provisioner = original(self, *args, **kwargs)
        CREATED[type(provisioner).__name__] += 1
        return provisioner

    KernelProvisionerFactory.create_provisioner_instance = counting  # type: ignore[method-assign]
    atexit.register(_write_counts)


def pytest_collection_finish(session: Any) -> None:
    module = sys.modules.get("tests.test_provisioning")
    if module is not None:
        name, value = OUR_ENTRY_POINT
        module.initial_provisioner_map[name] = value


def _write_counts() -> None:
    path = os.environ.get("CLUSTER_PROVISIONERS_SUITE_COUNTS")
    if path:
        with open(path, "w") as out:
            json.dump(dict(CREATED), out)
