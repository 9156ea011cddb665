"""``{username}`` made safe: the security table of hostile names in each style, and the
expansion of settings (pure functions, no engine)."""

from __future__ import annotations

import itertools
import re

import pytest

from provisioners.exceptions import ProvisionerConfigError
from provisioners.usernames import (
    UsernameError,
    check_username,
    dns_label,
    expand_username,
    path_segment,
    uses_username,
)

DNS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: A Docker volume name, and a path segment that is neither ``.`` nor ``..``.
SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

HOSTILE = {
    "traversal": "../x",
    "traversal-deep": "../../etc/passwd",
    "dotdot": "..",
    "dot": ".",
    "slash": "/",
    "absolute": "/root",
    "backslash": "..\\x",
    "underscore-upper": "Alice_B",
    "dotted": "a.b",
    "leading-dash": "-alice",
    "trailing-dash": "alice-",
    "double-dash": "jean--luc",
    "option-like": "--help",
    "upper": "ALICE",
    "umlaut": "jürgen",
    "decomposed-umlaut": "ju\u0308rgen",
    "emoji": "🐍",
    "emoji-name": "bob🐍",
    "rtl-override": "\u202egnp.exe",
    "arabic": "مستخدم",
    "cjk": "日本",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "a\x1b[31mb",
    "spaces": "alice smith",
    "shell": "$(rm -rf ~)",
    "braces": "{username}",
    "format": "{0.__class__}",
    "long-300": "a" * 300,
    "long-63": "b" * 63,
    "long-64": "b" * 64,
    "long-unicode": "ü" * 300,
    "at-domain": "alice@example.org",
}
KEPT_DNS = ["alice", "bob", "a-b", "user1", "1user", "x" * 63]
KEPT_PATH = ["alice", "Alice_B", "a.b", "alice-", "jean.luc", "x" * 100]


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_name_becomes_a_dns_label(name: str) -> None:
    label = dns_label(name)
    assert DNS.fullmatch(label) and len(label) <= 63, label
    # kept as it is, or mapped to a name that holds "--" (never one a user keeps)
    assert label == name or "--" in label
    assert dns_label(name) == label  # deterministic


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_name_becomes_one_safe_path_segment(name: str) -> None:
    segment = path_segment(name)
    assert SEGMENT.fullmatch(segment) and len(segment) <= 100, segment
    assert segment not in (".", "..") and "/" not in segment and "\\" not in segment
    assert not any(ord(c) < 32 or ord(c) > 126 for c in segment)
    assert path_segment(name) == segment


def test_hostile_names_stay_readable_where_they_can() -> None:
    assert dns_label("jürgen").startswith("jurgen--")
    assert dns_label("Alice_B").startswith("alice-b--")
    assert path_segment("../x").startswith("x--")
    assert path_segment("alice smith").startswith("alice-smith--")


@pytest.mark.parametrize("name", KEPT_DNS)
def test_a_valid_label_is_kept(name: str) -> None:
    assert dns_label(name) == name


@pytest.mark.parametrize("name", KEPT_PATH)
def test_a_safe_segment_is_kept(name: str) -> None:
    assert path_segment(name) == name


@pytest.mark.parametrize("style", ["dns", "path"])
def test_distinct_names_stay_distinct(style: str) -> None:
    mapping = dns_label if style == "dns" else path_segment
    names = list(HOSTILE.values()) + KEPT_DNS + KEPT_PATH
    names += ["alice", "Alice", "ALICE", "alice_", "alice.", "alice-", "a_b", "a.b", "a-b"]
    names += ["jurgen", "jürgen", "ju\u0308rgen", "a" * 299, "a" * 301]
    # a user who names herself after another user's mapped name gets a name of her own
    names += [dns_label("Alice_B"), path_segment("../x"), dns_label("a" * 300)]
    names = sorted(set(names))
    out = {name: mapping(name) for name in names}
    for a, b in itertools.combinations(names, 2):
        assert out[a] != out[b], (a, b, out[a])


def test_a_label_bounded_shorter_stays_distinct_and_valid() -> None:
    long = ["c" * 40 + str(i) for i in range(20)]
    labels = {dns_label(n, 20) for n in long}
    assert len(labels) == 20
    assert all(DNS.fullmatch(x) and len(x) <= 20 for x in labels)


@pytest.mark.parametrize("mapping", [dns_label, path_segment])
def test_an_empty_name_is_refused_by_name(mapping: object) -> None:
    with pytest.raises(UsernameError, match="KERNEL_USERNAME"):
        mapping("")  # type: ignore[operator]


def test_expand_replaces_only_the_placeholder() -> None:
    assert expand_username("/home/{username}", "alice", "path") == "/home/alice"
    assert expand_username("/home/{username}", "../x", "path") == "/home/" + path_segment("../x")
    # other braces are left alone; a username holding a placeholder is not expanded again
    assert expand_username("{other}-{username}", "alice", "path") == "{other}-alice"
    assert expand_username("{username}", "{username}", "path") == path_segment("{username}")
    assert expand_username("/data", "", "path") == "/data"  # no placeholder: no user needed
    assert expand_username(5, "alice", "dns") == 5


def test_expand_walks_lists_and_dicts_with_path_keys() -> None:
    volumes = [
        {
            "name": "home-{username}",
            "persistentVolumeClaim": {"claimName": "claim-{username}"},
            "hostPath": {"path": "/srv/{username}"},
        }
    ]
    out = expand_username(volumes, "Alice_B", "dns", path_keys=("path",))
    label = out[0]["name"].removeprefix("home-")
    assert DNS.fullmatch(out[0]["name"]) and label.startswith("alice-b--")
    assert out[0]["persistentVolumeClaim"]["claimName"] == "claim-" + dns_label("Alice_B", 57)
    assert out[0]["hostPath"]["path"] == "/srv/Alice_B"
    # dict keys are expanded (Docker's volumes are keyed by source)
    docker = {"home-{username}": {"bind": "/home/{username}", "mode": "rw"}}
    assert expand_username(docker, "bob", "path") == {
        "home-bob": {"bind": "/home/bob", "mode": "rw"}
    }
    assert volumes[0]["name"] == "home-{username}"  # the setting itself is not changed


def test_dns_expansion_keeps_the_whole_string_a_label() -> None:
    for name in ["a" * 300, "Alice_B" * 10, "b" * 63]:
        namespace = expand_username("kernels-{username}", name, "dns")
        assert DNS.fullmatch(namespace) and len(namespace) <= 63, namespace


def test_a_setting_using_username_without_one_is_refused_by_name() -> None:
    with pytest.raises(UsernameError, match="'namespace'") as info:
        expand_username("kernels-{username}", "", "dns", setting="namespace")
    assert isinstance(info.value, ProvisionerConfigError)
    assert info.value.key == "namespace" and info.value.status_code == 400
    with pytest.raises(UsernameError, match="'env'"):
        expand_username({"HOME": "/home/{username}"}, "", "path", setting="env")


def test_uses_username() -> None:
    assert uses_username({"a": ["x", "{username}"]})
    assert uses_username({"{username}": 1})
    assert not uses_username({"a": ["x", 1, None]})
    assert not uses_username("/home/user")


def test_a_username_no_environment_can_hold_is_refused_by_name() -> None:
    with pytest.raises(UsernameError, match="NUL") as info:
        check_username("a\x00b")
    assert info.value.key == "KERNEL_USERNAME"
    assert check_username("") == "" and check_username("a\nb") == "a\nb"
