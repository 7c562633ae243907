#!/bin/sh
# Regenerates the committed man page from the clap definitions:
#   scripts/gen-docs.sh            writes man/layerfs.1
#   scripts/gen-docs.sh DIR        also writes completions for bash, zsh and
#                                  fish into DIR (layerfs.bash, _layerfs,
#                                  layerfs.fish), e.g. for a package
# tests/check.rs fails when man/layerfs.1 differs from what the binary
# generates, so run this after changing a subcommand, a flag or --help.
set -eu
cd "$(dirname "$0")/.."
cargo build --quiet
bin=target/debug/layerfs
"$bin" generate man >man/layerfs.1.tmp
mv man/layerfs.1.tmp man/layerfs.1
echo "wrote man/layerfs.1"
if [ $# -ge 1 ]; then
    mkdir -p "$1"
    "$bin" generate completions bash >"$1/layerfs.bash"
    "$bin" generate completions zsh >"$1/_layerfs"
    "$bin" generate completions fish >"$1/layerfs.fish"
    echo "wrote completions to $1"
fi
