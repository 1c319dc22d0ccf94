# shellcheck shell=bash
# What images/mkimage.sh, images/boot.sh and images/guest.sh share: messages, the Debian packages
# each of them needs (installed when run as root and missing, naming each) and the defaults that
# tie a booted image to its console log, QMP socket, pid file and test console socket.
# Sourced, never run; it must not change images/bake.sh, which stays self-contained.

# Several tools live in sbin (sfdisk, mkfs.vfat, mkfs.ext4), which a user's PATH on Debian lacks.
for d in /usr/local/sbin /usr/sbin /sbin; do
  [[ :$PATH: == *:$d:* ]] || PATH=$PATH:$d
done
export PATH LC_ALL=C MTOOLS_SKIP_CHECK=1

# shellcheck source=images/qemu-pin.sh
. "$(dirname "${BASH_SOURCE[0]}")/qemu-pin.sh"

die() { echo "images/$PROG: $*" >&2; exit 1; }
say() { echo "${PROG%.sh}: $*" >&2; }

# need_tools "COMMAND|PACKAGE|WHY"...: installs the Debian packages whose command is missing, as
# root, naming each and why; as another user prints the apt-get line and exits.
need_tools() {
  local line check pkg why pkgs=() extra=()
  for line in "$@"; do
    IFS='|' read -r check pkg why <<<"$line"
    if [[ $check == /* ]]; then [[ -e $check ]] && continue; else type -P "$check" >/dev/null && continue; fi
    [[ " ${pkgs[*]} " == *" $pkg "* ]] && continue
    say "missing $check: needs the Debian package $pkg ($why)"
    pkgs+=("$pkg")
  done
  ((${#pkgs[@]})) || return 0
  if [[ $(id -u) -ne 0 ]]; then
    die "not root, so not installing them; as root run: apt-get update && apt-get install -y --no-install-recommends ${pkgs[*]}"
  fi
  # The package lists first: the qemu-utils pin names the version apt would install now, and a
  # machine's lists may be older than the archive (a version since replaced is not found).
  say "apt-get update"
  apt-get update -qq
  mapfile -t extra < <(qemu_utils_pin "${pkgs[@]}")
  if ((${#extra[@]})); then
    say "the installed qemu-utils is of another QEMU release than qemu-system-arm: installing ${extra[0]} with it"
  fi
  local cmd=(apt-get install -y --no-install-recommends "${pkgs[@]}" "${extra[@]}")
  say "installing: ${cmd[*]}"
  DEBIAN_FRONTEND=noninteractive "${cmd[@]}" -qq >/dev/null
}

# The files a booted image is handled through, by default next to the image (boot.sh and guest.sh
# agree on them, so `guest.sh --image IMG` finds what `boot.sh --image IMG` made).
default_console() { echo "$1.console.log"; }
default_qmp() { echo "$1.qmp"; }
default_pidfile() { echo "$1.qemu.pid"; }
default_test_console() { echo "$1.cmd"; }

# The name of the virtio-serial port that carries the test console (images/mkimage.sh
# --test-console installs its guest side; images/guest.sh exec is its host side).
# shellcheck disable=SC2034 # used by the scripts that source this file
TEST_CONSOLE_PORT=org.lichen.test-console
