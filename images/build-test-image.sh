#!/usr/bin/env bash
# Build the offline kernel test image (default tag
# cluster-provisioners/kernel-test:ipykernel-7.4) without pulling anything from a
# container registry. A Debian bookworm rootfs with python3-ipykernel is made
# by mmdebstrap from the apt mirror this machine already uses, cached as a
# tarball so reruns skip that step, and imported as a base image. Debian's
# ipykernel 6.17 cannot encrypt its channels, so ipykernel 7.4 (CurveZMQ) and
# its dependencies are downloaded once from the package index as wheels for
# the rootfs's Python 3.11 (cached), installed into a staging site-packages on
# the host, and copied into /usr/local/lib/python3.11/dist-packages, which
# comes first on the rootfs's sys.path. A tiny Dockerfile also adds the
# non-root user jovyan (uid 1000). The image
# runs as root by default (tests can pass --user jovyan or --user 1000), its
# WORKDIR is /home/jovyan and its CMD is `python3 -m ipykernel_launcher`.
# Idempotent: if the tag already exists in the daemon it exits at once.
#
# Usage: images/build-test-image.sh [TAG]
# Env:   CLUSTER_PROVISIONERS_TEST_IMAGE   tag (the TAG argument wins)
#        CLUSTER_PROVISIONERS_CACHE        cache dir (~/.cache/cluster-provisioners)
#        CLUSTER_PROVISIONERS_DEBIAN_MIRROR  mirror URI (default: from apt sources)
#        CLUSTER_PROVISIONERS_IPYKERNEL  ipykernel requirement (default ipykernel==7.4.0)
# To rebuild: docker rmi the tag (and delete the cached tarball for a new rootfs).
set -euo pipefail

tag=${1:-${CLUSTER_PROVISIONERS_TEST_IMAGE:-cluster-provisioners/kernel-test:ipykernel-7.4}}
base_tag=${CLUSTER_PROVISIONERS_TEST_BASE_IMAGE:-cluster-provisioners/kernel-test-base:bookworm}
cache=${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}
rootfs=$cache/kernel-rootfs-bookworm.tar
ipykernel_req=${CLUSTER_PROVISIONERS_IPYKERNEL:-ipykernel==7.4.0}
# Wheels and staged site-packages are keyed by the requirement.
wheels=$cache/kernel-wheels-py311-${ipykernel_req//[^A-Za-z0-9.]/_}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "build-test-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# apt_mirror, debian_rootfs, pip_target.
# shellcheck source=images/lib/offline.sh
source "$repo/images/lib/offline.sh"

# Make sure the engine answers (docker.sh installs/starts it when needed).
if ! docker info >/dev/null 2>&1; then
    "$repo/.ci/lib/docker.sh"
fi

if image_exists "$tag"; then
    say "$tag already present; nothing to do"
    exit 0
fi

mkdir -p "$cache"
# Serialise concurrent builds (e.g. parallel test workers), then re-check.
exec 9>"$cache/.build-test-image.lock"
flock 9
if image_exists "$tag"; then
    say "$tag was built meanwhile; nothing to do"
    exit 0
fi

start=$SECONDS

# 1. Root filesystem, cached across runs.
if [[ -s $rootfs ]]; then
    say "using cached rootfs $rootfs"
else
    debian_rootfs "$rootfs" python3-ipykernel,python-is-python3,procps
    say "rootfs cached in $rootfs ($((SECONDS - start))s)"
fi

# 2. Base image straight from the tarball (no registry involved).
if image_exists "$base_tag"; then
    say "using base image $base_tag"
else
    say "importing $rootfs as $base_tag"
    docker import --change 'CMD ["python3"]' "$rootfs" "$base_tag" >/dev/null
fi

# 3. A Curve-capable ipykernel for the rootfs's CPython 3.11 (x86_64, glibc
#    2.36): wheels only, downloaded once into the cache (a stamp marks a
#    complete download), then installed offline into a staging directory.
pip=(python3 -m pip --disable-pip-version-check --no-input)
if [[ -f $wheels/.complete ]]; then
    say "using cached wheels $wheels"
else
    say "downloading $ipykernel_req wheels for python 3.11"
    rm -rf "$wheels.tmp"
    "${pip[@]}" download -q "${pip_target[@]}" -d "$wheels.tmp" "$ipykernel_req"
    touch "$wheels.tmp/.complete"
    rm -rf "$wheels"
    mv "$wheels.tmp" "$wheels"
fi
stage=$(mktemp -d "$cache/.kernel-site.XXXXXX")
trap 'rm -rf "$stage"' EXIT
"${pip[@]}" install -q --no-warn-conflicts --root-user-action=ignore --no-index --find-links "$wheels" "${pip_target[@]}" \
    --target "$stage/site" "$ipykernel_req"
# Byte code compiled by the host's CPython 3.11 is valid for the rootfs's 3.11.
# Console scripts would carry the host's interpreter path: the kernel needs none.
rm -rf "$stage/site/bin"

# 4. Final image: ipykernel, user jovyan and defaults. The classic builder
#    uses the local base image as is and never contacts a registry. Its
#    output (and its deprecation notice) is shown only on failure.
say "building $tag"
build_log=$(mktemp)
if ! DOCKER_BUILDKIT=0 docker build --quiet --tag "$tag" -f - "$stage" >"$build_log" 2>&1 <<EOF
FROM $base_tag
COPY site /usr/local/lib/python3.11/dist-packages/
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash jovyan
# PYDEVD_DISABLE_FILE_VALIDATION silences debugpy's frozen-modules warning.
ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYDEVD_DISABLE_FILE_VALIDATION=1
WORKDIR /home/jovyan
CMD ["python3", "-m", "ipykernel_launcher"]
LABEL org.opencontainers.image.title="cluster-provisioners offline kernel test image"
EOF
then
    cat "$build_log" >&2
    rm -f "$build_log"
    die "docker build of $tag failed"
fi
rm -f "$build_log"

# 5. Check that the kernel package imports, as root and as jovyan, and that
#    its pyzmq has CurveZMQ.
version=$(docker run --rm "$tag" python3 -c "import ipykernel; print(ipykernel.__version__)")
docker run --rm --user jovyan "$tag" python3 -c "import ipykernel, zmq; assert zmq.has('curve')" ||
    die "$tag: ipykernel does not import as jovyan, or its pyzmq lacks CurveZMQ"
say "built $tag (ipykernel $version) in $((SECONDS - start))s"
