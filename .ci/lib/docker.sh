#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, for CI and the docker
# tests. Idempotent: installs docker.io from apt when dockerd is missing,
# and when `docker info` fails starts dockerd in the background (no systemd
# on CI machines), logging to $CLUSTER_PROVISIONERS_DOCKERD_LOG. A daemon
# that is already running, started by us or by anyone else, is left alone,
# and a daemon we start is left running afterwards on purpose, so other
# jobs and developers on the machine can use it.
#
# dockerd runs with its defaults (--iptables=true, --userland-proxy=true),
# and no extra flags were needed on the Debian 12 CI machines (kernel with
# nf_tables, cgroup v1, overlay2). With these defaults, a container started
# with `-p 127.0.0.1:HOSTPORT:PORT` is reachable from the host: Docker's NAT
# rules skip 127.0.0.0/8, so docker-proxy serves host connections to
# loopback. Extra flags can be passed in CLUSTER_PROVISIONERS_DOCKERD_FLAGS.
# If you change --iptables or --userland-proxy, check loopback ports again.
#
# Usage: .ci/lib/docker.sh   (as root; exits 0 once `docker info` works)
set -euo pipefail

log=${CLUSTER_PROVISIONERS_DOCKERD_LOG:-/tmp/cluster-provisioners-dockerd.log}
timeout=${CLUSTER_PROVISIONERS_DOCKERD_TIMEOUT:-60}
read -r -a extra_flags <<<"${CLUSTER_PROVISIONERS_DOCKERD_FLAGS:-}"

say() { echo "docker.sh: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

engine_up() { docker info >/dev/null 2>&1; }

# 1. Install the engine if it is missing (docker.io pulls containerd, runc).
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || die "docker.io is not installed and we are not root"
    say "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update unless the package lists are less than an hour old.
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 -print -quit) ]]; then
        apt-get -o DPkg::Lock::Timeout=300 update
    fi
    apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends docker.io
fi

# 2. Already answering: nothing to do.
if engine_up; then
    say "engine already running ($(docker version --format '{{.Server.Version}}'))"
    exit 0
fi

# 3. Start dockerd, unless one is already starting up (then just wait for it).
if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd process found but not answering yet; waiting for it"
    dockerd_pid=$(pgrep -x dockerd | head -n1)
else
    [[ $(id -u) -eq 0 ]] || die "cannot start dockerd: not root (and docker info fails)"
    say "starting dockerd${extra_flags[*]:+ ${extra_flags[*]}} (log: $log)"
    # setsid + nohup: the daemon outlives this script and the CI job.
    setsid nohup dockerd "${extra_flags[@]}" >>"$log" 2>&1 </dev/null &
    dockerd_pid=$!
fi

# 4. Wait for the socket to answer; fail fast if the daemon died.
for ((i = 0; i < timeout; i++)); do
    if engine_up; then
        say "engine up after ${i}s ($(docker version --format '{{.Server.Version}}'))"
        exit 0
    fi
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
        tail -n 30 "$log" >&2 || true
        die "dockerd exited during startup; see $log"
    fi
    sleep 1
done
tail -n 30 "$log" >&2 || true
die "dockerd did not answer 'docker info' within ${timeout}s; see $log"
