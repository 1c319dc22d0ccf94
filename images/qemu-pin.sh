# shellcheck shell=bash
# One QEMU release for the board in a box. qemu-system-arm refuses to install beside a newer
# qemu-utils (a backport on some machines: "qemu-utils Breaks qemu-system-common (<< 1:8.0)"), so
# whoever installs qemu-system-arm moves qemu-utils to the same release. Sourced by the two
# installers, images/board-lib.sh (need_tools) and tests/run.sh; never run.

# qemu_utils_pin PACKAGE...: if the PACKAGEs about to be installed hold qemu-system-arm and an
# installed qemu-utils is of another version than the qemu-system-arm apt would install, prints
# the extra apt-get arguments that move qemu-utils to it, one per line; otherwise prints nothing.
qemu_utils_pin() {
  [[ " $* " == *" qemu-system-arm "* ]] || return 0
  dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q 'ok installed' || return 0
  local have want
  have=$(dpkg-query -W -f='${Version}' qemu-utils)
  want=$(apt-cache policy qemu-system-arm | sed -n 's/^ *Candidate: //p')
  [[ -n $want && $have != "$want" ]] || return 0
  printf '%s\n' "qemu-utils=$want" --allow-downgrades
}
