#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (issue 7), each for a bounded time.
#
# Usage: scripts/fuzz.sh [--quick] [--seconds N] [--jobs N] [--merge] [TARGET...]
#
#   TARGET      mount_options, layer_import, diff_reader (default: all three)
#   --seconds N run each target for N seconds (default 60)
#   --quick     10 seconds each
#   --jobs N    N fuzzing processes per target (default 1; libFuzzer -fork)
#   --merge     afterwards, add the inputs that cover something new to the
#               committed seed corpus fuzz/corpus/TARGET (commit them; keep
#               it small: a few hundred KB in all)
#
# Needs: the machine's stable Rust toolchain (cargo fuzz needs nightly
# features: RUSTC_BOOTSTRAP=1 turns them on) and a C++ compiler (libFuzzer is
# built by libfuzzer-sys). cargo-fuzz is installed into .cache/cargo-fuzz if
# missing. Run as root: the import and diff targets create device nodes,
# whiteouts and trusted.* xattrs. Scratch trees go to a temp dir on /dev/shm
# (LAYERFS_FUZZ_TMPDIR), removed at exit.
#
# Dictionaries: fuzz/dict/TARGET.dict (keywords libFuzzer splices in).
# Corpora: fuzz/corpus/TARGET holds the committed seeds (and reproducers of
# crashes found so far: a run fails on them until the bug is fixed); what the
# fuzzer learns goes to .cache/fuzz-corpus/TARGET, kept between runs (cache
# that directory in CI to keep the corpus growing).
#
# Exit status: 0 if no target crashed, hung or ran out of memory; 1 otherwise,
# with each reproducer's path and the command that replays it. Environment:
# FUZZ_SANITIZER (address, default; or none), FUZZ_TIMEOUT (seconds for one
# input before it counts as a hang, default 10), CARGO_FUZZ_VERSION.
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$REPO"
export PATH="$PATH:${HOME:-/root}/.cargo/bin"

ALL_TARGETS=(mount_options layer_import diff_reader)
SECONDS_EACH=60
JOBS=1
MERGE=0
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) SECONDS_EACH=10 ;;
        --seconds) SECONDS_EACH="${2:?--seconds needs a number}"; shift ;;
        --seconds=*) SECONDS_EACH="${1#*=}" ;;
        --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
        --jobs=*) JOBS="${1#*=}" ;;
        --merge) MERGE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *)
            if [[ " ${ALL_TARGETS[*]} " != *" $1 "* ]]; then
                echo "fuzz.sh: unknown target '$1' (targets: ${ALL_TARGETS[*]})" >&2
                exit 2
            fi
            TARGETS+=("$1") ;;
    esac
    shift
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
[[ "$SECONDS_EACH" =~ ^[0-9]+$ && "$SECONDS_EACH" -gt 0 ]] || { echo "fuzz.sh: --seconds must be a positive number" >&2; exit 2; }
[[ "$JOBS" =~ ^[0-9]+$ && "$JOBS" -gt 0 ]] || { echo "fuzz.sh: --jobs must be a positive number" >&2; exit 2; }

# --- cargo-fuzz ------------------------------------------------------------
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
FUZZ_ROOT="$REPO/.cache/cargo-fuzz"
if ! "$FUZZ_ROOT/bin/cargo-fuzz" --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION into $FUZZ_ROOT"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$FUZZ_ROOT"
fi
export PATH="$FUZZ_ROOT/bin:$PATH"
# cargo fuzz passes -Z flags (sanitizer, coverage instrumentation): on a
# stable toolchain they need this.
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

if [ "$(id -u)" != 0 ]; then
    echo "fuzz.sh: warning: not root: device nodes and trusted.* xattrs will fail, covering less" >&2
fi

# --- build -----------------------------------------------------------------
SANITIZER="${FUZZ_SANITIZER:-address}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
echo "==> building the fuzz targets (sanitizer: $SANITIZER, debug assertions on)"
# -O: optimised; -a: debug assertions, so that integer overflows panic.
if ! cargo fuzz build -O -a --sanitizer "$SANITIZER" >"$REPO/.cache/fuzz-build.log" 2>&1; then
    tail -n 30 "$REPO/.cache/fuzz-build.log" >&2
    echo "fuzz.sh: the fuzz targets did not build (log: .cache/fuzz-build.log)" >&2
    exit 1
fi

SCRATCH_PARENT=/dev/shm
[ -d "$SCRATCH_PARENT" ] && [ -w "$SCRATCH_PARENT" ] || SCRATCH_PARENT="${TMPDIR:-/tmp}"
SCRATCH="$(mktemp -d "$SCRATCH_PARENT/layerfs-fuzz.XXXXXX")"
export LAYERFS_FUZZ_TMPDIR="$SCRATCH"
LOGDIR="$REPO/fuzz/target/logs"
mkdir -p "$LOGDIR"
cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT

max_len() {
    case "$1" in
        layer_import) echo 65536 ;;
        *) echo 4096 ;;
    esac
}

# --- run -------------------------------------------------------------------
FAILED=()
SUMMARY=()
for t in "${TARGETS[@]}"; do
    seeds="fuzz/corpus/$t"
    work=".cache/fuzz-corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$seeds" "$work" "$artifacts"
    log="$LOGDIR/$t.log"
    stamp="$(mktemp)"
    echo "==> $t: ${SECONDS_EACH}s, log $log"
    args=(
        -max_total_time="$SECONDS_EACH"
        -timeout="$TIMEOUT"
        -rss_limit_mb=2048
        -max_len="$(max_len "$t")"
        -print_final_stats=1
        -artifact_prefix="$REPO/$artifacts/"
    )
    [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="$REPO/fuzz/dict/$t.dict")
    [ "$JOBS" -gt 1 ] && args+=(-fork="$JOBS")
    set +e
    # New inputs go to the first corpus dir ($work); the seeds are read only.
    cargo fuzz run -O -a --sanitizer "$SANITIZER" "$t" "$work" "$seeds" -- "${args[@]}" >"$log" 2>&1
    rc=$?
    set -e
    # Reproducers written by this run (crash-, timeout-, oom-, leak-, slow-unit-).
    mapfile -t found < <(find "$artifacts" -type f -newer "$stamp" ! -name 'slow-unit-*' | sort)
    rm -f "$stamp"
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$' || true)"
    rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$' || true)"
    cov="$(grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*/[0-9a-zA-Z]*' "$log" | tail -n1 || true)"
    if [ "$rc" -ne 0 ] || [ ${#found[@]} -gt 0 ]; then
        FAILED+=("$t")
        SUMMARY+=("$t: FAILED (exit $rc) after ${execs:-?} executions (${rate:-?}/s); ${cov:-no coverage line}")
        echo "!!! $t failed (exit $rc); the end of its log:" >&2
        { grep -E -A1 'panicked at' "$log"; grep -E 'ERROR|SUMMARY|Test unit written' "$log"; } | head -n 20 >&2 || true
        tail -n 15 "$log" >&2
        for f in "${found[@]}"; do
            echo "!!! reproducer: $REPO/$f" >&2
            echo "    replay:   (cd $REPO && RUSTC_BOOTSTRAP=1 $FUZZ_ROOT/bin/cargo-fuzz run -O -a $t $f)" >&2
            echo "    minimize: (cd $REPO && RUSTC_BOOTSTRAP=1 $FUZZ_ROOT/bin/cargo-fuzz tmin -O -a $t $f)" >&2
            echo "    hex:      $(head -c 256 "$f" | od -An -v -tx1 | tr -d ' \n')" >&2
        done
        [ ${#found[@]} -gt 0 ] || echo "!!! no reproducer was written (a build or setup error?): see $log" >&2
    else
        SUMMARY+=("$t: ok, ${execs:-?} executions (${rate:-?}/s); ${cov:-no coverage line}")
    fi
    if [ "$MERGE" = 1 ]; then
        echo "==> $t: merging new coverage into $seeds"
        cargo fuzz run -O -a --sanitizer "$SANITIZER" "$t" "$seeds" "$work" -- \
            -merge=1 -timeout="$TIMEOUT" -max_len="$(max_len "$t")" \
            -artifact_prefix="$REPO/$artifacts/" >>"$log" 2>&1 \
            || echo "!!! $t: the merge failed: see $log" >&2
        du -sh "$seeds"
    fi
done

echo
echo "==> summary (${SECONDS_EACH}s per target)"
printf '  %s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "fuzz.sh: FAILED: ${FAILED[*]}" >&2
    exit 1
fi
