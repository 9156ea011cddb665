"""``{username}`` in Kubernetes kernels: the pod as the pure builders make it for a user
(namespace, volumes, mounts, working directory, env, the user's claim), hostile names, and
a claim per user on the ``kube`` API (the double, or a real node: there a hostPath
PersistentVolume this test creates is bound to each claim)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

from provisioners.exceptions import ProvisionerConfigError
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeApiError, KubeClient, NotFound, resource_path
from provisioners.k8s.engine import PodEngine
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from provisioners.k8s.watch import start_problem
from provisioners.pool import KernelPools
from provisioners.pool.claim import cold_reason
from provisioners.usernames import UsernameError, dns_label, path_segment
from tests.helpers import KUBERNETES_PROVISIONER, Kube, execute
from tests.helpers.kube import bind_claim, filled, get_pod, no_leftovers, pod_of

MakeKM = Callable[..., AsyncKernelManager]
PORTS = (20001, 20002, 20003, 20004, 20005)
HOSTILE = ["../x", "..", "/", "Alice_B", "a.b", "-a-", "jürgen", "🐍", "\u202eevil", "a\x1bb\nc"]
HOSTILE += ["x" * 300, "{username}", "$(id)"]
PER_USER = {
    "namespace": "kernels-{username}",
    "working_dir": "/home/jovyan/{username}",
    "env": {"USER_HOME": "/home/{username}", "PLAIN": "x"},
    "volumes": [
        {"name": "home", "persistentVolumeClaim": {"claimName": "home-{username}"}},
        {"name": "scratch", "hostPath": {"path": "/srv/scratch/{username}"}},
    ],
    "volume_mounts": [
        {"name": "home", "mountPath": "/home/jovyan/{username}"},
        {"name": "scratch", "mountPath": "/scratch", "subPath": "{username}"},
    ],
    "user_volume_mount_path": "/home/jovyan/work",
}


def validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']} does not validate: {str(exc).splitlines()[0]}")


def provisioner(tmp_path: Path, username: str, **config: Any) -> KubernetesClusterProvisioner:
    spec = KernelSpec(name="k8s-users", argv=["python3", "-m", "ipykernel_launcher", "-f", "x"])
    spec.resource_dir = str(tmp_path)
    config.setdefault("image", "example/kernel:1")
    config.setdefault("namespace", "jupyter")
    prov = KubernetesClusterProvisioner(
        kernel_id="5c0ffee0-0000-4000-8000-000000000003", kernel_spec=spec, **config
    )
    prov.username = username
    return prov


def manifests(prov: KubernetesClusterProvisioner, env: dict[str, str]) -> dict[str, Any]:
    """The pod the engine would create for ``env`` (no cluster)."""
    engine = prov.engine
    assert isinstance(engine, PodEngine)
    names = ["shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"]
    info: dict[str, Any] = dict(zip(names, PORTS, strict=True))
    info.update(transport="tcp", ip="0.0.0.0", key=b"k", signature_scheme="hmac-sha256")
    engine.kernel_info = info
    engine.pod_name = "kernel-0123abcd"
    engine.secret_name = m.secret_name_for(engine.pod_name)
    pod, _ = engine.build_manifests(["python3"], env, info)
    return pod


# ---------------------------------------------------------------------- pure


def test_a_pod_for_alice_has_her_namespace_volumes_mounts_workdir_and_env(
    tmp_path: Path,
) -> None:
    prov = provisioner(tmp_path, "alice", **PER_USER)
    pod = manifests(prov, {"KERNEL_USERNAME": "alice", "USER_HOME": "/home/{username}"})
    validate(pod)
    assert pod["metadata"]["namespace"] == "kernels-alice"
    container = pod["spec"]["containers"][0]
    assert container["workingDir"] == "/home/jovyan/alice"
    assert {"name": "USER_HOME", "value": "/home/alice"} in container["env"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["home"]["persistentVolumeClaim"]["claimName"] == "home-alice"
    assert volumes["scratch"]["hostPath"]["path"] == "/srv/scratch/alice"
    assert volumes[m.USER_VOLUME]["persistentVolumeClaim"]["claimName"] == "claim-alice"
    mounts = {x["name"]: x for x in container["volumeMounts"]}
    assert mounts["home"]["mountPath"] == "/home/jovyan/alice"
    assert mounts["scratch"]["subPath"] == "alice"
    assert mounts[m.USER_VOLUME]["mountPath"] == "/home/jovyan/work"
    assert pod["metadata"]["labels"][m.LABEL_USERNAME] == "alice"
    assert pod["metadata"]["annotations"][m.ANNOTATION_USERNAME] == "alice"
    assert "{username}" not in str(pod)


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_username_gives_a_valid_pod_with_safe_names_and_paths(
    tmp_path: Path, name: str
) -> None:
    pod = manifests(provisioner(tmp_path, name, **PER_USER), {"KERNEL_USERNAME": "ignored"})
    validate(pod)  # every name a valid DNS label, every field well-formed
    namespace = pod["metadata"]["namespace"]
    assert m.is_dns_label(namespace) and namespace.startswith("kernels-")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert all(m.is_dns_label(c) for c in claims)
    container = pod["spec"]["containers"][0]
    segment = path_segment(name)
    assert container["workingDir"] == f"/home/jovyan/{segment}"
    paths = [x["mountPath"] for x in container["volumeMounts"]] + [container["workingDir"]]
    paths += [x.get("subPath", "") for x in container["volumeMounts"]]
    for path in paths:
        assert ".." not in path.split("/") and "\x00" not in path and "\u202e" not in path
    assert "/srv/scratch/" + segment in str(pod["spec"]["volumes"])
    # the exact name stays on the record (the annotation), a sanitized one on the label
    assert pod["metadata"]["annotations"][m.ANNOTATION_USERNAME] == name


def test_two_users_never_share_a_claim_or_namespace(tmp_path: Path) -> None:
    names = ["alice", "Alice", "alice_", "alice.", "Alice_B", "alice-b", "../alice", "alice/.."]
    claims, namespaces = set(), set()
    for name in names:
        pod = manifests(provisioner(tmp_path, name, **PER_USER), {})
        namespaces.add(pod["metadata"]["namespace"])
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        claims.add(volumes[m.USER_VOLUME]["persistentVolumeClaim"]["claimName"])
    assert len(claims) == len(namespaces) == len(names)


@pytest.mark.parametrize("key", ["namespace", "working_dir", "volumes", "volume_mounts", "env"])
def test_a_setting_using_username_without_a_user_fails_naming_it(tmp_path: Path, key: str) -> None:
    prov = provisioner(tmp_path, "", **{key: PER_USER[key]})
    with pytest.raises(UsernameError) as info:
        manifests(prov, {"USER_HOME": "/home/{username}"} if key == "env" else {})
    assert key in str(info.value) and "KERNEL_USERNAME" in str(info.value)


def test_a_username_with_nul_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UsernameError, match="KERNEL_USERNAME contains a NUL"):
        manifests(provisioner(tmp_path, "a\x00b", **PER_USER), {})


def test_a_user_volume_without_a_user_fails_naming_it(tmp_path: Path) -> None:
    prov = provisioner(tmp_path, "", user_volume_mount_path="/work")
    with pytest.raises(UsernameError, match="user_volume_claim"):
        manifests(prov, {})


def test_without_username_settings_no_user_is_needed(tmp_path: Path) -> None:
    pod = manifests(provisioner(tmp_path, "", working_dir="/work"), {})
    validate(pod)
    assert m.LABEL_USERNAME not in pod["metadata"]["labels"]
    assert not any(v["name"] == m.USER_VOLUME for v in pod["spec"]["volumes"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("namespace", "Kernels-{username}"),
        ("user_volume_claim", "claim_{username}"),
        ("user_volume_mount_path", "relative/{username}"),
        ("user_volume_size", "lots"),
    ],
)
def test_bad_per_user_settings_are_refused_naming_the_key(
    tmp_path: Path, key: str, value: str
) -> None:
    with pytest.raises(ProvisionerConfigError, match=key):
        provisioner(tmp_path, "alice", **{key: value})


def test_the_claim_of_a_user_is_labelled_ours_but_no_kernels() -> None:
    volume = m.user_volume("claim-{username}", "/work", "2Gi", "fast", "Alice_B")
    assert volume is not None
    claim = m.claim_manifest(volume, "jupyter", release="ns.rel")
    validate(claim)
    assert claim["metadata"]["name"] == "claim-" + dns_label("Alice_B", 57)
    labels = claim["metadata"]["labels"]
    assert labels[m.LABEL_MANAGED_BY] == m.MANAGED_BY
    assert labels[m.LABEL_COMPONENT] == m.COMPONENT_USER_VOLUME  # never a kernel's selector
    assert claim["metadata"]["annotations"][m.ANNOTATION_USERNAME] == "Alice_B"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert m.user_volume("claim-{username}", "", "1Gi", "", "alice") is None


def test_a_claim_patch_records_the_claiming_user() -> None:
    patch = m.claim_patch("k-1", "Alice B")
    assert patch["metadata"]["annotations"][m.ANNOTATION_USERNAME] == "Alice B"
    assert patch["metadata"]["labels"][m.LABEL_USERNAME] == m.sanitize_label_value("Alice B")
    assert m.LABEL_USERNAME not in m.claim_patch("k-1")["metadata"]["labels"]


def test_a_per_user_kernelspec_never_claims_a_warm_kernel(tmp_path: Path) -> None:
    prov = provisioner(tmp_path, "alice", pool_size=1, working_dir="/w/{username}")
    assert "working_dir" in cold_reason(prov, {"env": {"KERNEL_USERNAME": "alice"}})
    prov = provisioner(tmp_path, "alice", pool_size=1, user_volume_mount_path="/work")
    assert "user_volume_mount_path" in cold_reason(prov, {"env": {}})
    # elsewhere KERNEL_USERNAME alone does not make a start cold
    prov = provisioner(tmp_path, "alice", pool_size=1, working_dir="/work")
    assert cold_reason(prov, {"env": {"KERNEL_USERNAME": "alice"}}) == ""


def test_a_pod_waiting_for_its_claim_to_bind_is_no_lost_cause() -> None:
    def pod(message: str) -> dict[str, Any]:
        cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
        return {"status": {"conditions": [{**cond, "message": message}]}}

    waiting = "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims."
    assert start_problem(pod(waiting)) is None
    missing = '0/1 nodes are available: persistentvolumeclaim "claim-x" not found.'
    problem = start_problem(pod(missing))
    assert problem is not None and problem.reason == "Unschedulable"


# ---------------------------------------------------------------------- on the API


@pytest.fixture
async def claims(kube: Kube, kube_api: KubeClient) -> AsyncIterator[list[str]]:
    """Claims (by name) this test makes its kernels create; each gets a hostPath
    PersistentVolume bound to it on a real cluster (none provisions storage there), and
    both are deleted after the test."""
    made: list[str] = []
    yield made
    for name in made:
        path = resource_path("persistentvolumeclaims", kube.namespace, name)
        with contextlib.suppress(NotFound):
            await kube_api.request("DELETE", path)
        if kube.forbid is None:  # a real cluster: the volume this test made for it
            with contextlib.suppress(NotFound):
                await kube_api.request("DELETE", f"/api/v1/persistentvolumes/pv-{name}")


async def test_each_user_gets_a_claim_created_once_and_only_their_kernels_mount_it(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    claims: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    run = uuid.uuid4().hex[:6]
    alice, bob = f"alice-{run}", f"Bob_{run}"  # bob's name is mapped: claim-bob-...--<hash>
    alice_claim, bob_claim = f"claim-{alice}", "claim-" + dns_label(bob, 57)
    claims += [alice_claim, bob_claim]
    for claim in claims:
        await bind_claim(
            kube, kube_api, claim, tmp_path_factory.mktemp("claims"), prefix="pv", label="users"
        )
    config = kube.config(
        user_volume_mount_path="/home/jovyan/work",
        user_volume_storage_class="",
        working_dir="/home/jovyan/work",
        env={"WHO": "{username}"},
        fs_group=1000,
    )

    async def start(user: str) -> AsyncKernelManager:
        km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
        await km.start_kernel(env={"KERNEL_USERNAME": user})
        return km

    first = await start(alice)
    path = resource_path("persistentvolumeclaims", kube.namespace, alice_claim)
    claim = await kube_api.request("GET", path)
    created = claim["metadata"]["uid"]
    assert claim["metadata"]["annotations"][m.ANNOTATION_USERNAME] == alice
    code = (
        "import os; open('notes.txt', 'w').write('alice-private'); "
        "print(os.getcwd(), os.environ['WHO'])"
    )
    result = await execute(first, code)
    assert result["status"] == "ok", result
    assert result["stdout"].split() == ["/home/jovyan/work", path_segment(alice)]
    pod = await get_pod(kube_api, kube, pod_of(first).pod_name)
    assert pod["metadata"]["annotations"][m.ANNOTATION_USERNAME] == alice
    rows = await pod_of(first).list_kernels()
    assert any(r["kernel_id"] == first.kernel_id and r["username"] == alice for r in rows)
    await first.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, first.kernel_id)

    # the kernel went; alice's claim stays, and her next kernel mounts it again
    assert (await kube_api.request("GET", path))["metadata"]["uid"] == created
    second, other = await asyncio.gather(start(alice), start(bob))
    read = "print(open('notes.txt').read() if os.path.exists('notes.txt') else 'none')"
    assert (await execute(second, "import os; " + read))["stdout"].strip() == "alice-private"
    assert (await execute(other, "import os; " + read))["stdout"].strip() == "none"
    assert (await kube_api.request("GET", path))["metadata"]["uid"] == created  # created once
    bob_path = resource_path("persistentvolumeclaims", kube.namespace, bob_claim)
    assert (await kube_api.request("GET", bob_path))["metadata"]["annotations"][
        m.ANNOTATION_USERNAME
    ] == bob
    await asyncio.gather(second.shutdown_kernel(), other.shutdown_kernel())
    for km in (second, other):
        await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_a_claim_the_role_may_not_create_fails_the_start_naming_it(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    if kube.forbid is None:
        pytest.skip("needs the API double's forbid()")
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(user_volume_mount_path="/work"), **kube.spec()
    )
    refused = pytest.raises(Exception, match="persistentvolumeclaims")
    with kube.forbid("create", "persistentvolumeclaims"), refused as info:
        await km.start_kernel(env={"KERNEL_USERNAME": "carol"})
    assert "claim-carol" in str(info.value)
    await no_leftovers(kube_api, kube.namespace)
    with pytest.raises(KubeApiError):
        path = resource_path("persistentvolumeclaims", kube.namespace, "claim-carol")
        await kube_api.request("GET", path)


async def test_a_claimed_warm_pod_gets_the_claiming_users_label_and_annotation(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    KernelPools.clear_instance()
    try:
        config = kube.config(pool_size=1)
        km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(name="pooled-user"))
        await filled(km, 1)
        await km.start_kernel(env={"KERNEL_USERNAME": "Alice B"})
        assert pod_of(km).claimed_from, "not claimed"
        pod = await get_pod(kube_api, kube, pod_of(km).pod_name)
        assert pod["metadata"]["annotations"][m.ANNOTATION_USERNAME] == "Alice B"
        assert pod["metadata"]["labels"][m.LABEL_USERNAME] == m.sanitize_label_value("Alice B")
        rows = await pod_of(km).list_kernels()
        assert [r["username"] for r in rows if r["kernel_id"] == km.kernel_id] == ["Alice B"]
        await km.shutdown_kernel()
    finally:
        await KernelPools.instance().drain()
        KernelPools.clear_instance()
    await no_leftovers(kube_api, kube.namespace)


async def test_a_namespace_per_user_without_a_user_fails_fast_naming_it(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(namespace="kernels-{username}"), **kube.spec()
    )
    with pytest.raises(UsernameError, match="'namespace' uses"):
        await km.start_kernel()
    assert not km.has_kernel
    # a template engine (no user) has no one namespace to list, sweep or adopt from
    engine = pod_of(km)
    assert await engine.list_kernels() == []
    assert await engine.adoptable_kernels() == []
    assert await engine.sweep_orphans() == []
