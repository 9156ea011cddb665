#!/usr/bin/env bash
# Build the chart's server image (default tag cluster-provisioners/server:0.1.0) without
# pulling anything from a container registry: the offline counterpart of
# images/server/Dockerfile, for machines that reach the Debian mirror and PyPI but no
# registry.
#
#   1. A minbase Debian bookworm rootfs with python3 (3.11.2), made by mmdebstrap from the
#      apt mirror this machine uses, cached as a tarball and imported once as
#      cluster-provisioners/server-base:bookworm.
#   2. This package is built as a wheel on the host (from a copy of its sources, so the
#      working tree gets no build/ directory). Its dependencies with the server extra
#      (jupyter_server, ...) are downloaded once as wheels for CPython 3.11 x86_64 and cached,
#      keyed by the dependency list and an optional constraints file. Not .ci/constraints.txt
#      by default: it pins what CI's Python (3.11.7) can run, and Debian's python3 is 3.11.2
#      (soupsieve 4.1, for one, needs >= 3.11.5).
#   3. Both are installed offline (pip --no-index --target) into staging directories on the
#      host (the dependencies' is cached too); console scripts (jupyter, jupyter-server, jupyter-provisioners) get the
#      rootfs's /usr/bin/python3 as interpreter.
#   4. A tiny Dockerfile FROM the base copies the dependencies and the package in two
#      layers (a code change rebuilds only the small second one), compiles the byte code
#      with the image's own Python (the chart runs a read-only root filesystem), adds
#      the user jupyter (uid/gid 1000) and a `python` command (the chart's helm test runs
#      `python`), as images/server/Dockerfile has. The classic
#      builder uses the local base image as is and never contacts a registry.
#   5. Checks that jupyter_server, the provisioners and their entry points load.
#
# Unlike build-test-image.sh it always rebuilds the tag: the image carries this checkout's
# code. Reruns reuse the rootfs, the base image, the wheels and the dependency layer.
#
# Usage: images/build-server-image.sh [TAG]
# Env:   CLUSTER_PROVISIONERS_SERVER_IMAGE   tag (the TAG argument wins)
#        CLUSTER_PROVISIONERS_CACHE          cache dir (~/.cache/cluster-provisioners)
#        CLUSTER_PROVISIONERS_DEBIAN_MIRROR  mirror URI (default: from apt sources)
#        CLUSTER_PROVISIONERS_SERVER_CONSTRAINTS  pip constraints file for the dependencies
#                                            (default: none)
set -euo pipefail

tag=${1:-${CLUSTER_PROVISIONERS_SERVER_IMAGE:-cluster-provisioners/server:0.1.0}}
base_tag=cluster-provisioners/server-base:bookworm
cache=${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}
rootfs=$cache/server-rootfs-bookworm.tar
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints=${CLUSTER_PROVISIONERS_SERVER_CONSTRAINTS:-}

say() { echo "build-server-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# apt_mirror, debian_rootfs, pip_target.
# shellcheck source=images/lib/offline.sh
source "$repo/images/lib/offline.sh"
# Requires-Python is checked against bookworm's exact python3 version.
pip_target+=(--python-version 3.11.2)

[[ -z $constraints || -f $constraints ]] || die "constraints file $constraints does not exist"
if ! docker info >/dev/null 2>&1; then
    "$repo/.ci/lib/docker.sh"
fi
mkdir -p "$cache"
# Serialise concurrent builds sharing the cache.
exec 9>"$cache/.build-server-image.lock"
flock 9
start=$SECONDS
pip=(python3 -m pip --disable-pip-version-check --no-input)

# 1. Root filesystem and base image, cached across runs.
if [[ -s $rootfs ]]; then
    say "using cached rootfs $rootfs"
else
    # The merged-usr hook merges /usr itself: the usrmerge package would bring 50 MB of Perl.
    debian_rootfs "$rootfs" python3 --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    say "rootfs cached in $rootfs ($((SECONDS - start))s)"
fi
if ! image_exists "$base_tag"; then
    say "importing $rootfs as $base_tag"
    docker import --change 'CMD ["python3"]' "$rootfs" "$base_tag" >/dev/null
fi

stage=$(mktemp -d "$cache/.server-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# 2. This package as a wheel, built from a copy of what images/server/Dockerfile copies.
mkdir -p "$stage/src" "$stage/dist"
cp "$repo/pyproject.toml" "$stage/src/"
for f in README.md LICENSE; do
    [[ -f $repo/$f ]] && cp "$repo/$f" "$stage/src/"
done
cp -r "$repo/provisioners" "$stage/src/"
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
"${pip[@]}" wheel -q --no-deps -w "$stage/dist" "$stage/src" >&2 ||
    die "could not build this package's wheel (pip fetches setuptools from the package index)"
pkg_wheel=$(echo "$stage"/dist/cluster_provisioners-*.whl)
[[ -f $pkg_wheel ]] || die "no wheel built in $stage/dist"

# Wheels of the dependencies, keyed by the dependency list (not the code) and constraints.
key=$(
    {
        python3 -c 'import sys, tomllib, json
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p["dependencies"], p["optional-dependencies"]["server"]]))' "$repo/pyproject.toml"
        if [[ -n $constraints ]]; then cat "$constraints"; fi
    } | sha256sum | cut -c1-16
)
wheels=$cache/server-wheels-py311-$key
if [[ -f $wheels/.complete ]]; then
    say "using cached wheels $wheels"
else
    say "downloading the server's dependencies as wheels for python 3.11 into $wheels"
    rm -rf "$wheels.tmp"
    "${pip[@]}" download -q "${pip_target[@]}" ${constraints:+--constraint "$constraints"} \
        -d "$wheels.tmp" "$pkg_wheel[server]"
    # The package itself is built afresh every time; only its dependencies are cached.
    rm -f "$wheels.tmp"/cluster_provisioners-*.whl
    touch "$wheels.tmp/.complete"
    rm -rf "$wheels"
    mv "$wheels.tmp" "$wheels"
fi

# 3. Staged installs: the dependencies (cached beside their wheels), then the package alone
#    (its own layer). Console scripts get the rootfs's interpreter, not the host's.
inst=("${pip[@]}" install -q --no-warn-conflicts --root-user-action=ignore --no-index
    --no-compile --find-links "$wheels" "${pip_target[@]}")
fix_scripts() {
    local script
    for script in "$1"/*; do
        if head -c 2 "$script" | grep -q '#!'; then
            sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|' "$script"
        fi
    done
}
deps=$wheels/site
if [[ ! -f $deps/.complete ]]; then
    say "staging the dependencies in $deps"
    rm -rf "$deps" "$deps.tmp"
    "${inst[@]}" --target "$deps.tmp" "$pkg_wheel[server]"
    rm -rf "$deps.tmp"/cluster_provisioners* "$deps.tmp/provisioners"
    fix_scripts "$deps.tmp/bin"
    touch "$deps.tmp/.complete"
    mv "$deps.tmp" "$deps"
fi
mkdir -p "$stage/ctx/bin"
# Hard links: the build context costs no copy.
cp -al "$deps" "$stage/ctx/deps"
rm "$stage/ctx/deps/.complete"
mv "$stage/ctx/deps/bin" "$stage/ctx/bin/deps"
"${inst[@]}" --no-deps --target "$stage/ctx/pkg" "$pkg_wheel"
fix_scripts "$stage/ctx/pkg/bin"
mv "$stage/ctx/pkg/bin" "$stage/ctx/bin/pkg"
[[ -x $stage/ctx/bin/deps/jupyter-server && -x $stage/ctx/bin/pkg/jupyter-provisioners ]] ||
    die "the staged install has no jupyter-server or jupyter-provisioners script"

# 4. The image. Its build output is shown only on failure.
say "building $tag"
site=/usr/local/lib/python3.11/dist-packages
build_log=$(mktemp)
if ! DOCKER_BUILDKIT=0 docker build --quiet --tag "$tag" -f - "$stage/ctx" >"$build_log" 2>&1 <<EOF; then
FROM $base_tag
ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN ln -s /usr/bin/python3 /usr/local/bin/python \\
    && groupadd --gid 1000 jupyter \\
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/jupyter --shell /bin/bash jupyter
COPY deps $site/
COPY bin/deps /usr/local/bin/
RUN python3 -m compileall -q -j 0 $site
COPY pkg $site/
COPY bin/pkg /usr/local/bin/
RUN python3 -m compileall -q $site/provisioners
USER 1000:1000
WORKDIR /home/jupyter
ENV HOME=/home/jupyter
EXPOSE 8888
CMD ["jupyter", "server", "--ServerApp.ip=0.0.0.0", "--ServerApp.port=8888", \\
     "--ServerApp.open_browser=False", "--ServerApp.allow_remote_access=True", \\
     "--ServerApp.terminals_enabled=False", "--ServerApp.root_dir=/home/jupyter"]
LABEL org.opencontainers.image.title="cluster-provisioners server (offline build)"
EOF
    cat "$build_log" >&2
    rm -f "$build_log"
    die "docker build of $tag failed"
fi
rm -f "$build_log"

# 5. It runs: the server's and the provisioners' imports, their entry points, the CLI.
docker run --rm --read-only --user 1000:1000 -e HOME=/tmp --tmpfs /tmp "$tag" python3 -c '
import jupyter_server, provisioners, provisioners.k8s.provisioner
from jupyter_client.provisioning import KernelProvisionerFactory as F
names = F.instance()._get_all_provisioners()
assert any(ep.name == "cluster-kubernetes-provisioner" for ep in names), names
print("jupyter_server", jupyter_server.__version__)
' >&2 || die "$tag: jupyter_server or the Kubernetes provisioner does not load"
docker run --rm --user 1000:1000 "$tag" jupyter-provisioners --help >/dev/null ||
    die "$tag: jupyter-provisioners does not run"
docker run --rm --user 1000:1000 "$tag" jupyter server --version >/dev/null ||
    die "$tag: jupyter server does not run"
docker run --rm --user 1000:1000 "$tag" python -c 'import sys; assert sys.version_info >= (3, 11)' ||
    die "$tag: python does not run"
size=$(docker image inspect -f '{{.Size}}' "$tag")
say "built $tag ($((size / 1000000)) MB) in $((SECONDS - start))s"
