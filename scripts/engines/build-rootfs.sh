#!/usr/bin/env bash
# Build the root filesystem tarball that the engine tests import as an image:
# busybox-static (a shell and the usual tools as applet symlinks), python3
# with enough of its standard library for http.server, and /app.py, a tiny
# web app that answers "hello world!" on 127.0.0.1:$PORT (default 5000).
#
# Usage: scripts/engines/build-rootfs.sh OUT.tar
#
# The .deb files are cached in .cache/debs (shared with debian-layers.sh), so a
# re-run needs no network; OUT.tar is rebuilt only when the packages or this
# script change (a stamp file OUT.tar.stamp beside it records that).
# Needs root (dpkg-deb -x keeps owners), apt-get, dpkg-deb and tar.
set -euo pipefail

PKGS=(busybox-static libc6 python3-minimal python3.11-minimal libpython3.11-minimal
      libpython3.11-stdlib libexpat1 zlib1g)

log() { printf 'build-rootfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT.tar"
[ "$(id -u)" -eq 0 ] || die "must run as root (the rootfs keeps owners)"
for tool in apt-get dpkg-deb tar sha256sum; do
    command -v "$tool" >/dev/null || die "missing '$tool'"
done

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/../.." && pwd)"
CACHE="${LAYERFS_DEB_CACHE:-$REPO/.cache/debs}"
mkdir -p "$CACHE" "$(dirname "$1")"
OUT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"

cached_deb() {
    local f
    f=$(ls -1t "$CACHE/$1"_*.deb 2>/dev/null | head -n 1) || true
    printf '%s' "$f"
}

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

fetch "${PKGS[@]}"
stamp=$({
    sha256sum "$SCRIPT" | cut -d' ' -f1
    for p in "${PKGS[@]}"; do basename "$(cached_deb "$p")"; done
} | sha256sum | cut -d' ' -f1)
if [ -f "$OUT" ] && [ "$(cat "$OUT.stamp" 2>/dev/null)" = "$stamp" ]; then
    log "$OUT is up to date"
    exit 0
fi

tmp=$(mktemp -d "$(dirname "$OUT")/.rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir "$root"
for p in "${PKGS[@]}"; do
    dpkg-deb -x "$(cached_deb "$p")" "$root"
done

# busybox-static ships only /bin/busybox: add its applets as symlinks where
# no package put a real file.
while read -r applet; do
    case $applet in ""|linuxrc) continue ;; esac
    if [ -e "$root/$applet" ] || [ -L "$root/$applet" ]; then continue; fi
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done < <("$root/bin/busybox" --list-full)

rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian"
mkdir -p "$root/etc" "$root/root" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" \
         "$root/run" "$root/var/tmp" "$root/srv/data"
chmod 1777 "$root/tmp" "$root/var/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
echo layerfs-engines >"$root/etc/hostname"
# Files the scenarios change, delete and replace.
echo "keep me" >"$root/srv/data/keep.txt"
echo "change me" >"$root/srv/data/change.txt"
echo "delete me" >"$root/srv/data/delete.txt"
mkdir -p "$root/srv/data/olddir/sub"
echo "inside a directory that gets deleted" >"$root/srv/data/olddir/sub/file"
cat >"$root/app.py" <<'PY'
# A Flask-like "hello world" app on python3's http.server.
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = "hello world!".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5000"))
    HTTPServer(("127.0.0.1", port), Hello).serve_forever()
PY

tar --numeric-owner --xattrs -C "$root" -cf "$tmp/rootfs.tar" .
mv "$tmp/rootfs.tar" "$OUT"
echo "$stamp" >"$OUT.stamp"
log "built $OUT ($(du -h "$OUT" | cut -f1))"
