#!/usr/bin/env bash
# Build real overlay layers from Debian packages:
#
#   DEST/base    busybox-static, libc6, libgcc-s1 (+ busybox applet symlinks, /etc/passwd)
#   DEST/python  python3-minimal and what it needs to run in a chroot
#   DEST/app     /app.py, plus whiteouts and an opaque dir hiding parts of the layers below
#   DEST/flask   python3-flask and the Python packages and stdlib it needs (on python)
#   DEST/hello   /app.py: a Flask app answering "hello world!" (on flask)
#   DEST/app2    /app2.py: a Flask app answering "hello from app 2" (on flask)
#
# Usage: scripts/debian-layers.sh DEST [LAYER...]
#
# LAYERs are the layers of one image, topmost first; the default is the
# three-layer image `app python base`. Only those layers are built. Images
# built into the same DEST share their common layers (the same directories):
#
#   scripts/debian-layers.sh /tmp/layers hello flask python base   # the Flask app
#   scripts/debian-layers.sh /tmp/layers app2 flask python base    # a second app
#
# The Flask apps listen on 127.0.0.1:$PORT (default 8080 and 8081); run them
# with PYTHONDONTWRITEBYTECODE=1 (or python3 -B) so that Python's byte-code
# cache does not end up in the upper layer.
#
# The .deb files are kept in .cache/debs (in the repository), so a re-run needs
# no network; a layer is rebuilt only when its packages or the function that
# fills it change. Concurrent runs on the same DEST wait for each other.
# Progress goes to stderr; the only line on stdout is the lowerdir string
# (topmost first), ready for `-o lowerdir=...` or kernel overlayfs:
#
#   lower=$(scripts/debian-layers.sh /tmp/layers)
#   mount -t overlay overlay -o lowerdir="$lower",upperdir=U,workdir=W MNT
#
# Needs root (dpkg-deb -x keeps owners; whiteouts are device nodes; opaque
# dirs use a trusted.* xattr), plus apt-get, dpkg-deb, setfattr (attr) and flock.
set -euo pipefail

BASE_PKGS=(busybox-static libc6 libgcc-s1)
PYTHON_PKGS=(python3-minimal python3.11-minimal libpython3.11-minimal libexpat1 zlib1g libssl3)
# The smallest set with which `import flask` works and the development server
# answers (Flask 2.2 in bookworm; blinker, a Recommends, is optional).
# libpython3.11-stdlib brings json, http.server, logging and the rest of the
# standard library that python3-minimal leaves out.
FLASK_PKGS=(python3-flask python3-werkzeug python3-jinja2 python3-markupsafe
            python3-itsdangerous python3-click libpython3.11-stdlib)
LAYERS=(base python app flask hello app2)

log() { printf '%s\n' "$*" >&2; }
die() { log "debian-layers.sh: error: $*"; exit 1; }

[ $# -ge 1 ] || die "usage: $0 DEST [LAYER...] (layers: ${LAYERS[*]})"
[ "$(id -u)" -eq 0 ] || die "must run as root (layers keep owners, whiteouts are device nodes)"
for tool in apt-get dpkg-deb setfattr mknod flock; do
    command -v "$tool" >/dev/null || die "missing '$tool' (setfattr: apt-get install attr)"
done

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
CACHE="${LAYERFS_DEB_CACHE:-$REPO/.cache/debs}"
mkdir -p "$1" "$CACHE"
DEST="$(cd "$1" && pwd)"
shift
WANT=("$@")
[ ${#WANT[@]} -gt 0 ] || WANT=(app python base)
for name in "${WANT[@]}"; do
    case " ${LAYERS[*]} " in *" $name "*) ;; *) die "unknown layer '$name' (layers: ${LAYERS[*]})" ;; esac
done

# One builder per DEST at a time (a layer is replaced by rm + mv).
exec 9>"$DEST/.lock"
flock -w 600 9 || die "timed out waiting for another run on $DEST (lock $DEST/.lock)"

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
    # Download into a private dir and move complete files into the cache, so
    # that a concurrent run never sees a half-written .deb.
    local tmp
    tmp=$(mktemp -d "$CACHE/.download.XXXXXX")
    if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2); then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get -q -o DPkg::Lock::Timeout=300 update >&2 || true
        if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "${missing[@]}" >&2); then
            rm -rf "$tmp"
            die "could not download: ${missing[*]}"
        fi
    fi
    mv "$tmp"/*.deb "$CACHE"/
    rm -rf "$tmp"
}

# Stamp of a layer: the code that builds and fills it plus the exact .deb
# files that go into it (so adding a layer to this script rebuilds no other).
stamp_of() {
    local name=$1 fill=$2; shift 2
    {
        echo "layer $name"
        declare -f build_layer "$fill"
        # and the helpers it calls
        if declare -f "$fill" | grep -qw flask_app; then declare -f flask_app; fi
        local p
        for p in "$@"; do basename "$(cached_deb "$p")"; done
    } | sha256sum | cut -d' ' -f1
}

# build_layer NAME FILL_FUNCTION PKG... : unpack PKGs into DEST/NAME, then run
# FILL_FUNCTION DIR for the extras. Built in a temp dir and renamed into place.
build_layer() {
    local name=$1 fill=$2; shift 2
    local dir="$DEST/$name" stampfile="$DEST/.$name.stamp" stamp tmp p
    stamp=$(stamp_of "$name" "$fill" "$@")
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

fill_flask() {
    :
}

# A Flask app file: flask_app FILE GREETING DEFAULT_PORT
flask_app() {
    cat >"$1" <<PY
import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "$2"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "$3")))
PY
}

fill_hello() {
    flask_app "$1/app.py" "hello world!" 8080
}

fill_app2() {
    flask_app "$1/app2.py" "hello from app 2" 8081
}

wanted() { case " ${WANT[*]} " in *" $1 "*) return 0 ;; esac; return 1; }

start=${EPOCHREALTIME/./}
pkgs=()
if wanted base; then pkgs+=("${BASE_PKGS[@]}"); fi
if wanted python; then pkgs+=("${PYTHON_PKGS[@]}"); fi
if wanted flask; then pkgs+=("${FLASK_PKGS[@]}"); fi
if [ ${#pkgs[@]} -gt 0 ]; then fetch "${pkgs[@]}"; fi
for name in "${LAYERS[@]}"; do
    wanted "$name" || continue
    case $name in
        base) build_layer base fill_base "${BASE_PKGS[@]}" ;;
        python) build_layer python fill_python "${PYTHON_PKGS[@]}" ;;
        app) build_layer app fill_app ;;
        flask) build_layer flask fill_flask "${FLASK_PKGS[@]}" ;;
        hello) build_layer hello fill_hello ;;
        app2) build_layer app2 fill_app2 ;;
    esac
done
ms=$(( (${EPOCHREALTIME/./} - start) / 1000 ))
log "layers ready in $DEST ($((ms / 1000)).$(printf '%03d' $((ms % 1000)))s)"

# lowerdir string, topmost first; ':' ',' '\' in paths are escaped with '\'.
esc() { local s=${1//\\/\\\\}; s=${s//:/\\:}; printf '%s' "${s//,/\\,}"; }
out=""
for name in "${WANT[@]}"; do
    out+="${out:+:}$(esc "$DEST/$name")"
done
printf '%s\n' "$out"
