#!/usr/bin/env bash
# The container engine for building and running trainyard's images on a Debian host (a
# workstation or CI), as root:
#   bash docker/engine.sh install      podman + buildah, and settings for hosts whose kernel
#                                      or sandbox refuse podman's defaults (see below)
#   bash docker/engine.sh base NAME..  where no registry can be reached: a Debian bookworm
#                                      base made with debootstrap, tagged as each NAME (the
#                                      Dockerfile then builds unchanged: it only needs
#                                      Debian/Ubuntu package names)
#   bash docker/engine.sh status
set -euo pipefail

CONF=/etc/containers/containers.conf.d/50-trainyard.conf
MIRROR=${DEBIAN_MIRROR:-}

log() { printf '[engine] %s\n' "$*"; }

install_engine() {
    if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah runc crun containernetworking-plugins catatonit debootstrap \
            skopeo uidmap fuse-overlayfs >/dev/null
    fi
    mkdir -p "$(dirname "$CONF")"
    # - ulimits: crun's default RLIMIT_NOFILE is refused inside some sandboxes
    # - runc + cgroupfs: hosts with hybrid cgroups (no systemd) cannot use crun/systemd
    # - netns none: containers get loopback only unless a run asks for more (builds pass
    #   --network host to reach the package index)
    # - file events: no journald here
    cat >"$CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    podman info --format '{{.Host.OCIRuntime.Name}}/{{.Store.GraphDriverName}}' >/dev/null
    log "podman $(podman version --format '{{.Client.Version}}') ready ($CONF)"
}

debian_mirror() {
    if [ -n "$MIRROR" ]; then echo "$MIRROR"; return; fi
    # the mirror this host's apt uses (deb822 sources or a classic sources.list)
    local found
    found=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
    [ -n "$found" ] || found=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
    echo "${found:-http://deb.debian.org/debian}"
}

make_base() {
    [ $# -gt 0 ] || { echo "usage: $0 base NAME..." >&2; exit 2; }
    local missing=()
    for name in "$@"; do podman image exists "$name" || missing+=("$name"); done
    if [ ${#missing[@]} -eq 0 ]; then log "base images present: $*"; return; fi
    local root
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    log "debootstrap bookworm from $(debian_mirror)"
    debootstrap --variant=minbase bookworm "$root" "$(debian_mirror)" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/trainyard-base:bookworm >/dev/null
    for name in "${missing[@]}"; do
        podman tag localhost/trainyard-base:bookworm "$name"
        log "tagged the local Debian base as $name"
    done
}

case "${1:-}" in
    install) install_engine ;;
    base) shift; make_base "$@" ;;
    status) podman images; podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' ;;
    *) echo "usage: $0 install|base NAME...|status" >&2; exit 2 ;;
esac
