#!/usr/bin/env bash
# Runs mirrordisk on built-in defaults: builds the release binary, then serves a 1 GiB
# sparse file from a temporary directory on 127.0.0.1:10809 (override with
# MIRRORDISK_LISTEN) until Ctrl-C, and removes the temporary directory afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
listen=${MIRRORDISK_LISTEN:-127.0.0.1:10809}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
truncate -s 1G "$dir/disk.img"
echo "serving $dir/disk.img on nbd://$listen/ — try: nbdinfo nbd://$listen/  (Ctrl-C stops)"
target/release/mirrordisk serve "$dir/disk.img" --listen "$listen" --unix "$dir/nbd.sock"
