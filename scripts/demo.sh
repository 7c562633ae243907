#!/usr/bin/env bash
# layerfs demo: build layerfs, build three layers from real Debian packages,
# mount them with layerfs, look around, make changes, and show that the upper
# dir holds exactly those changes in kernel-overlayfs format.
#
# Usage (as root, on Debian 12): scripts/demo.sh
#
# Layers are cached in .cache/layers (and .deb files in .cache/debs), so a
# second run is quick. Upper, work and mount dirs live in a temp dir that is
# unmounted and removed on exit, also when a step fails.
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$REPO"
export PATH="$PATH:${HOME:-/root}/.cargo/bin"

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' N=$'\e[0m'; else B='' G='' R='' N=''; fi
section() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
run() { printf '%s$ %s%s\n' "$B" "$*" "$N"; "$@"; }
# show 'CMD': print CMD as written (with $MNT etc. unexpanded), then run it
# in a subshell (so a 'cd' in it does not keep the mount busy).
show() { printf '%s$ %s%s\n' "$B" "$1" "$N"; (eval "$1"); }
ok() { printf '%s  ok: %s%s\n' "$G" "$*" "$N"; }
fail() { printf '%s  FAILED: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (FUSE mount with allow_other, chroot, whiteout device nodes)"

# --- tools ------------------------------------------------------------------
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v setfattr >/dev/null || need+=(attr)
if [ ${#need[@]} -gt 0 ]; then
    section "Installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q update
    apt-get -q install -y --no-install-recommends "${need[@]}"
fi
[ -e /dev/fuse ] || mknod -m 666 /dev/fuse c 10 229

section "Building layerfs (cargo build --release)"
run cargo build --release
export PATH="$REPO/target/release:$PATH"   # 'layerfs' below is this build

section "Building layers from Debian packages (scripts/debian-layers.sh)"
LAYERS="$REPO/.cache/layers"
LOWERDIR=$(scripts/debian-layers.sh "$LAYERS")
echo "lowerdir=$LOWERDIR"

# --- mount ------------------------------------------------------------------
TMP=$(mktemp -d /tmp/layerfs-demo.XXXXXX)
UPPER="$TMP/upper" WORK="$TMP/work" MNT="$TMP/merged" KMNT="$TMP/kernel"
mkdir -p "$UPPER" "$WORK" "$MNT" "$KMNT"
echo "LAYERS=$LAYERS"
echo "UPPER=$UPPER  WORK=$WORK  MNT=$MNT"

unmount() {
    local m=$1
    mountpoint -q "$m" || return 0
    fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" || true
}
cleanup() {
    local rc=$?
    set +e
    unmount "$MNT"
    unmount "$KMNT"
    if mountpoint -q "$MNT" || mountpoint -q "$KMNT"; then
        echo "warning: could not unmount, leaving $TMP in place" >&2
    else
        rm -rf "$TMP"
    fi
    [ $rc -eq 0 ] || printf '%sdemo failed (exit %d)%s\n' "$R" "$rc" "$N" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

section "Mounting with layerfs"
show 'layerfs mount --lower $LAYERS/app --lower $LAYERS/python --lower $LAYERS/base --upper $UPPER --work $WORK $MNT'
echo '(same as: layerfs -o lowerdir=$LAYERS/app:$LAYERS/python:$LAYERS/base,upperdir=$UPPER,workdir=$WORK $MNT)'
mountpoint -q "$MNT" || fail "$MNT is not a mount point after 'layerfs mount' returned"
show 'findmnt -n -o SOURCE,FSTYPE,OPTIONS $MNT'

# --- look around ------------------------------------------------------------
section "The merged root: base + python + app"
show 'ls $MNT'
show 'cat $MNT/etc/hostname'

section "Whiteouts and an opaque dir in the app layer hide parts of the python layer"
echo "In the python layer:"
show 'cd $LAYERS/python && ls -d usr/bin/* usr/share/*'
echo "In the app layer (c 0, 0 = whiteout; usr/share/doc carries trusted.overlay.opaque=y):"
show 'cd $LAYERS/app && ls -l usr/bin usr/share'
show 'cd $LAYERS/app && getfattr -n trusted.overlay.opaque usr/share/doc'
echo "Through layerfs:"
show 'cd $MNT && ls -d usr/bin/py* usr/share/* usr/share/doc/*'
for gone in usr/bin/py3compile usr/bin/py3clean usr/share/man usr/share/doc/busybox-static; do
    if [ -e "$MNT/$gone" ] || [ -L "$MNT/$gone" ]; then fail "/$gone should be hidden"; fi
done
ok "/usr/bin/py3compile, /usr/bin/py3clean, /usr/share/man and /usr/share/doc/busybox-static are hidden"

section "Running programs from the merged tree"
show "chroot \$MNT /bin/busybox sh -c 'echo hi; ls /'"
if chroot "$MNT" /usr/bin/python3 -c 'print(1)' >/dev/null 2>&1; then
    show 'chroot $MNT python3 /app.py'
else
    echo "(python3 does not run in the chroot: skipping /app.py)"
    chroot "$MNT" /usr/bin/python3 -c 'print(1)' || true
fi

# --- change -----------------------------------------------------------------
section "Changing things through the mount"
show "echo 'Welcome to layerfs' > \$MNT/etc/motd"
show 'rm $MNT/usr/bin/py3versions'
show 'cat $MNT/etc/motd'
[ ! -e "$MNT/usr/bin/py3versions" ] && [ ! -L "$MNT/usr/bin/py3versions" ] || fail "py3versions still visible"
[ -L "$LAYERS/python/usr/bin/py3versions" ] || fail "the lower layer was modified"
ok "py3versions is gone from the mount and still in the python layer (lowers are never written)"

section "The upper dir holds exactly the change"
show "cd \$UPPER && find . -mindepth 1 | sort | xargs stat -c '%A %u:%g rdev=%Hr:%Lr %8s %n'"
echo "overlay xattrs in the upper dir (if any):"
show "cd \$UPPER && getfattr -R -d -m '^trusted\\.overlay\\.' -e hex . || true"
got=$(cd "$UPPER" && find . -mindepth 1 | sort | tr '\n' ' ')
want="./etc ./etc/motd ./usr ./usr/bin ./usr/bin/py3versions "
[ "$got" = "$want" ] || fail "upper has [$got], expected [$want]"
wh="$UPPER/usr/bin/py3versions"
[ -c "$wh" ] && [ "$(stat -c '%Hr:%Lr' "$wh")" = "0:0" ] || fail "usr/bin/py3versions is not a 0/0 whiteout"
[ "$(cat "$UPPER/etc/motd")" = "Welcome to layerfs" ] || fail "etc/motd has the wrong content"
ok "upper = new etc/motd + whiteout (char 0:0) usr/bin/py3versions + their parent dirs"

section "Unmounting"
show 'fusermount3 -u $MNT'
! mountpoint -q "$MNT" || fail "$MNT still mounted"
ok "unmounted"

section "Kernel overlayfs reads the same upper dir"
if ! grep -qw overlay /proc/filesystems; then
    echo "(no kernel overlayfs on this machine: skipped)"
elif show 'mount -t overlay overlay -o lowerdir=$LOWERDIR,upperdir=$UPPER,workdir=$WORK $KMNT'; then
    show 'cat $KMNT/etc/motd'
    show 'cd $KMNT && ls -d usr/bin/py*'
    show 'umount $KMNT'
else
    printf '%s  warning: the kernel refused this upper dir (see above)%s\n' "$R" "$N"
fi

section "Done"
