#!/usr/bin/env bash
# Benchmark layerfs against kernel overlayfs, fuse-overlayfs 1.x (Debian) and
# fuse-overlayfs 2.x (the Rust rewrite), on the same layers, interleaved.
#
# Usage (as root):  scripts/bench.sh [--quick] [--reps N] [--only REGEX]
#                       [--impl kernel,fo1,fo2,layerfs] [--out DIR] [--list]
#
#   --quick          small sizes, 1 repetition: about 2 minutes once the
#                    caches (layers, fuse-overlayfs 2.x, layerfs build) exist
#   --reps N         repetitions per workload and implementation (default 3,
#                    1 with --quick); the median is reported
#   --only REGEX     only the workload groups matching REGEX (see --list)
#   --impl LIST      implementations, comma-separated, from kernel, fo1
#                    (fuse-overlayfs 1.x), fo2 (fuse-overlayfs 2.x), layerfs;
#                    NAME+OPT+OPT adds mount options, e.g. layerfs+volatile,
#                    kernel+volatile, layerfs+threaded=1
#   --out DIR        results: bench-results.{csv,md}, bench-raw.csv,
#                    bench-info.txt (default: .cache/bench)
#   --no-build       use target/release/layerfs as it is (else: cargo build
#                    --release); LAYERFS_BIN=PATH uses another binary
#   --timeout S      per-command limit (default 900 s, 90 s with --quick)
#   --list           list the workload groups and exit
#
# Environment: BENCH_CACHE (cache dir), LAYERFS_BIN (layerfs binary to use),
# BENCH_FIO_FSYNC=1 (fio_seqwrite ends with an fsync, so it includes writeback),
# BENCH_FUSE_URING=Y|N|keep (default Y: the fuse module's enable_uring is set
# for the run and restored after it, so that FUSE servers asking for
# FUSE-over-io-uring get it; layerfs does, fuse-overlayfs does not; compare
# with --impl layerfs+uring=off).
#
# Everything is kept under $BENCH_CACHE (default: .cache/bench in the
# repository, which is gitignored): generated layers (built once, rebuilt
# when scripts/bench/gen.py or the sizes change), the Debian-package layers
# (scripts/debian-layers.sh), fuse-overlayfs 2.0.0 (cargo install --root),
# a pinned copy of the layerfs binary, and the scratch dir run/ holding the
# upper, work and mount dirs. Every run gets a fresh mount over a fresh upper
# and work dir; whatever is mounted under run/ is unmounted on exit, also on
# failure or Ctrl-C. Missing tools (fio, fuse-overlayfs, fuse3, attr, git,
# python3, procps) are installed with apt-get.
#
# Cold workloads and the memory workload write to /proc/sys/vm/drop_caches
# (system-wide): run on a quiet machine for numbers worth keeping.
set -Eeuo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
BENCHDIR="$REPO/scripts/bench"
export PATH="$PATH:${HOME:-/root}/.cargo/bin"
export LC_ALL=C

# ----------------------------------------------------------------------------
# options

QUICK=0 REPS="" ONLY="" IMPLS="kernel,fo1,fo2,layerfs" OUT="" NOBUILD=0 TMO="" LIST=0
usage() { sed -n '2,/^set -E/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --reps) REPS=$2; shift ;;
        --reps=*) REPS=${1#*=} ;;
        --only) ONLY=$2; shift ;;
        --only=*) ONLY=${1#*=} ;;
        --impl|--impls) IMPLS=$2; shift ;;
        --impl=*|--impls=*) IMPLS=${1#*=} ;;
        --out) OUT=$2; shift ;;
        --out=*) OUT=${1#*=} ;;
        --no-build) NOBUILD=1 ;;
        --timeout) TMO=$2; shift ;;
        --timeout=*) TMO=${1#*=} ;;
        --list) LIST=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    MODE=quick
    : "${REPS:=1}" "${TMO:=90}"
    TREE_FILES=5000 TREE_DIRS=500 BIG_MIB=128 RR_MIB=32 SMALLW=20000 COPYUP=200 CREATE=2000
    RM_FILES=1000 CONC_READ=50 CONC_N=200 SRC_COPIES=1 REPO_COPIES=1
    DIFF_FILES=20000 DIFF_CHANGES=2000 MEM_FILES=10000 FORGET_WAIT=1
else
    MODE=full
    : "${REPS:=3}" "${TMO:=900}"
    TREE_FILES=60000 TREE_DIRS=6000 BIG_MIB=1024 RR_MIB=256 SMALLW=100000 COPYUP=1000 CREATE=10000
    RM_FILES=5000 CONC_READ=500 CONC_N=2000 SRC_COPIES=8 REPO_COPIES=8
    DIFF_FILES=100000 DIFF_CHANGES=10000 MEM_FILES=1000000 FORGET_WAIT=3
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --reps: not a positive number: $REPS" >&2; exit 2; }
[[ $TMO =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --timeout: not a positive number: $TMO" >&2; exit 2; }

# Workload groups, in run order; each emits the results listed.
GROUPS_ALL=(walk_find_cold walk_find_warm walk_stat_cold walk_stat_warm walk_lsR_cold walk_lsR_warm
    read_tar_cold read_tar_warm fio_seqread fio_seqwrite fio_randread small_writes copyup_small copyup_big
    create_files rm_lower_tree build conc_1 conc_sep_2 conc_sep_4 conc_one_2 conc_one_4 memory diff)
declare -A RESULTS=([build]="build_untar build_grep build_git_status build_total"
    [memory]="mem_walk mem_peak mem_rss_walk mem_rss_forget" [diff]="diff")
results_of() { echo "${RESULTS[$1]:-$1}"; }

if [ "$LIST" = 1 ]; then
    cat <<EOF
walk_{find,stat,lsR}_{cold,warm}  find . / find -printf (lstat all) / ls -lR over the merged tree
read_tar_{cold,warm}              tar -cf - . | wc -c: read every small file
fio_seqread fio_seqwrite          fio 1 MiB blocks, ${BIG_MIB} MiB, --direct=0 (read: a lower file)
fio_randread                      fio 4 KiB random reads of the lower file, ${RR_MIB} MiB
small_writes                      ${SMALLW} write(2) calls of 100 bytes to a new file
copyup_small copyup_big           append a byte to $COPYUP small lower files / the ${BIG_MIB} MiB file
create_files rm_lower_tree        create $CREATE files in lower dirs / rm -rf a ${RM_FILES}-file lower tree
build                             untar a source tarball, grep -r it, git status in a lower repo
conc_1 conc_{sep,one}_{2,4}       N concurrent jobs, own dirs (sep) or one shared dir (one)
memory                            daemon RSS walking a ${MEM_FILES}-file tree, and after drop_caches
diff                              layerfs diff (${DIFF_CHANGES} changes over ${DIFF_FILES} files) vs a naive walk
EOF
    exit 0
fi

SELECTED=()
for g in "${GROUPS_ALL[@]}"; do
    if [ -z "$ONLY" ] || [[ $g =~ $ONLY ]]; then SELECTED+=("$g"); fi
done
[ ${#SELECTED[@]} -gt 0 ] || { echo "bench.sh: --only '$ONLY' matches no workload (see --list)" >&2; exit 2; }
selected() { local g; for g in "${SELECTED[@]}"; do [ "$g" = "$1" ] && return 0; done; return 1; }
selected_like() { local g; for g in "${SELECTED[@]}"; do [[ $g == $1 ]] && return 0; done; return 1; }

IFS=, read -r -a IMPL_LIST <<<"$IMPLS"
for spec in "${IMPL_LIST[@]}"; do
    case ${spec%%+*} in kernel|fo1|fo2|layerfs) ;; *)
        echo "bench.sh: --impl: unknown implementation '${spec%%+*}' (kernel, fo1, fo2, layerfs)" >&2; exit 2 ;;
    esac
done

# ----------------------------------------------------------------------------
# helpers

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "bench.sh: error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (mounts, whiteouts, drop_caches)"

CACHE="$(mkdir -p "${BENCH_CACHE:-$REPO/.cache/bench}" && cd "${BENCH_CACHE:-$REPO/.cache/bench}" && pwd)"
OUT="$(mkdir -p "${OUT:-$CACHE}" && cd "${OUT:-$CACHE}" && pwd)"
case $CACHE in *[:,\ \\]*) die "the cache dir must not contain ':' ',' '\\' or spaces: $CACHE" ;; esac
DATA="$CACHE/data"
RUN="$CACHE/run"
MNT="$RUN/mnt"
LOG="$RUN/bench.log"

exec 9>"$CACHE/.bench.lock"
flock -n 9 || die "another bench.sh holds $CACHE/.bench.lock"

CHILD=""          # pid (= process group) of the command being timed
DAEMON_PID=""     # FUSE daemon of the current mount
export MNT RUN

# A daemon that exited may stay a zombie for a while (its parent is init or
# a subreaper): alive means present and not a zombie.
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# Abort the FUSE connection of mount point $1 (a hung daemon), if it is one.
abort_fuse() {
    local dev minor
    dev=$(awk -v m="$1" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1)
    minor=${dev#*:}
    if [ -n "$minor" ] && [ -w "/sys/fs/fuse/connections/$minor/abort" ]; then
        echo 1 >"/sys/fs/fuse/connections/$minor/abort" 2>/dev/null || true
    fi
}

unmount_one() {
    local m=$1 i
    is_mounted "$m" || return 0
    # a healthy daemon unmounts in milliseconds (plus writing back what it
    # caches); after a timeout it may be hung: do not wait long for it then
    if ! timeout "$( [ "${RC:-0}" = 124 ] || [ "${RC:-0}" = 137 ] && echo 5 || echo 60)" umount "$m" 2>>"$LOG"; then
        log "umount $m failed; aborting the connection and detaching it"
        abort_fuse "$m"
        timeout 30 umount "$m" 2>>"$LOG" || umount -l "$m" 2>>"$LOG" || true
    fi
    if [ -n "$DAEMON_PID" ]; then
        for i in $(seq 200); do alive "$DAEMON_PID" || break; sleep 0.025; done
        if alive "$DAEMON_PID"; then
            log "daemon $DAEMON_PID still running 5 s after umount; killing it"
            kill -9 "$DAEMON_PID" 2>/dev/null || true
        fi
        DAEMON_PID=""
    fi
    ! is_mounted "$m"
}

# Unmount everything under $RUN (deepest first).
unmount_all() {
    local m
    [ -d "$RUN" ] || return 0
    while read -r m; do
        [ -n "$m" ] && unmount_one "$m"
    done < <(awk -v p="$RUN/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        kill -TERM -- "-$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null
        sleep 1
        kill -KILL -- "-$CHILD" 2>/dev/null
    fi
    unmount_all
    [ -n "${URING_BEFORE:-}" ] && echo "$URING_BEFORE" >"$URING_PARAM" 2>/dev/null
    if [ -d "$RUN" ] && awk -v p="$RUN/" 'index($5, p) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        log "WARNING: could not unmount everything under $RUN"
        rc=1
    fi
    [ "$rc" -eq 0 ] || log "bench.sh: stopped (exit $rc); raw results so far: $OUT/bench-raw.csv"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

us_to_s() { printf '%d.%06d' $(($1 / 1000000)) $(($1 % 1000000)); }

# timed 'SHELL CODE': runs it with bash -o pipefail under timeout, in the
# background (so a signal reaches our trap at once); sets T (seconds) and RC;
# stdout in $RUN/out, stderr in $RUN/err.
timed() {
    local t0 t1
    t0=${EPOCHREALTIME/./}
    timeout -k 10 "$TMO" bash -o pipefail -c "$1" >"$RUN/out" 2>"$RUN/err" &
    CHILD=$!
    RC=0
    wait "$CHILD" || RC=$?
    CHILD=""
    t1=${EPOCHREALTIME/./}
    T=$(us_to_s $((t1 - t0)))
}

# A one-line reason from the last timed command.
reason() {
    local r
    r=$(grep -v '^\s*$' "$RUN/err" 2>/dev/null | tail -n 2 | tr '\n"' '  ' | cut -c1-300)
    case $RC in
        124|137) echo "timed out after ${TMO}s${r:+: $r}" ;;
        *) echo "exit $RC${r:+: $r}" ;;
    esac
}

RAW=""
EMITTED=()
# emit NAME VALUE UNIT STATUS CHECK MSG
emit() {
    local name=$1 value=$2 unit=$3 status=$4 check=${5:-} msg=${6:-} better=lower
    case $unit in MiB/s|IOPS|x) better=higher ;; esac
    msg=${msg//\"/\'}
    msg=${msg//$'\n'/ }
    check=${check//,/;}
    printf '%s,%s,%s,%s,%s,%s,%s,"%s","%s"\n' "$name" "$CUR_IMPL" "$CUR_REP" "$value" "$unit" \
        "$better" "$status" "$check" "$msg" >>"$RAW"
    EMITTED+=("$name")
    if [ "$status" = ok ]; then
        log "  $name $CUR_IMPL #$CUR_REP: $value $unit${check:+ [$check]}"
    else
        log "  $name $CUR_IMPL #$CUR_REP: $status: $msg"
    fi
}
# after a timed step: emit it (ok or failed); returns 1 on failure
emit_timed() {
    local name=$1 check=${2:-}
    if [ "$RC" -eq 0 ]; then
        emit "$name" "$T" s ok "$check"
    else
        emit "$name" "" s "$( [ "$RC" = 124 ] || [ "$RC" = 137 ] && echo TIMEOUT || echo FAIL)" "" "$(reason)"
        return 1
    fi
}

drop_caches() { sync; echo "${1:-3}" >/proc/sys/vm/drop_caches; }
first_line() { head -n 1 "$RUN/out" | tr -d ' \n'; }

# ----------------------------------------------------------------------------
# tools

ensure_tools() {
    local need=() c p
    for c in fio:fio fusermount3:fuse3 setfattr:attr git:git pgrep:procps dpkg-deb:dpkg \
             apt-get:apt flock:util-linux; do
        command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
    done
    [ -x /usr/bin/python3 ] || command -v python3 >/dev/null || need+=(python3)
    [ -x /usr/bin/fuse-overlayfs ] || need+=(fuse-overlayfs)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q --no-install-recommends "${need[@]}" >>"$LOG" 2>&1; then
            log "apt-get install failed; running apt-get update and retrying"
            apt-get update -q >>"$LOG" 2>&1 || true
            apt-get install -y -q --no-install-recommends "${need[@]}" >>"$LOG" 2>&1 \
                || die "could not install ${need[*]} (see $LOG)"
        fi
    fi
    if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=$(command -v python3); fi
    export PY
    [ -e /dev/fuse ] || mknod -m 666 /dev/fuse c 10 229
    grep -qw fuse /proc/filesystems || modprobe fuse 2>/dev/null || true
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
    [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections \
        && mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
    [ -w /proc/sys/vm/drop_caches ] || die "/proc/sys/vm/drop_caches is not writable"
    local want=${BENCH_FUSE_URING:-Y}
    if [ "$want" != keep ] && [ -w "$URING_PARAM" ]; then
        URING_BEFORE=$(cat "$URING_PARAM")
        echo "$want" >"$URING_PARAM" || die "cannot set $URING_PARAM to $want"
    fi
}
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_BEFORE=

FO1_BIN=/usr/bin/fuse-overlayfs
FO2_ROOT="$CACHE/fuse-overlayfs-2.0.0"
FO2_BIN="$FO2_ROOT/bin/fuse-overlayfs"
declare -A SKIP=()

ensure_fo2() {
    if [ -x "$FO2_BIN" ] && "$FO2_BIN" --version 2>&1 | grep -q 'version 2\.0\.0'; then return 0; fi
    log "installing fuse-overlayfs 2.0.0: cargo install --root $FO2_ROOT (a few minutes)"
    if ! command -v cargo >/dev/null; then
        SKIP[fo2]="cargo not found"
    elif ! cargo install --locked fuse-overlayfs --version 2.0.0 --root "$FO2_ROOT" >"$CACHE/fo2-install.log" 2>&1 \
        && ! cargo install fuse-overlayfs --version 2.0.0 --root "$FO2_ROOT" >>"$CACHE/fo2-install.log" 2>&1; then
        SKIP[fo2]="cargo install fuse-overlayfs --version 2.0.0 failed: $(grep -m1 -i error "$CACHE/fo2-install.log" | cut -c1-200) (log: $CACHE/fo2-install.log)"
    fi
    if [ -z "${SKIP[fo2]:-}" ] && ! [ -x "$FO2_BIN" ]; then SKIP[fo2]="no binary after cargo install"; fi
    if [ -n "${SKIP[fo2]:-}" ]; then
        log "WARNING: fuse-overlayfs 2.x is not available, continuing without it: ${SKIP[fo2]}"
        return 1
    fi
}

ensure_layerfs() {
    if [ -n "${LAYERFS_BIN:-}" ]; then
        [ -x "$LAYERFS_BIN" ] || die "LAYERFS_BIN=$LAYERFS_BIN is not executable"
        LAYERFS_BIN=$(readlink -f "$LAYERFS_BIN")
    else
        if [ "$NOBUILD" = 0 ]; then
            command -v cargo >/dev/null || die "cargo not found (install Rust, or pass --no-build / LAYERFS_BIN)"
            log "building layerfs (cargo build --release)"
            (cd "$REPO" && cargo build --release -q) >>"$LOG" 2>&1 || die "cargo build --release failed (see $LOG)"
        fi
        [ -x "$REPO/target/release/layerfs" ] || die "no $REPO/target/release/layerfs"
        # a private copy: other builds may replace target/release/layerfs mid-run
        mkdir -p "$CACHE/bin"
        cp -f "$REPO/target/release/layerfs" "$CACHE/bin/layerfs.new"
        mv -f "$CACHE/bin/layerfs.new" "$CACHE/bin/layerfs"
        LAYERFS_BIN="$CACHE/bin/layerfs"
    fi
    export LAYERFS_BIN
    LAYERFS_READY=1
}
LAYERFS_READY=0

# ----------------------------------------------------------------------------
# layer sets (cached; rebuilt when gen.py or the sizes change)

dataset() {  # dataset KIND ARGS... -> path of the set, generating it if needed
    local kind=$1; shift
    local key dir
    key=$( { sha256sum "$BENCHDIR/gen.py" | cut -d' ' -f1; echo "$kind $*"; } | sha256sum | cut -c1-12)
    dir="$DATA/$kind-$MODE-$key"
    if ! [ -f "$dir/manifest.json" ]; then
        rm -rf "$DATA/$kind-$MODE-"*
        mkdir -p "$DATA"
        log "generating the $kind layer set ($*)"
        "$PY" "$BENCHDIR/gen.py" "$kind" "$dir" "$@" 2>>"$LOG" >&2 || die "gen.py $kind failed (see $LOG)"
    fi
    echo "$dir"
}

# ----------------------------------------------------------------------------
# mounting

impl_label() {
    local base=${1%%+*} opts="" l
    [[ $1 == *+* ]] && opts=" (${1#*+})" && opts=${opts//+/,}
    case $base in
        kernel) l="kernel" ;;
        fo1) l="fuse-ovl $("$FO1_BIN" --version 2>/dev/null | sed -n 's/.*fuse-overlayfs: version //p' | head -n1)" ;;
        fo2) l="fuse-ovl 2.0.0" ;;
        layerfs) l="layerfs" ;;
    esac
    echo "$l$opts"
}

# mount_impl SPEC LOWERDIRS: fresh upper/work, mounted on $MNT; sets DAEMON_PID
mount_impl() {
    local spec=$1 lower=$2 base=${1%%+*} extra="" o bin="" i pid best=""
    [[ $spec == *+* ]] && extra=",${spec#*+}" && extra=${extra//+/,}
    rm -rf "$RUN/u" "$RUN/w"
    mkdir -p "$RUN/u" "$RUN/w" "$MNT"
    o="lowerdir=$lower,upperdir=$RUN/u,workdir=$RUN/w$extra"
    DAEMON_PID=""
    case $base in
        kernel) mount -t overlay overlay -o "$o" "$MNT" 2>"$RUN/err" || return 1 ;;
        fo1) bin=$FO1_BIN ;;
        fo2) bin=$FO2_BIN ;;
        layerfs) bin=$LAYERFS_BIN ;;
    esac
    if [ -n "$bin" ]; then
        timeout 60 "$bin" -o "$o" "$MNT" >>"$LOG" 2>"$RUN/err" </dev/null || return 1
        cat "$RUN/err" >>"$LOG"
        for i in $(seq 100); do is_mounted "$MNT" && break; sleep 0.05; done
        # the daemon: newest process of that binary with the mount point in its argv
        for pid in $(pgrep -f -- "$MNT" || true); do
            alive "$pid" || continue
            [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ] || continue
            if [ -z "$best" ] || [ "$(awk '{print $22}' "/proc/$pid/stat")" -gt "$(awk '{print $22}' "/proc/$best/stat")" ]; then
                best=$pid
            fi
        done
        DAEMON_PID=$best
    fi
    is_mounted "$MNT" || { echo "not mounted after the mount command returned" >>"$RUN/err"; return 1; }
}

# ----------------------------------------------------------------------------
# workloads: each runs on a fresh mount at $MNT and emits its results

walk_cmd() {
    case $1 in
        find) echo 'cd "$MNT" && find . | wc -l' ;;
        stat) echo 'cd "$MNT" && find . -printf "%s %m %U %G %T@\n" | wc -l' ;;
        lsR) echo 'cd "$MNT" && ls -lR . | wc -l' ;;
        tar) echo 'cd "$MNT" && tar -cf - --exclude=./bench/big.bin . | wc -c' ;;
    esac
}

w_walk() {  # w_walk NAME KIND cold|warm
    local cmd
    cmd=$(walk_cmd "$2")
    if [ "$3" = warm ]; then
        timed "$cmd"
        [ "$RC" -eq 0 ] || { emit_timed "$1"; return 1; }
    else
        drop_caches 3
    fi
    timed "$cmd"
    emit_timed "$1" "$(first_line)"
}

fio_run() {  # fio_run NAME rw|read|randread FILE ARGS...: emits MiB/s or IOPS
    local name=$1 rw=$2 file=$3; shift 3
    timed "fio --name=$name --filename=$file --rw=$rw --direct=0 --invalidate=0 --ioengine=psync \
        --output-format=json --output=$RUN/fio.json $*"
    if [ "$RC" -ne 0 ]; then emit_timed "$name"; return 1; fi
    local v
    v=$("$PY" - "$RUN/fio.json" "$rw" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write" if sys.argv[2] == "write" else "read"]
print(f'{d["bw_bytes"] / 1048576:.1f} {d["iops"]:.0f} {d["io_bytes"]}')
PY
) || { RC=1; echo "cannot parse fio output" >"$RUN/err"; emit_timed "$name"; return 1; }
    read -r bw iops bytes <<<"$v"
    if [ "$rw" = randread ]; then emit "$name" "$iops" IOPS ok "$bytes"; else emit "$name" "$bw" MiB/s ok "$bytes"; fi
}

w_fio_seqread() { fio_run fio_seqread read "$MNT/bench/big.bin" --readonly --bs=1M --size=${BIG_MIB}M; }
w_fio_seqwrite() {
    fio_run fio_seqwrite write "$MNT/bench/fio-write.bin" --bs=1M --size=${BIG_MIB}M --fallocate=none \
        --end_fsync="${BENCH_FIO_FSYNC:-0}"
}
w_fio_randread() {
    fio_run fio_randread randread "$MNT/bench/big.bin" --readonly --bs=4k --size=${BIG_MIB}M \
        --io_size=${RR_MIB}M --randrepeat=1 --norandommap
}

w_small_writes() {  # the writes' own time, without the interpreter's start-up
    timed '"$PY" "$BENCHDIR/smallwrites.py" "$MNT/bench/small-writes.bin" '"$SMALLW"
    [ "$RC" -eq 0 ] || { emit_timed small_writes; return 1; }
    local secs bytes
    read -r secs bytes <"$RUN/out"
    emit small_writes "$secs" s ok "$bytes bytes"
}

w_copyup_small() {
    timed 'cd "$MNT" && while IFS= read -r f; do printf x >>"$f"; done <"$TREE/copyup.txt"'
    emit_timed copyup_small "$(find "$RUN/u" -type f | wc -l) files up"
}

w_copyup_big() {
    timed 'printf x >>"$MNT/bench/big.bin"'
    emit_timed copyup_big "$(stat -c %s "$RUN/u/bench/big.bin" 2>/dev/null || echo none) bytes"
}

w_create_files() {
    timed 'cd "$MNT" && mapfile -t D <"$TREE/createdirs.txt" && for ((i = 0; i < '"$CREATE"'; i++)); do
        : >"${D[i % ${#D[@]}]}/new_$i"; done'
    emit_timed create_files "$(find "$RUN/u" -name 'new_*' | wc -l) created"
}

w_rm_lower_tree() {
    timed 'rm -rf "$MNT/bench/rmtree" && ! test -e "$MNT/bench/rmtree" && ls "$MNT/bench" | wc -l'
    emit_timed rm_lower_tree "$(first_line) left"
}

w_build() {
    local t1 t2 t3 c
    timed 'mkdir "$MNT/build" && tar -xzf "$MNT/bench/src.tar.gz" -C "$MNT/build"'
    t1=$T
    emit_timed build_untar "$(find "$MNT/build" -type f | wc -l) files" || return 1
    timed 'grep -r -l -e "import" "$MNT/build" | wc -l'
    t2=$T c=$(first_line)
    emit_timed build_grep "$c" || return 1
    timed 'cd "$MNT/bench/repo" && HOME="$RUN/home" GIT_CONFIG_NOSYSTEM=1 git status --porcelain | wc -l'
    t3=$T c=$(first_line)
    emit_timed build_git_status "$c" || return 1
    emit build_total "$(awk -v a="$t1" -v b="$t2" -v c="$t3" 'BEGIN { printf "%.6f", a + b + c }')" s ok
}

w_conc() {  # w_conc NAME N sep|one
    local name=$1 n=$2 where=$3 wd
    if [ "$where" = sep ]; then wd='$MNT/conc/j$i/new'; else wd='$MNT/conc/shared'; fi
    timed 'pids=(); for ((i = 0; i < '"$n"'; i++)); do
            "$PY" "$BENCHDIR/fsjob.py" "$MNT/conc/j$i" "'"$wd"'" "j${i}_" '"$CONC_N"' & pids+=($!)
        done
        rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc'
    emit_timed "$name" "$(awk '{ s += $1 } END { print s }' "$RUN/out") bytes read"
}

fuse_inodes() { awk '$1 == "fuse_inode" { print $2 }' /proc/slabinfo 2>/dev/null || true; }

rss_mib() {  # rss_mib PID FIELD
    awk -v f="$2:" '$1 == f { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null
}

w_memory() {
    timed 'find "$MNT" -printf "%s\n" | wc -l'
    emit_timed mem_walk "$(first_line) entries" || return 1
    [ "${CUR_IMPL%%+*}" = kernel ] && return 0
    if [ -z "$DAEMON_PID" ] || ! alive "$DAEMON_PID"; then
        emit mem_peak "" MiB FAIL "" "daemon process not found (pgrep -f $MNT)"
        return 1
    fi
    local hwm rss after slab0 slab1
    hwm=$(rss_mib "$DAEMON_PID" VmHWM)
    rss=$(rss_mib "$DAEMON_PID" VmRSS)
    slab0=$(fuse_inodes)
    drop_caches 2
    sleep "$FORGET_WAIT"   # FORGETs are sent as the inodes go; let the daemon process them
    after=$(rss_mib "$DAEMON_PID" VmRSS)
    slab1=$(fuse_inodes)
    emit mem_peak "$hwm" MiB ok "pid $DAEMON_PID"
    emit mem_rss_walk "$rss" MiB ok
    # the check shows that the kernel did forget: FUSE inodes in the slab
    # (all FUSE mounts of the machine) before -> after drop_caches
    emit mem_rss_forget "$after" MiB ok "kernel fuse inodes $slab0 -> $slab1"
}

w_diff_layerfs() {
    timed '"$LAYERFS_BIN" diff --upper "$DIFFSET/upper" --lower "$DIFFSET/l1" --lower "$DIFFSET/l2" \
        --lower "$DIFFSET/l3" >"$RUN/diff-layerfs.txt"'
    emit_timed diff "$(wc -l <"$RUN/diff-layerfs.txt") changes"
}

w_diff_naive() {
    local ok=1
    mkdir -p "$RUN/vnew" "$RUN/vold"
    mount -t overlay overlay -o "ro,lowerdir=$DIFFSET/upper:$DIFFSET/l1:$DIFFSET/l2:$DIFFSET/l3" "$RUN/vnew" 2>"$RUN/err" &&
        mount -t overlay overlay -o "ro,lowerdir=$DIFFSET/l1:$DIFFSET/l2:$DIFFSET/l3" "$RUN/vold" 2>"$RUN/err" || ok=0
    if [ $ok = 1 ]; then
        timed '"$PY" "$BENCHDIR/naive_diff.py" "$RUN/vnew" "$RUN/vold" >"$RUN/diff-naive.txt"'
    else
        RC=1
    fi
    unmount_one "$RUN/vnew"; unmount_one "$RUN/vold"
    emit_timed diff "$(wc -l <"$RUN/diff-naive.txt" 2>/dev/null) changes" || return 1
    if [ -s "$RUN/diff-layerfs.txt" ] && ! cmp -s "$RUN/diff-layerfs.txt" "$RUN/diff-naive.txt"; then
        diff "$RUN/diff-naive.txt" "$RUN/diff-layerfs.txt" >"$OUT/diff-mismatch.txt" || true
        log "  NOTE: layerfs diff and the naive walk disagree: $OUT/diff-mismatch.txt"
        DIFF_MISMATCH=1
    fi
}

# run_case GROUP SPEC REP: one fresh mount, one group, results emitted
run_case() {
    local group=$1 spec=$2 lower=$MAIN_LOWER fn r dead=""
    CUR_IMPL=$spec CUR_REP=$3 EMITTED=()
    case $group in
        memory) lower=$MEMTREE/l1 ;;
        fio_seqread|fio_randread|copyup_big)
            cat "$TREE/l3/bench/big.bin" >/dev/null ;;  # the lower file in the page cache
    esac
    case $group in
        walk_*_cold|walk_*_warm) fn="w_walk $group $(cut -d_ -f2 <<<"$group") ${group##*_}" ;;
        read_tar_*) fn="w_walk $group tar ${group##*_}" ;;
        conc_1) fn="w_conc conc_1 1 sep" ;;
        conc_sep_*|conc_one_*) fn="w_conc $group ${group##*_} $(cut -d_ -f2 <<<"$group")" ;;
        *) fn="w_$group" ;;
    esac
    sync
    if ! mount_impl "$spec" "$lower"; then
        RC=1
        local why
        why="mount failed: $(tr '\n' ' ' <"$RUN/err" | cut -c1-300)"
        for r in $(results_of "$group"); do emit "$r" "" s FAIL "" "$why"; done
        unmount_one "$MNT" || true
        return 0
    fi
    $fn || true
    if [ -n "$DAEMON_PID" ] && ! alive "$DAEMON_PID"; then dead="the daemon died during the run"; fi
    for r in $(results_of "$group"); do
        if ! printf '%s\n' "${EMITTED[@]}" | grep -qx "$r"; then
            [ "${spec%%+*}" = kernel ] && [ "$group" = memory ] && continue
            emit "$r" "" s FAIL "" "${dead:-not run: an earlier step failed}"
        fi
    done
    [ -z "$dead" ] || log "  WARNING: $spec: $dead ($group)"
    unmount_one "$MNT" || die "could not unmount $MNT"
}

# ----------------------------------------------------------------------------
# main

mkdir -p "$RUN"
: >"$LOG"
unmount_all   # leftovers of a killed run
ensure_tools

IMPLS_OK=()
for spec in "${IMPL_LIST[@]}"; do
    case ${spec%%+*} in
        fo2) ensure_fo2 || continue ;;
        layerfs) [ "$LAYERFS_READY" = 1 ] || ensure_layerfs ;;
    esac
    IMPLS_OK+=("$spec")
done
[ ${#IMPLS_OK[@]} -gt 0 ] || die "no implementation left to measure"
if selected diff && [ "$LAYERFS_READY" = 0 ]; then ensure_layerfs; fi

# layer sets
if selected_like 'walk_*' || selected_like 'read_*' || selected_like 'fio_*' || selected_like 'copyup_*' \
    || selected small_writes \
    || selected_like 'conc_*' || selected create_files || selected rm_lower_tree || selected build; then
    log "Debian-package layers (scripts/debian-layers.sh)"
    DEB_LOWER=$("$REPO/scripts/debian-layers.sh" "$DATA/debian" 2>>"$LOG") || die "scripts/debian-layers.sh failed (see $LOG)"
    TREE=$(dataset tree --files "$TREE_FILES" --dirs "$TREE_DIRS" --big-mib "$BIG_MIB" --copyup "$COPYUP" \
        --rm-files "$RM_FILES" --conc-files "$CONC_READ" --src "$DATA/debian/python/usr/lib/python3.11" \
        --src-copies "$SRC_COPIES" --repo-copies "$REPO_COPIES")
    MAIN_LOWER="$TREE/l1:$TREE/l2:$TREE/l3:$DEB_LOWER"
else
    TREE="" MAIN_LOWER=""
fi
if selected memory; then MEMTREE=$(dataset memtree --files "$MEM_FILES"); else MEMTREE=""; fi
if selected diff; then DIFFSET=$(dataset diffset --files "$DIFF_FILES" --changes "$DIFF_CHANGES"); else DIFFSET=""; fi
export TREE MEMTREE DIFFSET BENCHDIR

tree_desc() {
    "$PY" - "$TREE/manifest.json" "$BIG_MIB" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
f = m["files"]
print(f"{sum(f)} files over 3 generated lowers ({f[0]}/{f[1]}/{f[2]} top to bottom, incl. "
      f"{m['symlinks']} symlinks and {m['hardlinks']} hard links), {m['layer_dirs'][2]}+ dirs; "
      f"{m['shadowed']} files shadowed, {m['file_whiteouts']} file and {m['dir_whiteouts']} dir "
      f"whiteouts (char 0/0), {m['opaque_dirs']} opaque dirs; {sys.argv[2]} MiB file; source tarball "
      f"of {m['src_tar_files']} files; git repo of {m['repo_files']} files; "
      "then the 3 Debian-package layers of scripts/debian-layers.sh below")
PY
}

# machine and run info
INFO="$OUT/bench-info.txt"
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode=$MODE"
    echo "reps=$REPS"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "fuse_enable_uring=$(cat "$URING_PARAM" 2>/dev/null || echo absent)"
    echo "host_cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "fs=$(df -T "$CACHE" | awk 'NR == 2 { print $2 " (" $1 ")" }')"
    echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "impls=$(IFS=,; echo "${IMPLS_OK[*]}")"
    for spec in "${IMPLS_OK[@]}"; do
        echo "label.$spec=$(impl_label "$spec")"
        case ${spec%%+*} in
            kernel) echo "version.$spec=overlayfs of Linux $(uname -r)" ;;
            fo1) echo "version.$spec=$FO1_BIN, $("$FO1_BIN" --version 2>/dev/null | grep -m1 fuse-overlayfs)" ;;
            fo2) echo "version.$spec=$FO2_BIN, $("$FO2_BIN" --version 2>/dev/null | head -n1) (cargo install)" ;;
            layerfs) echo "version.$spec=commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' + local changes'), release build" ;;
        esac
    done
    for k in "${!SKIP[@]}"; do echo "skipped.$k=${SKIP[$k]}"; done
    [ -z "$TREE" ] || echo "dataset=$(tree_desc)"
    [ -z "$MEMTREE" ] || echo "memtree=$MEM_FILES files, 100 per dir, one lower"
    [ -z "$DIFFSET" ] || echo "diffset=$DIFF_FILES files over 3 lowers, upper with $DIFF_CHANGES changes"
} >"$INFO"

RAW="$OUT/bench-raw.csv"
echo "workload,impl,rep,value,unit,better,status,check,msg" >"$RAW"
log "implementations: ${IMPLS_OK[*]}; groups: ${SELECTED[*]}; $REPS rep(s); mode $MODE"
for k in "${!SKIP[@]}"; do log "not measured: $k: ${SKIP[$k]}"; done
START=${EPOCHREALTIME/./}
DIFF_MISMATCH=0

n_impl=${#IMPLS_OK[@]}
for group in "${SELECTED[@]}"; do
    log "== $group"
    if [ "$group" = diff ]; then
        if [ -z "${LAYERFS_BIN:-}" ]; then log "  skipped: no layerfs binary"; continue; fi
        CUR_IMPL=warmup CUR_REP=0
        timed '"$LAYERFS_BIN" diff --upper "$DIFFSET/upper" --lower "$DIFFSET/l1" --lower "$DIFFSET/l2" --lower "$DIFFSET/l3" >/dev/null' || true
        for rep in $(seq "$REPS"); do
            CUR_REP=$rep
            if [ $((rep % 2)) = 1 ]; then
                CUR_IMPL=layerfs; w_diff_layerfs || true; CUR_IMPL=kernel; w_diff_naive || true
            else
                CUR_IMPL=kernel; w_diff_naive || true; CUR_IMPL=layerfs; w_diff_layerfs || true
            fi
        done
        continue
    fi
    for rep in $(seq "$REPS"); do
        # rotate the order of the implementations from one repetition to the next
        for i in $(seq 0 $((n_impl - 1))); do
            spec=${IMPLS_OK[$(((i + rep - 1) % n_impl))]}
            run_case "$group" "$spec" "$rep"
        done
    done
done

ELAPSED=$(( (${EPOCHREALTIME/./} - START) / 1000000 ))
{
    echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "elapsed_s=$ELAPSED"
} >>"$INFO"
log "measurements done in ${ELAPSED}s"
echo
"$PY" "$BENCHDIR/report.py" "$OUT"
[ "$DIFF_MISMATCH" = 0 ] || echo "NOTE: layerfs diff and the naive walk disagree: $OUT/diff-mismatch.txt"
echo
echo "results: $OUT/bench-results.csv, $OUT/bench-results.md (raw: $OUT/bench-raw.csv)"
