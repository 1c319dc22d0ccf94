#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each one for a short, bounded time from the committed seeds
# (fuzz/README.md). Exits non-zero, naming the crash artifact, if a target crashes, leaks, runs out
# of memory or times out on an input.
#
#   fuzz/ci.sh                     every target, LICHEN_FUZZ_SECS (default 60) seconds each
#   fuzz/ci.sh manifest            one target
#
# Environment:
#   LICHEN_FUZZ_SECS        seconds per target [60]
#   LICHEN_FUZZ_TOOLCHAIN   the nightly rustup toolchain to use [nightly]
#   LICHEN_FUZZ_TIMEOUT     seconds one input may take before it counts as a hang [30]
#   LICHEN_FUZZ_MAX_LEN     largest input libFuzzer makes, in bytes [16384]
#   LICHEN_FUZZ_CORPUS      a directory to keep the grown corpus in (<dir>/<target>) between runs;
#                           by default a scratch directory, removed at the end
#   CARGO_TARGET_DIR        if set, the fuzz build goes to $CARGO_TARGET_DIR/fuzz (its own target
#                           directory: other flags, a nightly compiler); else to fuzz/target
set -euo pipefail

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
secs=${LICHEN_FUZZ_SECS:-60}
toolchain=${LICHEN_FUZZ_TOOLCHAIN:-nightly}
timeout=${LICHEN_FUZZ_TIMEOUT:-30}
max_len=${LICHEN_FUZZ_MAX_LEN:-16384}
all_targets=(manifest config)

die() {
  echo "fuzz/ci.sh: $*" >&2
  exit 2
}

for n in "$secs" "$timeout" "$max_len"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "LICHEN_FUZZ_SECS, LICHEN_FUZZ_TIMEOUT and LICHEN_FUZZ_MAX_LEN must be positive whole numbers (got ${n@Q})"
done

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || die "unknown target ${t@Q}; the targets are: ${all_targets[*]}"
  [[ -d $fuzz_dir/seeds/$t ]] || die "no seeds in fuzz/seeds/$t"
done

# A nightly toolchain: cargo-fuzz needs -Zsanitizer and the sanitizer-coverage passes. Checked in
# rustup's list rather than with `cargo +nightly`, which may try to download a missing toolchain.
command -v rustup >/dev/null || die "rustup is not installed; cargo fuzz needs a nightly Rust toolchain through rustup"
host=$(cd / && rustup show | sed -n 's/^Default host: //p')
installed=$(rustup toolchain list | awk '{print $1}')
if ! grep -qxF -e "$toolchain" -e "$toolchain-$host" <<<"$installed"; then
  die "no ${toolchain@Q} toolchain is installed (installed: $(paste -sd ' ' <<<"$installed"))
install one with:  rustup toolchain install nightly --profile minimal
or name another with LICHEN_FUZZ_TOOLCHAIN=nightly-YYYY-MM-DD"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/ci.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# Outside target directories (CI's) get a fuzz directory of their own inside them.
if [[ -n ${CARGO_TARGET_DIR:-} ]]; then
  export CARGO_TARGET_DIR=$CARGO_TARGET_DIR/fuzz
fi
# The fuzz targets must not print their debug lines into the fuzzer's log.
unset LICHEN_FUZZ_DEBUG

scratch=$(mktemp -d "${TMPDIR:-/tmp}/lichen-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

cd "$fuzz_dir"
cargo_fuzz=(cargo "+$toolchain" fuzz)
start=$SECONDS
"${cargo_fuzz[@]}" --version
echo "== building ${targets[*]}" >&2
if [[ ${#targets[@]} -eq 1 ]]; then
  "${cargo_fuzz[@]}" build "${targets[0]}"
else
  "${cargo_fuzz[@]}" build
fi
echo "== built in $((SECONDS - start)) s" >&2

failed=()
for t in "${targets[@]}"; do
  corpus=${LICHEN_FUZZ_CORPUS:+$LICHEN_FUZZ_CORPUS/$t}
  corpus=${corpus:-$scratch/corpus/$t}
  artifacts=$fuzz_dir/artifacts/$t
  log=$scratch/$t.log
  mkdir -p "$corpus" "$artifacts"
  cp "$fuzz_dir/seeds/$t"/* "$corpus"/
  marker=$scratch/$t.started
  touch "$marker"
  echo "== fuzzing $t for $secs s from $(find "$corpus" -type f | wc -l) inputs" >&2
  t0=$SECONDS
  status=0
  "${cargo_fuzz[@]}" run "$t" "$corpus" -- \
    -max_total_time="$secs" -timeout="$timeout" -max_len="$max_len" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  # Every input that crashed, leaked, ran out of memory or hung, written during this run.
  mapfile -t found < <(find "$artifacts" -type f -newer "$marker" | sort)
  if [[ $status -eq 0 && ${#found[@]} -eq 0 ]]; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" >&2 || tail -n 3 "$log" >&2
    echo "== $t: no crash in $((SECONDS - t0)) s; corpus now $(find "$corpus" -type f | wc -l) inputs" >&2
    continue
  fi
  tail -n 60 "$log" >&2
  echo "== $t FAILED (exit $status) after $((SECONDS - t0)) s" >&2
  for a in "${found[@]}"; do
    echo "crash artifact: $a" >&2
    echo "  reproduce: cd fuzz && cargo +$toolchain fuzz run $t ${a#"$fuzz_dir"/}" >&2
  done
  [[ ${#found[@]} -gt 0 ]] || echo "  (no artifact was written; the log above says why)" >&2
  failed+=("$t")
done

echo "== fuzz/ci.sh: ${#targets[@]} target(s) in $((SECONDS - start)) s" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz/ci.sh: failed: ${failed[*]}" >&2
  exit 1
fi
