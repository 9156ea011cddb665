"""Launch parameters, pure: the schema's checks, good and hostile values, the admin's
bounds, defaults detection, and each target's mapping onto its settings."""

from __future__ import annotations

import math
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec

from provisioners.docker import DockerClusterProvisioner
from provisioners.exceptions import ProvisionerConfigError
from provisioners.k8s import KubernetesClusterProvisioner
from provisioners.local import LocalClusterProvisioner
from provisioners.parameters import (
    LaunchBounds,
    LaunchParameterError,
    LaunchParameters,
    parse_quantity,
    resolve_parameters,
)
from provisioners.ssh import SSHClusterProvisioner

SCHEMA: dict[str, Any] = {
    "cpu": {"type": "number", "minimum": 0.5, "maximum": 4, "default": 1},
    "memory": {"type": "string", "default": "2Gi", "maximum": "8Gi"},
    "gpus": {"type": "integer", "minimum": 0, "maximum": 1, "default": 0},
    "image": {"type": "string", "enum": ["kernel:py3", "kernel:gpu"], "default": "kernel:py3"},
    "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
    "debug": {"type": "boolean", "default": False},
    "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 4},
    "label": {"type": "string", "pattern": "[a-z]{1,8}", "default": "x"},
}


def spec(schema: Any = SCHEMA, name: str = "py-params") -> KernelSpec:
    return KernelSpec(
        argv=["python"],
        display_name=name,
        resource_dir=f"/k/{name}",
        metadata={"parameters": schema},
    )


def resolve(env: dict[str, str] | None = None, supplied: Any = None, **bounds: Any):
    return resolve_parameters(spec(), env, supplied, bounds=LaunchBounds(**bounds))


def test_defaults_are_filled_and_detected() -> None:
    params = resolve()
    assert params.defaults and params.changed == ()
    assert params.values == {n: e["default"] for n, e in SCHEMA.items()}
    assert (params.cpu, params.memory_bytes, params.gpus, params.image) == (
        1.0,
        2 * 2**30,
        0,
        "kernel:py3",
    )
    assert params.other_env() == {
        "KERNEL_MODE": "fast",
        "KERNEL_DEBUG": "false",
        "KERNEL_THREADS": "4",
        "KERNEL_LABEL": "x",
    }
    # the defaults given explicitly, written otherwise, are still the defaults
    same = resolve({"KERNEL_CPU": "1.0", "KERNEL_MEMORY": "2048Mi", "KERNEL_DEBUG": "false"})
    assert same.defaults
    assert resolve(supplied={"memory": "2147483648", "gpus": 0.0}).defaults


def test_no_schema_means_no_parameters() -> None:
    bare = KernelSpec(argv=["python"], display_name="bare", metadata={})
    params = resolve_parameters(bare, {"KERNEL_CPU": "9"}, bounds=LaunchBounds())
    assert params == LaunchParameters()
    with pytest.raises(LaunchParameterError) as caught:
        resolve_parameters(bare, {}, {"cpu": 1}, bounds=LaunchBounds())
    assert caught.value.parameter == "cpu" and "known parameters: none" in str(caught.value)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"KERNEL_CPU": "0.5"}, {"cpu": 0.5}),
        ({"KERNEL_CPU": "4"}, {"cpu": 4}),
        ({"KERNEL_CPU": "2.5e0"}, {"cpu": 2.5}),
        ({"KERNEL_MEMORY": "512Mi"}, {"memory": "512Mi"}),
        ({"KERNEL_MEMORY": "1G"}, {"memory": "1G"}),
        ({"KERNEL_MEMORY": "8Gi"}, {"memory": "8Gi"}),
        ({"KERNEL_GPUS": "1"}, {"gpus": 1}),
        ({"KERNEL_IMAGE": "kernel:gpu"}, {"image": "kernel:gpu"}),
        ({"KERNEL_DEBUG": "TRUE"}, {"debug": True}),
        ({"KERNEL_THREADS": "+8"}, {"threads": 8}),
        ({"KERNEL_LABEL": "abc"}, {"label": "abc"}),
        ({"KERNEL_SOMETHING_ELSE": "x"}, {}),  # not a parameter: just env
    ],
)
def test_good_values_from_env(given: dict[str, str], expected: dict[str, Any]) -> None:
    params = resolve(given)
    assert {k: params.values[k] for k in expected} == expected
    assert params.changed == tuple(expected)
    assert params.defaults is not bool(expected)


def test_supplied_wins_over_env_and_keeps_json_types() -> None:
    params = resolve({"KERNEL_CPU": "2"}, {"cpu": 3, "debug": True, "memory": "1Gi"})
    assert (params.cpu, params.values["debug"], params.memory_bytes) == (3.0, True, 2**30)
    assert params.describe_changes() == "cpu=3, memory='1Gi', debug=True"
    assert params.env(["cpu", "debug"]) == {"KERNEL_CPU": "3", "KERNEL_DEBUG": "true"}


HOSTILE = [
    ("cpu", "1e309"),
    ("cpu", "-1"),
    ("cpu", "nan"),
    ("cpu", "NaN"),
    ("cpu", "inf"),
    ("cpu", "-inf"),
    ("cpu", float("nan")),
    ("cpu", float("inf")),
    ("cpu", "2; rm -rf /"),
    ("cpu", "$(id)"),
    ("cpu", " 2"),
    ("cpu", "0x10"),
    ("cpu", "1_000"),
    ("cpu", "٣"),  # a unicode digit
    ("cpu", "9" * 400),
    ("cpu", 10**400),
    ("cpu", 0.1),  # below the minimum
    ("cpu", 4.01),  # above the maximum
    ("cpu", True),  # a wrong type
    ("cpu", [1]),
    ("cpu", None),
    ("memory", "9999Ti"),
    ("memory", "1Gi "),
    ("memory", "1 Gi"),
    ("memory", "1gb"),
    ("memory", "-1Gi"),
    ("memory", "0"),
    ("memory", "1e9"),
    ("memory", "8.000001Gi"),
    ("memory", 2**70),
    ("memory", "1Gi\n"),
    ("gpus", "2"),
    ("gpus", "-1"),
    ("gpus", 0.5),
    ("gpus", "1.0"),
    ("image", "alpine:latest"),
    ("image", "kernel:py3 "),
    ("image", "kernel:py3\x00"),
    ("image", 3),
    ("mode", "FAST"),
    ("mode", "fast; id"),
    ("debug", "yes please"),
    ("debug", 1),
    ("threads", "0"),
    ("threads", "65"),
    ("threads", "4.5"),
    ("threads", 2**60),
    ("label", "ABC"),
    ("label", "abcdefghi"),
    ("label", "a\nb"),
    ("label", "x" * 10_000),
]


@pytest.mark.parametrize(("name", "value"), HOSTILE, ids=[f"{n}={v!r:.20}" for n, v in HOSTILE])
def test_hostile_values_are_refused_naming_the_parameter(name: str, value: Any) -> None:
    for env, supplied in (({f"KERNEL_{name.upper()}": value}, None), (None, {name: value})):
        if env is not None and not isinstance(value, str):
            continue  # an environment value is always a string
        with pytest.raises(LaunchParameterError) as caught:
            resolve(env, supplied)
        error = caught.value
        assert error.parameter == name and error.status_code == 400
        message = str(error)
        assert message.startswith(f"launch parameter {name!r} of kernelspec 'py-params': ")
        assert "allowed: " in message and len(message) < 400


def test_unknown_names_in_a_request_body_are_refused() -> None:
    with pytest.raises(LaunchParameterError) as caught:
        resolve(supplied={"cpu": 1, "../../etc": "x"})
    assert caught.value.parameter == "../../etc"
    assert "known parameters: cpu, debug, gpus, image, label, memory, mode, threads" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("bounds", "supplied", "parameter", "words"),
    [
        ({"max_cpu": 2}, {"cpu": 3}, "cpu", "above the server's max_cpu (2)"),
        ({"max_memory": "1Gi"}, {}, "memory", "above the server's max_memory ('1Gi')"),
        ({"max_memory": "3G"}, {"memory": "3Gi"}, "memory", "max_memory"),
        ({"max_gpus": 0}, {"gpus": 1}, "gpus", "max_gpus (0)"),
        ({"allowed_images": ["kernel:gpu"]}, {}, "image", "allowed_images ('kernel:gpu')"),
    ],
)
def test_admin_bounds_apply_on_top_of_the_schema(
    bounds: dict[str, Any], supplied: dict[str, Any], parameter: str, words: str
) -> None:
    with pytest.raises(LaunchParameterError) as caught:
        resolve(supplied=supplied, **bounds)
    assert caught.value.parameter == parameter and words in str(caught.value)


def test_values_within_admin_bounds_pass() -> None:
    params = resolve(
        supplied={"cpu": 2, "memory": "3G", "image": "kernel:gpu"},
        max_cpu=2,
        max_memory="3G",
        max_gpus=0,
        allowed_images=["kernel:gpu"],
    )
    assert (params.cpu, params.memory_bytes, params.image) == (2.0, 3 * 10**9, "kernel:gpu")
    with pytest.raises(Exception, match="max_memory"):
        LaunchBounds(max_memory="lots")


@pytest.mark.parametrize(
    ("schema", "key"),
    [
        ([1, 2], "parameters"),
        ({"CPU": {"type": "number", "maximum": 1, "default": 1}}, "parameters.CPU"),
        ({"a-b": {"type": "string", "default": ""}}, "parameters.a-b"),
        ({"username": {"type": "string", "default": "x"}}, "parameters.username"),
        ({"x": "number"}, "parameters.x"),
        ({"x": {"type": "float", "default": 1}}, "parameters.x.type"),
        ({"x": {"type": "number"}}, "parameters.x.default"),
        ({"x": {"type": "number", "default": 1, "maxLength": 3}}, "parameters.x.maxLength"),
        ({"x": {"type": "number", "default": 5, "maximum": 4}}, "parameters.x.default"),
        ({"x": {"type": "number", "default": 1, "maximum": "4"}}, "parameters.x.maximum"),
        ({"x": {"type": "number", "default": 1, "minimum": math.nan}}, "parameters.x.minimum"),
        (
            {"x": {"type": "number", "default": 1, "minimum": 3, "maximum": 2}},
            "parameters.x.minimum",
        ),
        ({"x": {"type": "string", "default": "a", "maximum": 3}}, "parameters.x.maximum"),
        ({"x": {"type": "string", "default": "a", "enum": []}}, "parameters.x.enum"),
        ({"x": {"type": "string", "default": "c", "enum": ["a", "b"]}}, "parameters.x.default"),
        ({"x": {"type": "string", "default": "a", "pattern": "("}}, "parameters.x.pattern"),
        ({"x": {"type": "boolean", "default": "maybe"}}, "parameters.x.default"),
        ({"cpu": {"type": "number", "default": 1}}, "parameters.cpu.maximum"),
        ({"cpu": {"type": "string", "default": "1", "maximum": 2}}, "parameters.cpu.type"),
        ({"cpu": {"type": "number", "default": 0, "maximum": 2}}, "parameters.cpu.default"),
        (
            {"memory": {"type": "string", "default": "1Gi", "maximum": "lots"}},
            "parameters.memory.maximum",
        ),
        (
            {"memory": {"type": "string", "default": "1 Gi", "maximum": "2Gi"}},
            "parameters.memory.default",
        ),
        ({"gpus": {"type": "number", "default": 0, "maximum": 1}}, "parameters.gpus.type"),
        ({"image": {"type": "string", "default": "any:thing"}}, "parameters.image.enum"),
    ],
)
def test_a_bad_schema_is_a_config_error_naming_the_kernelspec_and_key(
    schema: Any, key: str
) -> None:
    with pytest.raises(ProvisionerConfigError) as caught:
        resolve_parameters(spec(schema, "bad-spec"), {}, bounds=LaunchBounds())
    error = caught.value
    assert not isinstance(error, LaunchParameterError)  # the admin's mistake: not a 400
    assert (error.key, error.kernel_spec) == (key, "bad-spec")
    assert str(error).startswith(f"kernelspec 'bad-spec': metadata.{key} ")


def test_memory_quantities_compare_as_bytes() -> None:
    assert parse_quantity("512Mi") == 512 * 2**20
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity("1G") == 10**9
    assert parse_quantity("1.5Gi") == 3 * 2**29
    assert parse_quantity("1048576") == 2**20
    for bad in ("", "1Gi ", "1gi", "1GB", "-1G", "1e9", "Gi", "1.Gi"):
        assert parse_quantity(bad) is None, bad
    within = resolve_parameters(
        spec({"memory": {"type": "string", "maximum": "1G", "default": "953Mi"}}),
        {"KERNEL_MEMORY": "1000000000"},
        bounds=LaunchBounds(),
    )
    assert within.memory_bytes == 10**9 and not within.defaults
    with pytest.raises(LaunchParameterError):  # 954Mi = 1000341504 bytes > 1G
        resolve_parameters(
            spec({"memory": {"type": "string", "maximum": "1G", "default": "953Mi"}}),
            {"KERNEL_MEMORY": "954Mi"},
            bounds=LaunchBounds(),
        )


# ---------------------------------------------------------------------- the targets

TARGETS = {
    "docker": (DockerClusterProvisioner, {"image": "kernel:py3"}),
    "kubernetes": (KubernetesClusterProvisioner, {"image": "kernel:py3"}),
    "local": (LocalClusterProvisioner, {}),
    "ssh": (SSHClusterProvisioner, {"host": "127.0.0.1"}),
}


def provisioner(target: str, schema: Any = SCHEMA) -> Any:
    """An unstarted provisioner of ``target`` for a kernelspec with ``schema``."""
    cls, config = TARGETS[target]
    return cls(kernel_id="k-params", kernel_spec=spec(schema), **config)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "docker",
            {
                "cpu_limit": 0.5,
                "memory_limit": str(256 * 2**20),
                "gpus": "1",
                "image": "kernel:gpu",
            },
        ),
        (
            "kubernetes",
            {
                "cpu_request": "500m",
                "cpu_limit": "500m",
                "memory_request": "256Mi",
                "memory_limit": "256Mi",
                "gpus": 1,
                "image": "kernel:gpu",
            },
        ),
    ],
)
def test_each_target_maps_the_resources_onto_this_kernels_settings(
    target: str, expected: dict[str, Any]
) -> None:
    LaunchBounds.clear_instance()
    env = {
        "KERNEL_CPU": "0.5",
        "KERNEL_MEMORY": "256Mi",
        "KERNEL_GPUS": "1",
        "KERNEL_IMAGE": "kernel:gpu",
        "KERNEL_MODE": "exact",
    }
    prov = provisioner(target)
    prov.apply_launch_parameters(env)
    assert {k: getattr(prov, k) for k in expected} == expected
    assert prov.env == {
        "KERNEL_MODE": "exact",
        "KERNEL_DEBUG": "false",
        "KERNEL_THREADS": "4",
        "KERNEL_LABEL": "x",
    }
    assert prov.launch_parameters.changed == ("cpu", "memory", "gpus", "image", "mode")
    other = provisioner(target)  # another kernel of the same kernelspec: the defaults
    other.apply_launch_parameters({})
    assert {k: getattr(other, k) for k in expected} != expected
    assert other.image == "kernel:py3" and other.launch_parameters.defaults
    whole = provisioner(target)
    whole.apply_launch_parameters({"KERNEL_CPU": "2"})
    assert whole.cpu_limit == (2.0 if target == "docker" else "2")
    assert whole.gpus == ("" if target == "docker" else 0)


@pytest.mark.parametrize("target", ["local", "ssh"])
def test_a_target_without_resources_refuses_them_by_name(target: str) -> None:
    LaunchBounds.clear_instance()
    prov = provisioner(target)
    with pytest.raises(ProvisionerConfigError) as caught:
        prov.apply_launch_parameters({})
    assert caught.value.key == "parameters.cpu"
    assert f"launch parameter 'cpu' cannot be applied to {target} kernels" in str(caught.value)
    assert prov.launch_parameters is None
    others = provisioner(target, {"mode": SCHEMA["mode"]})
    others.apply_launch_parameters({"KERNEL_MODE": "exact", "KERNEL_X": "y"})
    assert others.env == {"KERNEL_MODE": "exact"}
