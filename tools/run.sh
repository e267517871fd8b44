#!/usr/bin/env bash
# Runs mirrordisk on built-in defaults: builds the release binaries, then runs
# `mirrordisk demo` — two node agents on 127.0.0.1 with 256 MiB file-backed disks in a
# temporary folder, a workload through NBD, a planned failover, an outage with
# journaled writes, the differential rebuild, an online verify, a byte comparison of
# both disks, and a report. Arguments go to the demo, e.g.:
#
#   ./tools/run.sh --keep-running          # leave the cluster up until Ctrl-C
#   ./tools/run.sh --size 1G --dir /var/tmp/demo
#   ./tools/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
exec target/release/mirrordisk demo "$@"
