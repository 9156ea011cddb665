#!/usr/bin/env bash
# Install configurable-http-proxy (JupyterHub's proxy, from npm) idempotently.
#
# The package is installed under
#   ${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}/chp
# and linked as bin/configurable-http-proxy next to helm and kubectl; the bin directory
# is printed on stdout (everything else goes to stderr). The JupyterHub tests
# (tests/multiuser/) look for the proxy there, then on PATH.
#
# Usage:
#   bin_dir="$(bash .ci/lib/chp.sh)"          # install if needed, print the bin dir
#   source .ci/lib/chp.sh && cp_chp_install   # same, from another script
#
# Environment:
#   CLUSTER_PROVISIONERS_CACHE  cache root (default ~/.cache/cluster-provisioners)
#   CLUSTER_PROVISIONERS_CHP    npm spec of the proxy (default configurable-http-proxy@5.2.0;
#                               5.3 needs Node >= 22.12 through commander 15)

cp_chp_log() { printf 'chp.sh: %s\n' "$*" >&2; }

cp_chp_install() (
    set -euo pipefail

    local cache="${CLUSTER_PROVISIONERS_CACHE:-$HOME/.cache/cluster-provisioners}"
    local spec="${CLUSTER_PROVISIONERS_CHP:-configurable-http-proxy@5.2.0}"
    local bin="$cache/bin"
    local prefix="$cache/chp"
    local stamp="$prefix/.spec"
    local link="$bin/configurable-http-proxy"

    # Already installed from the same spec and it runs: done.
    if [[ -x "$link" && -f "$stamp" && "$(cat "$stamp")" == "$spec" ]] \
        && "$link" --version >/dev/null 2>&1; then
        printf '%s\n' "$bin"
        exit 0
    fi

    command -v npm >/dev/null 2>&1 || { cp_chp_log "npm is required (apt-get install npm)"; exit 1; }
    mkdir -p "$bin" "$cache"

    # Serialise concurrent installs (parallel CI jobs sharing a cache).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$cache/.chp-install.lock"
        flock 9
        if [[ -x "$link" && -f "$stamp" && "$(cat "$stamp")" == "$spec" ]] \
            && "$link" --version >/dev/null 2>&1; then
            printf '%s\n' "$bin"
            exit 0
        fi
    fi

    # Install into a fresh prefix and swap it in, so a reader never sees half a tree.
    local work
    work="$(mktemp -d "$cache/.chp-install.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    cp_chp_log "installing $spec from the npm registry"
    npm install --silent --no-audit --no-fund --loglevel=error --prefix "$work" "$spec" \
        >/dev/null 2>"$work/npm.err" || {
        cat "$work/npm.err" >&2
        cp_chp_log "npm install $spec failed"
        exit 1
    }
    [[ -x "$work/node_modules/.bin/configurable-http-proxy" ]] \
        || { cp_chp_log "$spec installed no configurable-http-proxy binary"; exit 1; }
    rm -rf "$prefix.old"
    [[ -d "$prefix" ]] && mv "$prefix" "$prefix.old"
    mv "$work" "$prefix"
    trap - EXIT
    rm -rf "$prefix.old" "$prefix/npm.err"
    ln -sfn "$prefix/node_modules/.bin/configurable-http-proxy" "$link.new"
    mv -f "$link.new" "$link"
    printf '%s\n' "$spec" >"$stamp"

    "$link" --version >/dev/null 2>&1 \
        || { cp_chp_log "$link does not run (Node $(node --version 2>/dev/null))"; exit 1; }
    cp_chp_log "installed configurable-http-proxy $("$link" --version) in $prefix"
    printf '%s\n' "$bin"
)

# Run when executed, not when sourced.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    cp_chp_install
fi
