#!/usr/bin/env bash
# make fuzz: every cargo fuzz target in fuzz/ for SECONDS each, on the nightly toolchain, starting
# from fuzz/seeds/<target> and fuzz/corpus/<target>; new inputs land in fuzz/corpus/<target>, which
# is then minimised (cargo fuzz cmin). `make test` replays seeds, corpus and regressions on stable.
# A crash stops nothing else: every target runs, then the crashed ones are named, and the script
# fails. Each crash input (fuzz/artifacts/<target>/crash-*) goes into fuzz/regressions/<target>/
# with a unit test of its own once fixed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
cargo_fuzz_version=0.13.2
max_len=8192

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
    cargo install cargo-fuzz --version "=$cargo_fuzz_version" --locked
fi
cargo +nightly fuzz build
crashed=()
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1; then
        crashed+=("$target")
        continue
    fi
    cargo +nightly fuzz cmin "$target" "corpus/$target" -- -max_len="$max_len" >/dev/null 2>&1
done
if ((${#crashed[@]})); then
    echo "fuzz: crashes in ${crashed[*]}: the inputs are in fuzz/artifacts/<target>/" >&2
    exit 1
fi
echo "fuzz: no crash in $(cargo +nightly fuzz list | wc -l) targets, ${seconds}s each"
