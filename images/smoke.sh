#!/usr/bin/env bash
# The board in a box, checked end to end by hand (no Lichen in it): builds a test image, boots it,
# and checks what images/README.md promises, printing the figures.
#
#   images/smoke.sh --arch arm64|armhf [--cache-dir DIR] [--keep DIR]
#
# Checks: multi-user.target is reached; the guest has 10.0.2.15 by DHCP; it fetches a page from a
# host server on 127.0.0.1 through --forward (10.0.2.100) and reaches nothing else (the host at
# 10.0.2.2, even with a default route); a guest port is reachable on the host through --expose; a
# link cut and restored; an ACPI power-off ends boot.sh with 0; after a second boot, a power cut
# (kill) ends it with 137 and the next boot finds the file written before the cut; the timeout ends
# it with 124. As root (mkimage.sh needs it). Exit status 0 when every check passed.
set -euo pipefail
PROG=smoke.sh
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=images/board-lib.sh
. "$here/board-lib.sh"
usage() { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }

arch='' cache_args=() keep=''
while (($#)); do
  case $1 in
    --arch) arch=${2:-}; shift 2 || usage ;;
    --cache-dir) cache_args=(--cache-dir "${2:-}"); shift 2 || usage ;;
    --keep) keep=${2:-}; shift 2 || usage ;;
    *) usage ;;
  esac
done
[[ $arch == arm64 || $arch == armhf ]] || usage

dir=${keep:-$(mktemp -d "${TMPDIR:-/var/tmp}/smoke.XXXXXX")}
mkdir -p "$dir"
img=$dir/board-$arch.img
http_pid='' boot_pid=''
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [[ -n $boot_pid ]]; then kill "$boot_pid" 2>/dev/null || true; wait "$boot_pid" 2>/dev/null || true; fi
  if [[ -n $http_pid ]]; then kill "$http_pid" 2>/dev/null || true; fi
  [[ -n $keep ]] || rm -rf "$dir"
}
trap cleanup EXIT

failures=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
g() { "$here/guest.sh" --image "$img" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

t=$SECONDS
rm -f "$img"
"$here/mkimage.sh" --arch "$arch" --out "$img" --test-console "${cache_args[@]}"
echo "FIGURE image built in $((SECONDS - t)) s"

web=$(free_port) exposed=$(free_port)
mkdir -p "$dir/www"
echo "smoke-$arch" >"$dir/www/index.html"
python3 -m http.server "$web" --bind 127.0.0.1 --directory "$dir/www" >"$dir/http.log" 2>&1 &
http_pid=$!

# boot [ARGS]: boot.sh in the background (killing it kills QEMU). The previous run's console log
# goes first, so that wait-console cannot match it.
boot() {
  rm -f "$img.console.log"
  "$here/boot.sh" --image "$img" "$@" >>"$dir/boot.log" 2>&1 &
  boot_pid=$!
}
# ended WANT WHAT: boot.sh ended with status WANT (it always ends, by its --timeout at the latest).
ended() {
  local rc=0
  wait "$boot_pid" || rc=$?
  boot_pid=''
  if [[ $rc == "$1" ]]; then pass "boot.sh ended with $1 ($2)"; else fail "boot.sh ended with $rc, not $1 ($2)"; fi
}
multi_user() {
  local t0=$SECONDS
  if g wait-console 'Reached target.*multi-user' 400 >/dev/null; then
    pass "multi-user.target reached (console)"
    echo "FIGURE boot to multi-user.target: $((SECONDS - t0)) s"
  else
    fail "multi-user.target not reached (console)"
  fi
  if [[ $(g wait-boot 400) == running ]]; then pass "boot finished: running"; else fail "boot not finished or degraded"; fi
}

boot --forward "$web" --expose "10250:$exposed" --timeout 900
multi_user
echo "FIGURE QEMU resident memory: $(awk '/VmRSS/ { printf "%d MiB", $2 / 1024 }' "/proc/$(cat "$img.qemu.pid")/status")"
if g exec 'ip -4 -br addr show dev enp0s2' | grep -q ' 10\.0\.2\.15/24'; then pass "DHCP address 10.0.2.15"; else fail "no DHCP address"; fi
fetch="exec 3<>/dev/tcp/10.0.2.100/$web && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && cat <&3"
if g exec "$fetch" | grep -q "^smoke-$arch"; then pass "host 127.0.0.1:$web reached at 10.0.2.100:$web"; else fail "forwarded port not reached"; fi
if g exec "timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/$web'" >/dev/null; then fail "the host reached at 10.0.2.2:$web"; else pass "10.0.2.2:$web refused"; fi
if g exec "ip route add default via 10.0.2.2 && timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/22'; s=\$?; ip route del default; exit \$s" >/dev/null; then
  fail "10.0.2.2:22 reached with a default route"
else
  pass "10.0.2.2:22 refused with a default route"
fi
# Connecting before the guest listens would only meet a reset: wait until it listens.
# shellcheck disable=SC2016 # expanded by the guest's shell
g exec 'systemd-run --unit=smoke-expose systemd-socket-activate -l 10250 -a --inetd /bin/echo exposed-ok &&
  for i in $(seq 30); do ss -ltnH "sport = :10250" | grep -q . && exit 0; sleep 1; done; exit 1' >/dev/null || fail "no listener on the guest's :10250"
if [[ $(timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$exposed && cat <&3") == exposed-ok ]]; then pass "guest :10250 on host 127.0.0.1:$exposed"; else fail "--expose"; fi
g link-down || fail "link-down"
# shellcheck disable=SC2016 # expanded by the guest's shell
if g exec 'for i in $(seq 30); do networkctl --no-pager | grep -q "enp0s2.*no-carrier" && exit 0; sleep 1; done; exit 1' >/dev/null; then pass "link-down: no carrier"; else fail "link-down"; fi
g link-up || fail "link-up"
if g exec "for i in \$(seq 30); do networkctl --no-pager | grep -q 'enp0s2.*routable' && { $fetch; exit; }; sleep 1; done; exit 1" | grep -q "^smoke-$arch"; then
  pass "link-up: routable, forwarded port reached again"
else
  fail "link-up"
fi
t=$SECONDS
g powerdown || fail "powerdown"
ended 0 "ACPI power-off"
echo "FIGURE power-off: $((SECONDS - t)) s"

boot --timeout 900
multi_user
g exec 'echo before-the-cut >/root/smoke-marker && sync' >/dev/null || fail "marker not written"
g kill || fail "kill"
ended 137 "power cut"
boot --timeout 900
multi_user
if [[ $(g exec 'cat /root/smoke-marker' || true) == before-the-cut ]]; then pass "the file written before the cut is there"; else fail "file lost in the cut"; fi
g powerdown || fail "powerdown"
ended 0 "ACPI power-off"

t=$SECONDS
boot --timeout 20
ended 124 "timeout 20 s"
echo "FIGURE timeout 20 s ended boot.sh after $((SECONDS - t)) s"
if pgrep -f "qemu-system-.*$img" >/dev/null; then fail "QEMU still running"; else pass "no QEMU left"; fi

echo "$failures failed"
((failures == 0))
