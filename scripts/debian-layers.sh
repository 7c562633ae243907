#!/usr/bin/env bash
# Build three real overlay layers from Debian packages:
#
#   DEST/base    busybox-static, libc6, libgcc-s1 (+ busybox applet symlinks, /etc/passwd)
#   DEST/python  python3-minimal and what it needs to run in a chroot
#   DEST/app     /app.py, plus whiteouts and an opaque dir hiding parts of the layers below
#
# Usage: scripts/debian-layers.sh DEST
#
# The .deb files are kept in .cache/debs (in the repository), so a re-run needs
# no network; a layer is rebuilt only when its packages or this script change.
# Progress goes to stderr; the only line on stdout is the lowerdir string
# (topmost first), ready for `-o lowerdir=...` or kernel overlayfs:
#
#   lower=$(scripts/debian-layers.sh /tmp/layers)
#   mount -t overlay overlay -o lowerdir="$lower",upperdir=U,workdir=W MNT
#
# Needs root (dpkg-deb -x keeps owners; whiteouts are device nodes; opaque
# dirs use a trusted.* xattr), plus apt-get, dpkg-deb and setfattr (attr).
set -euo pipefail

BASE_PKGS=(busybox-static libc6 libgcc-s1)
PYTHON_PKGS=(python3-minimal python3.11-minimal libpython3.11-minimal libexpat1 zlib1g libssl3)

log() { printf '%s\n' "$*" >&2; }
die() { log "debian-layers.sh: error: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST"
[ "$(id -u)" -eq 0 ] || die "must run as root (layers keep owners, whiteouts are device nodes)"
for tool in apt-get dpkg-deb setfattr mknod; do
    command -v "$tool" >/dev/null || die "missing '$tool' (setfattr: apt-get install attr)"
done

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
CACHE="${LAYERFS_DEB_CACHE:-$REPO/.cache/debs}"
mkdir -p "$1" "$CACHE"
DEST="$(cd "$1" && pwd)"

# Newest cached .deb of package $1, or nothing.
cached_deb() {
    local f
    f=$(ls -1t "$CACHE/$1"_*.deb 2>/dev/null | head -n 1) || true
    printf '%s' "$f"
}

# Download whatever is not cached yet; refresh the package lists only if
# apt cannot find a package (a fresh machine may have stale or no lists).
fetch() {
    local missing=() p
    for p in "$@"; do
        [ -n "$(cached_deb "$p")" ] || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    log "downloading: ${missing[*]}"
    if ! (cd "$CACHE" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2); then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get -q update >&2
        (cd "$CACHE" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2) \
            || die "could not download: ${missing[*]}"
    fi
}

# Stamp of a layer: this script plus the exact .deb files that go into it.
stamp_of() {
    local name=$1; shift
    {
        echo "layer $name"
        sha256sum "$SCRIPT" | cut -d' ' -f1
        local p
        for p in "$@"; do basename "$(cached_deb "$p")"; done
    } | sha256sum | cut -d' ' -f1
}

# build_layer NAME FILL_FUNCTION PKG... : unpack PKGs into DEST/NAME, then run
# FILL_FUNCTION DIR for the extras. Built in a temp dir and renamed into place.
build_layer() {
    local name=$1 fill=$2; shift 2
    local dir="$DEST/$name" stampfile="$DEST/.$name.stamp" stamp tmp p
    stamp=$(stamp_of "$name" "$@")
    if [ -d "$dir" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$stamp" ]; then
        log "layer $name: up to date"
        return 0
    fi
    log "layer $name: building from ${*:-no packages}"
    tmp="$DEST/.$name.tmp"
    rm -rf "$tmp"
    mkdir "$tmp"
    for p in "$@"; do
        dpkg-deb -x "$(cached_deb "$p")" "$tmp"
    done
    "$fill" "$tmp"
    rm -rf "$dir" "$stampfile"
    mv "$tmp" "$dir"
    echo "$stamp" >"$stampfile"
}

fill_base() {
    local root=$1 applet
    # busybox-static ships only /bin/busybox: add its applets as symlinks
    # (where the packages did not already put a real file).
    while read -r applet; do
        case $applet in ""|linuxrc) continue ;; esac
        if [ -e "$root/$applet" ] || [ -L "$root/$applet" ]; then continue; fi
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    done < <("$root/bin/busybox" --list-full)
    mkdir -p "$root/etc" "$root/root" "$root/tmp" "$root/proc" "$root/dev"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    echo layerfs-demo >"$root/etc/hostname"
}

fill_python() {
    :
}

fill_app() {
    local root=$1
    cat >"$root/app.py" <<'PY'
import os
import platform

print(f"hello from /app.py: Python {platform.python_version()} on {platform.machine()}")
for path in ["/usr/bin/python3", "/usr/bin/py3compile", "/usr/share/man",
             "/usr/share/doc/busybox-static", "/usr/share/doc/app/README"]:
    print(f"  {path:32} {'present' if os.path.lexists(path) else 'hidden by the app layer'}")
PY
    mkdir -p "$root/usr/bin" "$root/usr/share/doc/app"
    # Whiteouts (char device 0/0): hide two files and a whole directory
    # that the python layer brings.
    mknod "$root/usr/bin/py3compile" c 0 0
    mknod "$root/usr/bin/py3clean" c 0 0
    mknod "$root/usr/share/man" c 0 0
    # Opaque directory: /usr/share/doc shows only what this layer has.
    echo "The app layer replaces /usr/share/doc with this file." >"$root/usr/share/doc/app/README"
    setfattr -n trusted.overlay.opaque -v y "$root/usr/share/doc"
}

start=${EPOCHREALTIME/./}
fetch "${BASE_PKGS[@]}" "${PYTHON_PKGS[@]}"
build_layer base fill_base "${BASE_PKGS[@]}"
build_layer python fill_python "${PYTHON_PKGS[@]}"
build_layer app fill_app
ms=$(( (${EPOCHREALTIME/./} - start) / 1000 ))
log "layers ready in $DEST ($((ms / 1000)).$(printf '%03d' $((ms % 1000)))s)"

# lowerdir string, topmost first; ':' ',' '\' in paths are escaped with '\'.
esc() { local s=${1//\\/\\\\}; s=${s//:/\\:}; printf '%s' "${s//,/\\,}"; }
printf '%s:%s:%s\n' "$(esc "$DEST/app")" "$(esc "$DEST/python")" "$(esc "$DEST/base")"
