#!/usr/bin/env bash
# The test suite, as the README and CI (.ci/run) run it:
#
#   bash tests/run.sh [CARGO TEST ARGS...]   install what the tests need, then
#                                            `cargo test --workspace --locked ARGS...`
#   bash tests/run.sh --install-only         only the first half (CI times it as its own stage)
#
# The suites run real daemons and tools (a registry, a broker, strace, dpkg, lintian, ...), not
# mocks, so a machine needs them before the tests mean anything. On Debian as root this installs
# the ones missing, saying what and why; as another user it prints the apt-get line to run and
# exits 1. `cargo test --workspace` itself needs nothing from this script on a machine that has
# the packages already. The toolchain (compiler, components, board targets) is pinned by
# rust-toolchain.toml and installed by rustup.
set -euo pipefail
cd "$(dirname "$0")/.."
# Several tools live in sbin (sfdisk, mkfs.vfat, debugfs), which a user's PATH on Debian lacks; the
# tests look them up on PATH.
for d in /usr/local/sbin /usr/sbin /sbin; do
  [[ :$PATH: == *:$d:* ]] || PATH=$PATH:$d
done
export PATH
# shellcheck source=images/qemu-pin.sh
. images/qemu-pin.sh

# One line per need: the command (or an absolute file) that shows it is there, the Debian package
# that provides it, and which tests use it.
NEEDS=(
  "cc|gcc|the Rust linker driver (every test binary is linked with it)"
  "/usr/include/stdio.h|libc6-dev|the C library the test binaries link against"
  "kill|procps|the agent tests stop the agent with kill -TERM and kill -9"
  "setpriv|util-linux|the permission test drops root to run the agent as nobody"
  "docker-registry|docker-registry|the OCI pull tests run a real registry (distribution 2.8)"
  "htpasswd|apache2-utils|the registry tests make its bcrypt htpasswd file"
  "openssl|openssl|the TLS tests make their CAs (the HTTPS registry, the MQTT broker); the upgrade tests their signing keys"
  "mosquitto|mosquitto|the MQTT telemetry tests run a real broker (mosquitto 2.0)"
  "curl|curl|the kubelet API tests call the node over TLS as an operator would"
  "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1|libfaketime|the clock-jump test moves the agent's wall clock"
  "systemd-analyze|systemd|the systemd suite verifies the unit; packaging runs systemd-sysusers"
  "strace|strace|the systemd suite traces the agent's system calls against SystemCallFilter="
  "deb-systemd-helper|init-system-helpers|the packaging suite runs the .deb's maintainer scripts"
  "readelf|binutils|the .deb's Depends are read from the binary, which strip shrinks"
  "lintian|lintian|the packaging suite lints the .deb"
  "shellcheck|shellcheck|the packaging suite checks the maintainer and first-boot scripts"
  "sfdisk|fdisk|the image tests make and read partition tables"
  "mkfs.vfat|dosfstools|the image tests make the FAT boot partition"
  "mdir|mtools|the image tests read and write the FAT boot partition without mounting it"
  "debugfs|e2fsprogs|the image tests write and read the ext4 root without mounting it"
  "jq|jq|images/bake.sh reads sfdisk's JSON"
  # The board in a box (images/mkimage.sh, boot.sh, guest.sh): a Debian image of the boards'
  # architectures, booted under QEMU full-system emulation. Installed without their Recommends
  # (qemu-system-arm's would bring a GTK display and firmware the harness never uses).
  "mmdebstrap|mmdebstrap|images/mkimage.sh builds the board image's root from the Debian archive|norec"
  "arch-test|arch-test|mmdebstrap checks that a foreign architecture runs|norec"
  "qemu-aarch64-static|qemu-user-static|mmdebstrap runs the arm64 and armhf packages' scripts|norec"
  "update-binfmts|binfmt-support|images/mkimage.sh registers qemu-user-static with binfmt_misc|norec"
  "qemu-system-aarch64|qemu-system-arm|images/boot.sh boots the board image (arm64 and armhf)|norec"
  "socat|socat|images/boot.sh carries each forwarded connection to a host port|norec"
  "python3|python3|images/guest.sh speaks QMP and the test console protocol|norec"
)

missing_packages() {
  local line check pkg why norec
  for line in "${NEEDS[@]}"; do
    IFS='|' read -r check pkg why norec <<<"$line"
    # `type -P`: a program on PATH, not a shell builtin of the same name (kill).
    if [[ $check == /* ]]; then [[ -e $check ]] && continue; else type -P "$check" >/dev/null && continue; fi
    echo "$pkg|$why|$norec"
  done
}

install_missing() {
  local missing pkgs=() bare=() line pkg why norec
  missing=$(missing_packages)
  [[ -n $missing ]] || { echo "tests/run.sh: every Debian package the tests need is installed"; return 0; }
  echo "tests/run.sh: the tests need these Debian packages, which are missing here:"
  while IFS='|' read -r pkg why norec; do
    printf '  %-20s %s\n' "$pkg" "$why"
    if [[ -n $norec ]]; then
      [[ " ${bare[*]} " == *" $pkg "* ]] || bare+=("$pkg")
    else
      pkgs+=("$pkg")
    fi
  done <<<"$missing"
  install_line() {
    local cmds=()
    ((${#pkgs[@]} == 0)) || cmds+=("apt-get install -y ${pkgs[*]}")
    ((${#bare[@]} == 0)) || cmds+=("apt-get install -y --no-install-recommends ${bare[*]}")
    printf ' && DEBIAN_FRONTEND=noninteractive %s' "${cmds[@]}"
  }
  if [[ $(id -u) -ne 0 ]]; then
    echo "tests/run.sh: not root, so not installing them; as root run:" >&2
    echo "  apt-get update$(install_line)" >&2
    echo "  (if qemu-utils is from another QEMU release, add qemu-utils=<qemu-system-arm's version> --allow-downgrades)" >&2
    return 1
  fi
  command -v apt-get >/dev/null || { echo "tests/run.sh: no apt-get: install the packages above with your package manager" >&2; return 1; }
  # The package lists first: the qemu-utils pin below names the version apt would install now,
  # and a machine's lists may be older than the archive (a version since replaced is not found).
  echo "tests/run.sh: apt-get update"
  apt-get update -qq
  local pin
  mapfile -t pin < <(qemu_utils_pin "${bare[@]}")
  bare+=("${pin[@]}")
  echo "tests/run.sh: installing them:$(install_line | sed 's/DEBIAN_FRONTEND=noninteractive //g; s/^ &&//')"
  if ((${#pkgs[@]})); then DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" -qq; fi
  if ((${#bare[@]})); then DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${bare[@]}" -qq; fi
  # A package whose check still fails was installed under another name or path: say which, rather
  # than let the tests fail later with a less direct message.
  missing=$(missing_packages)
  if [[ -n $missing ]]; then
    echo "tests/run.sh: still missing after apt-get install: $(cut -d'|' -f1 <<<"$missing" | tr '\n' ' ')" >&2
    return 1
  fi
}

install_toolchain() {
  command -v cargo >/dev/null || {
    echo "tests/run.sh: cargo is missing: install rustup (https://rustup.rs); rust-toolchain.toml pins the rest" >&2
    return 1
  }
  # Installs what rust-toolchain.toml names and is absent: the toolchain, its components and the
  # boards' targets (a machine may have the toolchain without them; rustup does not add them on
  # its own). Quick when everything is there.
  if command -v rustup >/dev/null; then
    rustup toolchain install
  fi
}

install_missing
install_toolchain
if [[ ${1:-} == --install-only ]]; then exit 0; fi
exec cargo test --workspace --locked "$@"
