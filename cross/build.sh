#!/usr/bin/env bash
# Cross builds of the `lichen` agent for the boards, on an x86-64 Debian/Ubuntu machine, without
# Docker (cross/README.md has the figures and the reasons):
#
#   cross/build.sh [build] [TARGET...]   stripped release binaries, with their sizes, each started
#                                        once under QEMU (`lichen version`), and checked against
#                                        cross/size-budget: it fails if one is over its line
#   cross/build.sh test [TARGET...]      the test suites that matter on a board, run under QEMU
#   cross/build.sh list                  the names of the tests `test` runs (listed natively)
#   cross/build.sh env TARGET            the variables to export to run cargo yourself
#
# TARGET is aarch64, armv7 or aarch64-musl (or the full Rust triple). `build` defaults to all three,
# `test` to aarch64 and armv7. Needs: rustup, and Debian's gcc-aarch64-linux-gnu,
# gcc-arm-linux-gnueabihf and qemu-user-static. binfmt_misc is not needed: test binaries run
# through cargo's runner, and the `lichen` they start through LICHEN_BIN_RUNNER (tests/src/lib.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# The suites run under QEMU: the libraries' unit tests (the agent's and the test harness's), then
# from the one integration binary the runtime (fuel, memory and time limits on this architecture's
# compiler or interpreter), the pod workers with the real store, the real binary with static pods,
# artifacts precompiled on x86-64 loaded here, and the MQTT bridge and its spool against a real
# (native) mosquitto. Two cargo runs, because libtest's filters apply to every binary of a run: in
# one run with the unit tests, `mqtt::` would also keep only the agent's own `telemetry::mqtt::`
# unit tests. In the integration binary every test is `<suite>::<fn>` (suites/main.rs declares the
# suites as flat modules) and a function name has no `::`, so `<suite>::` matches only that
# suite's tests while no suite's name ends with another's (`bash cross/build.sh list` shows the
# selection).
UNIT_ARGS=(-p lichen -p lichen-tests --lib)
SUITE_ARGS=(-p lichen-tests --test suites)
# mqtt:: stays last: it runs on its own (see test_targets).
SUITES=(runtime:: workers:: agent:: operate:: cross:: mqtt::)

triple() {
  case $1 in
    aarch64 | aarch64-unknown-linux-gnu) echo aarch64-unknown-linux-gnu ;;
    armv7 | armv7-unknown-linux-gnueabihf) echo armv7-unknown-linux-gnueabihf ;;
    aarch64-musl | aarch64-unknown-linux-musl) echo aarch64-unknown-linux-musl ;;
    *) echo "unknown target $1 (aarch64, armv7, aarch64-musl)" >&2; return 1 ;;
  esac
}

# Prints `export` lines for one triple: the C compiler (ring, Wasmtime's helpers and psm have C or
# assembly), the linker and the QEMU runner.
target_env() {
  local t=$1 gcc qemu sysroot
  case $t in
    aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu qemu=qemu-aarch64-static sysroot=/usr/aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) gcc=arm-linux-gnueabihf qemu=qemu-arm-static sysroot=/usr/arm-linux-gnueabihf ;;
    # Debian has no aarch64 musl C toolchain (musl-tools is x86-64 only). None is needed: rustup's
    # musl targets ship musl's libc.a and crt objects ("self-contained"), which rustc links with the
    # glibc cross gcc, and the C in the tree needs only freestanding headers. The result is static.
    aarch64-unknown-linux-musl) gcc=aarch64-linux-gnu qemu=qemu-aarch64-static sysroot= ;;
  esac
  local up=${t^^} low=${t//-/_}
  up=${up//-/_}
  local runner=$qemu
  [[ -n $sysroot ]] && runner="$qemu -L $sysroot"
  echo "export CARGO_TARGET_${up}_LINKER=$gcc-gcc"
  echo "export CARGO_TARGET_${up}_RUNNER='$runner'"
  echo "export CC_${low}=$gcc-gcc AR_${low}=$gcc-ar"
  echo "export LICHEN_BIN_RUNNER='$runner'"
}

check_tools() {
  local missing=()
  for t in "$@"; do
    case $t in
      aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
        command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static) ;;
      armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || missing+=(gcc-arm-linux-gnueabihf)
        command -v qemu-arm-static >/dev/null || missing+=(qemu-user-static) ;;
    esac
  done
  if ((${#missing[@]})); then
    echo "missing: apt-get install $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')" >&2
    exit 1
  fi
  local have; have=$(rustup target list --installed)
  for t in "$@"; do
    grep -qx "$t" <<<"$have" || rustup target add "$t"
  done
}

secs() { echo $(( $(date +%s) - $1 ))s; }

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# Checks one built binary against its line in cross/size-budget (`<triple> <bytes>`) and prints
# the verdict; over budget, it says what to run to see what grew and returns 1.
check_budget() {
  local t=$1 out=$2 size allowed short
  size=$(stat -c %s "$out")
  allowed=$(awk -v t="$t" '$1 == t { print $2 }' cross/size-budget)
  if [[ -z $allowed ]]; then
    echo "size budget: $t: $size bytes ($(mib "$size")), no line in cross/size-budget (not checked)"
    return 0
  fi
  if [[ ! $allowed =~ ^[0-9]+$ ]]; then
    echo "size budget: $t: the line in cross/size-budget is not a byte count: $allowed"
    return 1
  fi
  if ((size <= allowed)); then
    echo "size budget: $t: $size bytes ($(mib "$size")), within $allowed ($(mib "$allowed")), $((allowed - size)) to spare"
    return 0
  fi
  case $t in *musl) short=aarch64-musl ;; armv7-*) short=armv7 ;; *) short=aarch64 ;; esac
  cat <<EOF
size budget: $t: lichen is $size bytes ($(mib "$size")), over its budget of $allowed bytes ($(mib "$allowed"))
  in cross/size-budget by $((size - allowed)) bytes. What each crate adds (symbols kept; fat LTO
  moves inlined code between crates, so compare crate by crate with the same command):
    cargo install cargo-bloat --locked
    eval "\$(bash cross/build.sh env $short)"
    CARGO_PROFILE_RELEASE_STRIP=false cargo bloat --release --locked -p lichen --target $t --crates -n 40
  against the breakdown in README.md ("Board builds"). Cut the growth at its cause, or raise the
  line with the reason in the commit, in cross/size-budget and in README.md.
EOF
  return 1
}

build() {
  local targets=("$@") t0 t out
  check_tools "${targets[@]}"
  local report=() verdicts=() over=0
  for t in "${targets[@]}"; do
    t0=$(date +%s)
    # The workspace's release profile (Cargo.toml) is what ships, for cross-rs users too.
    (eval "$(target_env "$t")"; cargo build --release --locked -p lichen --target "$t")
    out=$TARGET_DIR/$t/release/lichen
    # `strip = true` in the release profile: what cargo leaves is what ships.
    local version
    version=$(eval "$(target_env "$t")"; $LICHEN_BIN_RUNNER "$out" version | tr '\n' ' ')
    report+=("$(awk -v t="$t" -v b="$(stat -c %s "$out")" -v s="$(secs "$t0")" -v v="$version" \
      'BEGIN { printf "%-32s %6.2f MiB  built in %-6s %s", t, b / 1048576, s, v }')")
    verdicts+=("$(check_budget "$t" "$out")") || over=1
  done
  echo
  printf '%s\n' "${report[@]}"
  printf '%s\n' "${verdicts[@]}"
  return "$over"
}

test_targets() {
  local targets=("$@") t0 t
  check_tools "${targets[@]}"
  # The build machine's lichen, for `lichen compile --target` in the cross suite: QEMU hands an
  # x86-64 executable straight to the kernel, so the emulated test starts it natively.
  cargo build --locked -p lichen
  for t in "${targets[@]}"; do
    t0=$(date +%s)
    (
      eval "$(target_env "$t")"
      export LICHEN_COMPILE_BIN=$TARGET_DIR/debug/lichen
      cargo build --locked -p lichen --target "$t"
      local failed=0
      cargo test --locked --no-fail-fast --target "$t" "${UNIT_ARGS[@]}" || failed=1
      # The MQTT suite runs by itself, as it did when every suite was its own binary: its tests
      # time brokers' restarts and QoS 1 windows, and emulation is slow enough without the heavier
      # suites on the same two test threads.
      cargo test --locked --no-fail-fast --target "$t" "${SUITE_ARGS[@]}" -- "${SUITES[@]:0:${#SUITES[@]}-1}" || failed=1
      cargo test --locked --no-fail-fast --target "$t" "${SUITE_ARGS[@]}" -- "${SUITES[-1]}" || failed=1
      exit "$failed"
    )
    echo "::: $t: built and tested under QEMU in $(secs "$t0")"
  done
}

# The tests `test` selects, one `name: test` line each, from a native build of the same sources.
list_tests() {
  cargo test --locked -q "${UNIT_ARGS[@]}" -- --list --format terse
  cargo test --locked -q "${SUITE_ARGS[@]}" -- "${SUITES[@]}" --list --format terse
}

cmd=build
case ${1:-} in build | test | env | list) cmd=$1; shift ;; esac
targets=()
for a in "$@"; do targets+=("$(triple "$a")"); done
case $cmd in
  build)
    ((${#targets[@]})) || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)
    build "${targets[@]}" ;;
  test)
    ((${#targets[@]})) || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
    test_targets "${targets[@]}" ;;
  list) list_tests ;;
  env)
    ((${#targets[@]} == 1)) || { echo "usage: cross/build.sh env TARGET" >&2; exit 2; }
    target_env "${targets[0]}" ;;
esac
