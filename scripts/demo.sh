#!/usr/bin/env bash
# layerfs demo: build layerfs, build three layers from real Debian packages,
# mount them with layerfs, look around, make changes, and show that the upper
# dir holds exactly those changes in kernel-overlayfs format.
#
# Then the seeds' scenario: an image with Python, Flask and /app.py (a Flask
# app answering "hello world!") is mounted with layerfs and the app served
# from a chroot on 127.0.0.1; the app is changed through the mount to say
# "hello beautiful world!" and restarted; `layerfs diff` shows the change; a
# second image with its own /app2.py shares the Python and Flask layers and
# runs at the same time, each container's change in its own upper; finally
# `layerfs export` turns the first upper into a layer tar, `layerfs import`
# unpacks it, and the image plus that layer serves "hello beautiful world!".
#
# Usage (as root, on Debian 12): scripts/demo.sh
#
# Layers are cached in .cache/layers (and .deb files in .cache/debs), so a
# second run is quick. Upper, work and mount dirs live in a temp dir that is
# unmounted and removed on exit, also when a step fails; the app servers are
# stopped then too.
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
command -v curl >/dev/null || need+=(curl)
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
SERVERS=()      # pids of the app servers started below
SEED_MNTS=()    # mount points of the seeds' containers
cleanup() {
    local rc=$? pid m still=0
    set +e
    for pid in "${SERVERS[@]}"; do stop_server "$pid"; done
    unmount "$MNT"
    unmount "$KMNT"
    for m in "${SEED_MNTS[@]}"; do unmount "$m"; mountpoint -q "$m" && still=1; done
    if [ $still -eq 1 ] || mountpoint -q "$MNT" || mountpoint -q "$KMNT"; then
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

# =============================================================================
# The seeds' scenario: a Flask app on real layers
# =============================================================================

# free_port: a TCP port nobody listens on (per /proc/net/tcp{,6}).
free_port() {
    local port hex
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 30000))
        printf -v hex ':%04X ' "$port"
        if ! grep -q "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    fail "no free port found"
}

# stop_server PID: SIGTERM, wait up to 10 s, then SIGKILL.
stop_server() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

# serve MNT SCRIPT PORT: start `chroot MNT python3 SCRIPT` listening on
# 127.0.0.1:PORT in the background; sets SERVER to its pid.
SERVER=''
serve() {
    local mnt=$1 script=$2 port=$3 log
    log="$SEEDS/$(basename "$script" .py)-$port.log"
    printf '%s$ PORT=%s PYTHONDONTWRITEBYTECODE=1 chroot %s python3 %s &%s\n' \
        "$B" "$port" "$(short "$mnt")" "$script" "$N"
    PORT=$port PYTHONDONTWRITEBYTECODE=1 chroot "$mnt" python3 "$script" >"$log" 2>&1 &
    SERVER=$!
    SERVERS+=("$SERVER")
}

# short PATH: PATH with $C1/$C2/$C3 for the containers' dirs.
short() {
    local p=$1 c
    for c in C1 C2 C3; do
        if [ -n "${!c:-}" ] && [ "${p#"${!c}"/}" != "$p" ]; then p="\$$c/${p#"${!c}"/}"; fi
    done
    printf '%s' "$p"
}

# expect_http PORT TEXT: poll http://127.0.0.1:PORT/ (30 s at most) until it
# answers, and check that the answer is TEXT.
expect_http() {
    local port=$1 want=$2 got='' start=$SECONDS
    printf '%s$ curl http://127.0.0.1:%s/%s\n' "$B" "$port" "$N"
    while [ $((SECONDS - start)) -lt 30 ]; do
        if got=$(curl -s --fail --max-time 2 "http://127.0.0.1:$port/"); then
            echo "$got"
            [ "$got" = "$want" ] || fail "expected '$want', got '$got'"
            ok "127.0.0.1:$port answers '$want' (after $((SECONDS - start))s)"
            return 0
        fi
        # The server died (say, the port was taken after all): show why.
        if [ -n "$SERVER" ] && ! kill -0 "$SERVER" 2>/dev/null; then
            cat "$SEEDS"/*-"$port".log >&2 || true
            fail "the app server on port $port exited"
        fi
        sleep 0.2
    done
    cat "$SEEDS"/*-"$port".log >&2 || true
    fail "no answer from 127.0.0.1:$port within 30 s"
}

# expect_diff MNT TEXT: `layerfs diff MNT` prints exactly TEXT.
expect_diff() {
    local got
    printf '%s$ layerfs diff %s%s\n' "$B" "$(short "$1")" "$N"
    got=$(layerfs diff "$1")
    if [ -n "$got" ]; then printf '%s\n' "$got"; else echo "(no changes)"; fi
    [ "$got" = "$2" ] || fail "expected the diff '$2'"
}

seeds_start=$SECONDS
SEEDS="$TMP/seeds"
mkdir -p "$SEEDS"

section "Seeds 1/6: two images from Debian packages, sharing their Python and Flask layers"
echo "image 1 = hello (/app.py) + flask + python + base; image 2 = app2 (/app2.py) + the same three"
printf '%s$ IMAGE1=$(scripts/debian-layers.sh $LAYERS hello flask python base)%s\n' "$B" "$N"
IMAGE1=$(scripts/debian-layers.sh "$LAYERS" hello flask python base)
printf '%s$ IMAGE2=$(scripts/debian-layers.sh $LAYERS app2 flask python base)%s\n' "$B" "$N"
IMAGE2=$(scripts/debian-layers.sh "$LAYERS" app2 flask python base)
echo "IMAGE1=$IMAGE1"
echo "IMAGE2=$IMAGE2"
echo "The flask layer: python3-flask and what it needs in a chroot (the smallest set that works):"
show 'cd $LAYERS/flask/usr/share/doc && ls'
show 'cat $LAYERS/hello/app.py'
show 'du -sh $LAYERS/base $LAYERS/python $LAYERS/flask $LAYERS/hello $LAYERS/app2'

touch "$SEEDS/.layers-built"   # to check below that no layer is written

section "Seeds 2/6: mount image 1 and serve the app from a chroot"
C1="$SEEDS/c1"
mkdir -p "$C1/upper" "$C1/work" "$C1/merged"
SEED_MNTS+=("$C1/merged")
show 'layerfs mount --lower $LAYERS/hello --lower $LAYERS/flask --lower $LAYERS/python --lower $LAYERS/base --upper $C1/upper --work $C1/work $C1/merged'
PORT1=$(free_port)
serve "$C1/merged" /app.py "$PORT1"
S1=$SERVER
expect_http "$PORT1" "hello world!"
show "kill $S1"
stop_server "$S1"

section "Seeds 3/6: change the app through the mount and restart it"
show "sed -i 's/hello world!/hello beautiful world!/' \$C1/merged/app.py"
serve "$C1/merged" /app.py "$PORT1"
S1=$SERVER
expect_http "$PORT1" "hello beautiful world!"
grep -q '"hello world!"' "$LAYERS/hello/app.py" || fail "the hello layer was modified"
ok "the hello layer still says \"hello world!\": the change is in the upper"

section "Seeds 4/6: layerfs diff shows exactly the change"
expect_diff "$C1/merged" "C /app.py"
show 'cd $C1/upper && find . -mindepth 1'
ok "C /app.py, and nothing else (Python runs with PYTHONDONTWRITEBYTECODE=1: no __pycache__)"

section "Seeds 5/6: image 2 on the same layers, running next to image 1"
C2="$SEEDS/c2"
mkdir -p "$C2/upper" "$C2/work" "$C2/merged"
SEED_MNTS+=("$C2/merged")
show 'layerfs mount --lower $LAYERS/app2 --lower $LAYERS/flask --lower $LAYERS/python --lower $LAYERS/base --upper $C2/upper --work $C2/work $C2/merged'
PORT2=$(free_port)
[ "$PORT2" != "$PORT1" ] || PORT2=$(free_port)
serve "$C2/merged" /app2.py "$PORT2"
S2=$SERVER
expect_http "$PORT2" "hello from app 2"
SERVER=$S1
expect_http "$PORT1" "hello beautiful world!"
echo "Both read the shared layers' files from the same place on disk (same inode):"
show 'stat -c "%i %n" $LAYERS/flask/usr/lib/python3/dist-packages/flask/app.py $C1/merged/usr/lib/python3/dist-packages/flask/app.py $C2/merged/usr/lib/python3/dist-packages/flask/app.py'
echo "Container 2 writes a file; container 1 does not see it:"
show "chroot \$C2/merged sh -c 'echo visited > /visits.txt'"
[ ! -e "$C1/merged/visits.txt" ] || fail "container 1 sees container 2's file"
ok "/visits.txt is in container 2 only"
expect_diff "$C1/merged" "C /app.py"
expect_diff "$C2/merged" "A /visits.txt"
show 'find $C1/upper $C2/upper -mindepth 1'
written=$(find "$LAYERS"/{base,python,flask,hello,app2} -newer "$SEEDS/.layers-built" -print -quit)
[ -z "$written" ] || fail "a layer was written: $written"
ok "each container's change is in its own upper; the shared layers are not written"
show "kill $S1 $S2"
stop_server "$S1"
stop_server "$S2"
show 'umount $C2/merged'

section "Seeds 6/6: export the upper as a layer, import it on top of image 1, serve again"
show 'layerfs export $C1/merged -o $SEEDS/app-change.tar'
show 'tar -tvf $SEEDS/app-change.tar'
show 'umount $C1/merged'
show 'layerfs import $SEEDS/app-change.tar $SEEDS/imported'
NEW=$(layerfs import -q "$SEEDS/app-change.tar" "$SEEDS/imported")
NEW=${NEW#lowerdir=}
[ -d "$NEW" ] || fail "layerfs import printed no layer directory"
echo "NEW=$NEW"
C3="$SEEDS/c3"
mkdir -p "$C3/upper" "$C3/work" "$C3/merged"
SEED_MNTS+=("$C3/merged")
show 'layerfs mount --lower $NEW --lower $LAYERS/hello --lower $LAYERS/flask --lower $LAYERS/python --lower $LAYERS/base --upper $C3/upper --work $C3/work $C3/merged'
PORT3=$(free_port)
serve "$C3/merged" /app.py "$PORT3"
S3=$SERVER
expect_http "$PORT3" "hello beautiful world!"
show "kill $S3"
stop_server "$S3"
expect_diff "$C3/merged" ""
show 'umount $C3/merged'
ok "the exported layer on top of image 1 serves \"hello beautiful world!\" (seeds part: $((SECONDS - seeds_start))s)"

section "Done"
