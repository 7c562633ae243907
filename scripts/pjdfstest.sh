#!/usr/bin/env bash
# POSIX conformance: run pjdfstest on a layerfs mount and on the kernel's
# overlayfs over identical layers, print both totals and diff the failures.
#
#   scripts/pjdfstest.sh [--impl layerfs|kernel|both] [--quick] [--keep-logs DIR]
#
# Builds layerfs with `cargo build --release` unless LAYERFS_BIN names a
# binary to test. PJDFSTEST_TIMEOUT (default 1800 s) bounds each run.
#
# Which pjdfstest: the Rust port (`cargo install pjdfstest`, crates.io,
# BSD-2-Clause). The classic C suite (pjd/pjdfstest, run with `prove`) has no
# Debian package and this workplace reaches no source host, so it cannot be
# built here; the Rust port carries the same test cases, grouped per syscall
# and file type, and counts *test cases* (a case stops at its first failed
# assertion), not assertions.
#
# Setup (per implementation, in a fresh temp dir):
#   lower2/base/sub/inner  (a dir with a few files)   bottom layer
#   lower1/base/sub/file1 …                           top layer
#   upper/, work/, mnt/
# pjdfstest runs with its working dir MNT/base/sub/inner, a directory that
# exists only in the lowers, so every create first copies up the parent
# chain. It runs as root and switches to the dummy users nobody:nogroup and
# tests:tests for the non-root cases, so layerfs is mounted with
# allow_other. EXDEV cases use a tmpfs as secondary file system.
#
# Exclusions: scripts/pjdfstest-exclude.txt, `TEST_NAME  reason` per line,
# only for tests that also fail on the kernel overlay (the script checks
# that: an excluded test that passes on the kernel is reported as a stale
# exclusion and makes the run fail when the kernel was run too).
#
# Exit status: 0 when every layerfs failure is excluded (or, with
# --impl kernel, when the kernel run finished), 1 otherwise, 2 on setup
# errors.
set -uo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
ROOT=$PWD
export PATH="$PATH:${HOME:-/root}/.cargo/bin"
export NO_COLOR=1 CLICOLOR=0

IMPL=both
QUICK=0
KEEP_LOGS=""
PJD_VERSION=0.2.2
RUN_TIMEOUT=${PJDFSTEST_TIMEOUT:-1800}
while [ $# -gt 0 ]; do
    case "$1" in
        --impl) IMPL=${2:-}; shift 2 ;;
        --impl=*) IMPL=${1#--impl=}; shift ;;
        --quick) QUICK=1; shift ;;
        --keep-logs) KEEP_LOGS=${2:-}; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "pjdfstest.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case "$IMPL" in layerfs|kernel|both) ;; *) echo "pjdfstest.sh: --impl must be layerfs, kernel or both" >&2; exit 2 ;; esac
if [ "$(id -u)" != 0 ]; then echo "pjdfstest.sh: must run as root" >&2; exit 2; fi

# Patterns for --quick: a few syscalls that exercise copy-up, whiteouts and
# permission checks, a couple of minutes in all.
QUICK_PATTERNS=(chmod:: chown:: rename:: unlink:: rmdir:: open::)

# --- pjdfstest -----------------------------------------------------------------
PJD=$(command -v pjdfstest || true)
if [ -z "$PJD" ] || ! "$PJD" --version 2>/dev/null | grep -q "$PJD_VERSION"; then
    echo "=== installing pjdfstest $PJD_VERSION (cargo install)"
    if ! cargo install --locked --version "$PJD_VERSION" pjdfstest </dev/null; then
        echo "pjdfstest.sh: cargo install pjdfstest failed" >&2
        exit 2
    fi
    PJD=$(command -v pjdfstest) || { echo "pjdfstest.sh: pjdfstest not on PATH after install" >&2; exit 2; }
fi
echo "pjdfstest: $PJD ($("$PJD" --version))"

# Dummy users for the non-root cases.
getent passwd nobody >/dev/null || { echo "pjdfstest.sh: no user nobody" >&2; exit 2; }
getent group nogroup >/dev/null || groupadd --system nogroup
getent group tests >/dev/null || groupadd --system tests
getent passwd tests >/dev/null || useradd --system --no-create-home --gid tests --shell /usr/sbin/nologin tests

# --- layerfs ----------------------------------------------------------------
if [ "$IMPL" != kernel ] && [ -n "${LAYERFS_BIN:-}" ]; then
    echo "=== layerfs: $LAYERFS_BIN (LAYERFS_BIN, not rebuilt)"
elif [ "$IMPL" != kernel ]; then
    echo "=== cargo build --release"
    if ! cargo build --release --quiet </dev/null >/tmp/pjdfstest-build.$$.log 2>&1; then
        cat /tmp/pjdfstest-build.$$.log >&2
        rm -f /tmp/pjdfstest-build.$$.log
        echo "pjdfstest.sh: build failed" >&2
        exit 2
    fi
    rm -f /tmp/pjdfstest-build.$$.log
fi

BASE=$(mktemp -d /tmp/pjd.XXXXXX)
chmod 755 "$BASE"
MOUNTED=()
cleanup() {
    local m
    for m in "${MOUNTED[@]}"; do
        if mountpoint -q "$m"; then
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a private copy: other sessions may rebuild target/ while we run.
if [ "$IMPL" != kernel ]; then
    mkdir -p "$BASE/bin"
    cp "${LAYERFS_BIN:-target/release/layerfs}" "$BASE/bin/layerfs"
    LAYERFS="$BASE/bin/layerfs"
fi

CONF="$BASE/pjdfstest.toml"
cat >"$CONF" <<'EOF'
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [
  ["nobody", "nogroup"],
  ["tests", "tests"],
]
EOF

SECONDARY="$BASE/secondary"
mkdir -p "$SECONDARY"
mount -t tmpfs -o size=16m,mode=0755 pjdfstest-secondary "$SECONDARY" || { echo "pjdfstest.sh: cannot mount tmpfs" >&2; exit 2; }
MOUNTED+=("$SECONDARY")

# make_layers DIR: identical layers for both implementations.
make_layers() {
    local d=$1
    mkdir -p "$d/lower2/base/sub/inner" "$d/lower1/base/sub" "$d/upper" "$d/work" "$d/mnt"
    printf 'bottom\n' >"$d/lower2/base/sub/inner/lowerfile"
    printf 'bottom2\n' >"$d/lower2/base/file2"
    printf 'top\n' >"$d/lower1/base/sub/file1"
    chmod 755 "$d" "$d/lower1" "$d/lower2" "$d/mnt" \
        "$d/lower2/base" "$d/lower2/base/sub" "$d/lower2/base/sub/inner" \
        "$d/lower1/base" "$d/lower1/base/sub"
    touch -d '2020-01-02 03:04:05' "$d/lower2/base/sub/inner" "$d/lower2/base/sub" "$d/lower1/base/sub"
}

# run_one IMPL: mount, run pjdfstest, unmount; results in $BASE/IMPL.{log,fail,pass}
run_one() {
    # Same path length for both (socket tests bind absolute paths close to
    # the 108-byte sun_path limit): $BASE/k and $BASE/l.
    local impl=$1 d="$BASE/${1:0:1}" out="$BASE/$1" rc
    make_layers "$d"
    local opts="lowerdir=$d/lower1:$d/lower2,upperdir=$d/upper,workdir=$d/work"
    echo
    echo "=== $impl: mounting over $d"
    case "$impl" in
        layerfs)
            if ! "$LAYERFS" -o "$opts,allow_other" "$d/mnt" </dev/null; then
                echo "pjdfstest.sh: layerfs mount failed" >&2; return 2
            fi ;;
        kernel)
            if ! mount -t overlay overlay -o "$opts" "$d/mnt"; then
                echo "pjdfstest.sh: kernel overlay mount failed" >&2; return 2
            fi ;;
    esac
    MOUNTED+=("$d/mnt")
    local cwd="$d/mnt/base/sub/inner"
    local args=(-c "$CONF" -s "$SECONDARY" -p "$cwd")
    [ "$QUICK" = 1 ] && args+=("${QUICK_PATTERNS[@]}")
    local start=$SECONDS
    echo "=== $impl: pjdfstest ${args[*]}"
    (cd "$cwd" && timeout -k 10 "$RUN_TIMEOUT" "$PJD" "${args[@]}") >"$out.raw" 2>&1 </dev/null
    rc=$?
    # Strip any colour codes (NO_COLOR should already prevent them).
    sed -e 's/\x1b\[[0-9;]*m//g' "$out.raw" >"$out.log"
    echo "=== $impl: pjdfstest exited $rc after $((SECONDS - start)) s"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "pjdfstest.sh: $impl: pjdfstest timed out after $RUN_TIMEOUT s (hang?); last lines:" >&2
        tail -5 "$out.log" >&2
    fi
    # Test lines: "NAME   ok" / "NAME   FAILED" / "NAME   skipped" (name has no spaces).
    awk '$NF == "FAILED" && NF == 2 {print $1}' "$out.log" | sort -u >"$out.fail"
    awk '$NF == "ok" && NF == 2 {print $1}' "$out.log" | sort -u >"$out.pass"
    awk '$NF == "skipped" && NF == 2 {print $1}' "$out.log" | sort -u >"$out.skip"
    grep -E '^Summary:' "$out.log" || echo "(no summary line: pjdfstest did not finish)"
    if ! umount "$d/mnt"; then
        echo "pjdfstest.sh: $impl: umount failed (busy?), lazy unmount" >&2
        umount -l "$d/mnt"
    fi
    # The layerfs daemon must exit after the unmount.
    if [ "$impl" = layerfs ]; then
        local i
        for i in $(seq 50); do
            pgrep -f -- "$d/mnt" >/dev/null || break
            sleep 0.1
        done
        if pgrep -f -- "$d/mnt" >/dev/null; then
            echo "pjdfstest.sh: layerfs daemon still running 5 s after unmount" >&2
        fi
    fi
    # Working dir must survive as a copy-up in the upper.
    [ -d "$d/upper/base/sub/inner" ] || echo "note: $impl: upper has no base/sub/inner (nothing copied up?)"
    return 0
}

IMPLS=()
case "$IMPL" in both) IMPLS=(kernel layerfs) ;; *) IMPLS=("$IMPL") ;; esac
for i in "${IMPLS[@]}"; do
    run_one "$i" || exit 2
done

# --- totals and comparison --------------------------------------------------------
EXCLUDE_FILE="$ROOT/scripts/pjdfstest-exclude.txt"
EXCLUDED="$BASE/excluded"
if [ -f "$EXCLUDE_FILE" ]; then
    grep -vE '^[[:space:]]*(#|$)' "$EXCLUDE_FILE" | awk '{print $1}' | sort -u >"$EXCLUDED"
else
    : >"$EXCLUDED"
fi

echo
echo "=== totals (test cases)"
for i in "${IMPLS[@]}"; do
    printf '%-8s %4d passed, %4d failed, %4d skipped\n' "$i:" \
        "$(wc -l <"$BASE/$i.pass")" "$(wc -l <"$BASE/$i.fail")" "$(wc -l <"$BASE/$i.skip")"
done

status=0
if [ "$IMPL" = both ]; then
    echo
    echo "=== failures on layerfs only"
    comm -13 "$BASE/kernel.fail" "$BASE/layerfs.fail" | sed 's/^/  /'
    echo "=== failures on kernel only"
    comm -23 "$BASE/kernel.fail" "$BASE/layerfs.fail" | sed 's/^/  /'
    echo "=== failures on both"
    comm -12 "$BASE/kernel.fail" "$BASE/layerfs.fail" | sed 's/^/  /'
    # Stale: an excluded test that passed on the kernel overlay, or (in a
    # full run) that did not run at all. A --quick run covers a few
    # syscalls only: exclusions for the others are not judged.
    if [ "$QUICK" = 1 ]; then
        stale=$(comm -12 "$EXCLUDED" "$BASE/kernel.pass")
    else
        stale=$(comm -23 "$EXCLUDED" "$BASE/kernel.fail")
    fi
    if [ -n "$stale" ]; then
        echo "=== stale exclusions (listed in $EXCLUDE_FILE but passing or not run on the kernel overlay)"
        printf '  %s\n' $stale
        status=1
    fi
fi
if [ "$IMPL" != kernel ]; then
    unexcused=$(comm -23 "$BASE/layerfs.fail" "$EXCLUDED")
    echo
    if [ -n "$unexcused" ]; then
        echo "=== layerfs failures not in the exclude file"
        printf '  %s\n' $unexcused
        # The message pjdfstest printed under each of them.
        for t in $unexcused; do
            echo "--- $t"
            awk -v t="$t" '$1 == t && $NF == "FAILED" {p = 1; next} p && /^[^ \t]/ {p = 0} p' "$BASE/layerfs.log" | head -5
        done
        status=1
    else
        echo "=== every layerfs failure is also a kernel failure listed in the exclude file"
    fi
    grep -qE '^Summary:' "$BASE/layerfs.log" || status=1
fi
if [ -n "$KEEP_LOGS" ]; then
    mkdir -p "$KEEP_LOGS"
    for i in "${IMPLS[@]}"; do
        cp "$BASE/$i.log" "$BASE/$i.fail" "$BASE/$i.pass" "$BASE/$i.skip" "$KEEP_LOGS/"
    done
    echo "logs kept in $KEEP_LOGS"
fi
# Plain closing line (layerfs if it ran, else the kernel).
last=${IMPLS[-1]}
echo
echo "pjdfstest-$last: $(wc -l <"$BASE/$last.pass") passed, $(wc -l <"$BASE/$last.fail") failed, $(wc -l <"$BASE/$last.skip") skipped"
exit $status
