# Shared by images/build-test-image.sh and images/build-server-image.sh: what both need
# to build an image without any container registry. Source it; it defines functions and
# the array pip_target, and changes nothing by itself.

# Print the URI of the Debian mirror configured for apt: the first "deb"
# source whose suites include bookworm, else the first non-security one.
# Reads both one-line (*.list) and deb822 (*.sources) files.
apt_mirror() {
    local files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk '
        # Emit "URI SUITE" for each deb source, in file order.
        function emit(types, uris, suites,   nu, ns, u, s, U, S) {
            if (types !~ /(^| )deb( |$)/) return
            nu = split(uris, U, " "); ns = split(suites, S, " ")
            for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++) print U[u], S[s]
        }
        FNR == 1 { if (t != "" && !off) emit(t, u, s); t = u = s = ""; off = 0 }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { if (!off && t != "") emit(t, u, s); t = u = s = ""; off = 0; next }
            if ($0 ~ /^#/) next
            key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
            if (key == "types") t = $0
            else if (key == "uris") u = $0
            else if (key == "suites") s = $0
            else if (key == "enabled" && tolower($0) == "no") off = 1
            next
        }
        $1 == "deb" {
            line = $0; sub(/#.*/, "", line); gsub(/\[[^]]*\]/, "", line)
            split(line, F, " "); print F[2], F[3]
        }
        END { if (t != "" && !off) emit(t, u, s) }
    ' "${files[@]}" | awk '
        $1 !~ /^(https?|file):/ { next }
        $2 == "bookworm" && !best { best = $1 }
        $2 !~ /-(security|updates|backports)$/ && $1 !~ /security/ && !any { any = $1 }
        END { if (best) print best; else if (any) print any }
    '
}

# debian_rootfs OUT.tar PACKAGES [MMDEBSTRAP_ARG...]: a minbase Debian bookworm rootfs with PACKAGES (comma
# separated) made by mmdebstrap from the machine's apt mirror (or
# $CLUSTER_PROVISIONERS_DEBIAN_MIRROR), without docs, man pages or translations. Installs
# mmdebstrap with apt first if it is missing. OUT.tar appears only when complete.
debian_rootfs() {
    local out=$1 packages=$2 mirror tmp_tar
    shift 2
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        say "installing mmdebstrap"
        export DEBIAN_FRONTEND=noninteractive
        # apt-get update unless the package lists are less than an hour old.
        if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 -print -quit) ]]; then
            apt-get -o DPkg::Lock::Timeout=300 update
        fi
        apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
            mmdebstrap debian-archive-keyring
    fi
    mirror=${CLUSTER_PROVISIONERS_DEBIAN_MIRROR:-$(apt_mirror)}
    mirror=${mirror:-http://deb.debian.org/debian}
    local aptopts=()
    # Snapshot mirrors serve Release files whose Valid-Until has passed.
    [[ $mirror == *snapshot.debian.org* ]] && aptopts+=(--aptopt='Acquire::Check-Valid-Until "false"')
    say "mmdebstrap bookworm ($packages) from $mirror"
    # mmdebstrap picks its output format by the name's extension: keep ".tar" last.
    tmp_tar=$(dirname "$out")/.$(basename "$out" .tar).$$.tar
    # shellcheck disable=SC2064  # expand now: the trap must remove this very file
    trap "rm -f '$tmp_tar'" EXIT
    mmdebstrap --variant=minbase \
        --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        "${aptopts[@]}" "$@" \
        bookworm "$tmp_tar" "$mirror"
    mv "$tmp_tar" "$out"
    trap - EXIT
}

# pip options selecting wheels for the rootfs's CPython 3.11 (x86_64, glibc 2.36), whatever
# the host's Python is: binary wheels only, never a build.
pip_target=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64
    --platform any)
