#!/usr/bin/env bash
# Boots a board image (images/mkimage.sh, then images/bake.sh) under QEMU full-system emulation of
# a QEMU "virt" board, and stays in the foreground until the guest powers off, QEMU is killed, or
# the timeout: it always ends by then (QEMU killed at the deadline).
#
#   images/boot.sh --image board.img [--arch arm64|armhf] [--forward PORT]... [--expose GUESTPORT:HOSTPORT]...
#                  [--timeout S] [--console FILE] [--monitor SOCKET] [--pidfile FILE] [--test-console SOCKET]
#                  [--memory MIB] [--snapshot] [--append KERNEL-ARGS]
#
# - arm64: qemu-system-aarch64 -M virt -cpu cortex-a53; armhf: qemu-system-arm -M virt -cpu
#   cortex-a15; both -smp 2 -m 1024 (--memory). The architecture is read from the kernel unless
#   given. The kernel (vmlinuz) and initramfs (initrd.img) are copied out of the image's FAT boot
#   partition with mcopy; root=PARTUUID=<disk id>-<n> of the first Linux partition, from sfdisk.
# - The serial console (ttyAMA0) goes to --console (default IMAGE.console.log), rewritten per run.
# - User-mode networking with restrict=on: the guest gets 10.0.2.15 by DHCP and reaches nothing
#   but what is forwarded. --forward PORT: the host's 127.0.0.1:PORT is the guest's
#   10.0.2.100:PORT (one socat per connection, which passes each side's end of stream on to the
#   other: nc would leave the guest waiting after the host's side closed). --expose G:H: the
#   guest's port G is the host's 127.0.0.1:H.
# - --monitor SOCKET (default IMAGE.qmp): QEMU's QMP socket, used by images/guest.sh (powerdown,
#   link-down, link-up); --pidfile (default IMAGE.qemu.pid): QEMU's pid, for guest.sh kill;
#   --test-console SOCKET (default IMAGE.cmd): the virtio-serial port of a --test-console image.
# - The disk is the image itself (cache=unsafe: what the guest wrote survives QEMU being killed,
#   as it sits in the host's page cache), or a throw-away overlay with --snapshot.
#
# Exit status: 0 when the guest powered off; 124 when the timeout (default 900 s) killed QEMU; 137
# when QEMU was killed (a power cut: guest.sh kill); otherwise QEMU's own.
set -euo pipefail
PROG=boot.sh
# shellcheck source=images/board-lib.sh
. "$(dirname "$0")/board-lib.sh"
usage() { sed -n '6,8p' "$0" | sed 's/^# *//' >&2; exit 2; }

image='' arch='' timeout=900 console='' qmp='' pidfile='' test_console='' memory=1024 snapshot='' append=''
forwards=() exposes=()
while (($#)); do
  case $1 in
    --image) image=${2:-}; shift 2 || usage ;;
    --arch) arch=${2:-}; shift 2 || usage ;;
    --forward) forwards+=("${2:-}"); shift 2 || usage ;;
    --expose) exposes+=("${2:-}"); shift 2 || usage ;;
    --timeout) timeout=${2:-}; shift 2 || usage ;;
    --console) console=${2:-}; shift 2 || usage ;;
    --monitor) qmp=${2:-}; shift 2 || usage ;;
    --pidfile) pidfile=${2:-}; shift 2 || usage ;;
    --test-console) test_console=${2:-}; shift 2 || usage ;;
    --memory) memory=${2:-}; shift 2 || usage ;;
    --snapshot) snapshot=1; shift ;;
    --append) append=${2:-}; shift 2 || usage ;;
    -h | --help) usage ;;
    *) echo "images/boot.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $image ]] || usage
[[ -f $image ]] || die "$image does not exist"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout is in whole seconds, not $timeout"
[[ $memory =~ ^[1-9][0-9]*$ ]] || die "--memory is in MiB, not $memory"
port_ok() { [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && (($1 <= 65535)); }
for p in "${forwards[@]}"; do port_ok "$p" || die "--forward takes a port number, not $p"; done
for e in "${exposes[@]}"; do
  if ! { [[ $e == *:* ]] && port_ok "${e%%:*}" && port_ok "${e#*:}"; }; then
    die "--expose takes GUESTPORT:HOSTPORT, not $e"
  fi
done
console=${console:-$(default_console "$image")}
qmp=${qmp:-$(default_qmp "$image")}
pidfile=${pidfile:-$(default_pidfile "$image")}
test_console=${test_console:-$(default_test_console "$image")}
if [[ -s $pidfile ]] && [[ $(cat "/proc/$(tr -dc 0-9 <"$pidfile")/comm" 2>/dev/null) == qemu-system-* ]]; then
  die "$image is already running (QEMU pid $(cat "$pidfile"), $pidfile): two guests on one disk would corrupt it"
fi

tools=("sfdisk|fdisk|reads the partition table" "jq|jq|reads sfdisk's JSON"
  "mcopy|mtools|copies the kernel and initramfs out of the boot partition")
((${#forwards[@]} == 0)) || tools+=("socat|socat|carries each --forward connection to the host's port")
case $arch in
  '' | arm64 | armhf) ;;
  *) die "--arch must be arm64 or armhf, not $arch" ;;
esac
tools+=("qemu-system-aarch64|qemu-system-arm|emulates the arm64 board" "qemu-system-arm|qemu-system-arm|emulates the armhf board")
need_tools "${tools[@]}"

run=$(mktemp -d "${TMPDIR:-/tmp}/boot.XXXXXX")
qpid='' spid=''
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  # QEMU leads its own process group, with the socat of each forwarded connection.
  if [[ -n $qpid ]]; then kill -9 -- "-$qpid" 2>/dev/null || true; fi
  if [[ -n $spid ]]; then kill "$spid" 2>/dev/null || true; fi
  rm -rf "$run"
  rm -f "$qmp" "$test_console" "$pidfile"
}
trap cleanup EXIT
trap 'say "stopped by a signal: QEMU killed"; exit 143' TERM INT HUP

# --- kernel, initramfs and root from the image -------------------------------------------------
table=$(sfdisk --json "$image" 2>/dev/null) || die "$image has no partition table"
sector=$(jq -r '.partitiontable.sectorsize // 512' <<<"$table")
disk_id=$(jq -r '.partitiontable.id // empty' <<<"$table")
[[ $(jq -r .partitiontable.label <<<"$table") == dos && -n $disk_id ]] \
  || die "$image has no MBR (dos) partition table with a disk identifier"
boot_start=$(jq -r '[.partitiontable.partitions[] | select(.type == "c" or .type == "b" or .type == "e")][0].start // empty' <<<"$table")
root_n=$(jq -r '[.partitiontable.partitions | to_entries[] | select(.value.type == "83")][0].key // empty' <<<"$table")
[[ -n $boot_start ]] || die "$image has no FAT partition (MBR type b, c or e) with the kernel"
[[ -n $root_n ]] || die "$image has no Linux partition (MBR type 83) for the root"
partuuid=$(printf '%08x-%02d' "$disk_id" $((root_n + 1)))
for f in vmlinuz initrd.img; do
  mcopy -i "$image@@$((boot_start * sector))" "::/$f" "$run/$f" 2>/dev/null \
    || die "$image's boot partition has no /$f (images/mkimage.sh puts the kernel and initramfs there)"
done

# The kernel's own header says which board it is for (arm64 Image: "ARM\x64" at 56; arm zImage:
# 0x016f2818 at 36), after gunzip if it is compressed.
if [[ $(od -An -tx1 -N2 "$run/vmlinuz" | tr -d ' \n') == 1f8b ]]; then
  zcat "$run/vmlinuz" 2>/dev/null | head -c 64 >"$run/head" || true
else
  head -c 64 "$run/vmlinuz" >"$run/head"
fi
if [[ $(od -An -c -j 56 -N3 "$run/head" | tr -d ' \n') == ARM ]]; then
  kernel_arch=arm64
elif [[ $(od -An -tx1 -j 36 -N4 "$run/head" | tr -d ' \n') == 18286f01 ]]; then
  kernel_arch=armhf
else
  die "$image's /vmlinuz is neither an arm64 Image nor an arm zImage"
fi
[[ -z $arch || $arch == "$kernel_arch" ]] || die "--arch $arch, but $image's kernel is $kernel_arch"
arch=$kernel_arch
case $arch in
  arm64) qemu=(qemu-system-aarch64 -M virt -cpu cortex-a53) ;;
  armhf) qemu=(qemu-system-arm -M virt -cpu cortex-a15) ;;
esac

netdev=user,id=net0,restrict=on,ipv6=off
# STDIO,shut-down (",," is QEMU's escaped comma): the guest's socket is socat's stdin and stdout
# at once, so the host's end of stream must reach it as shutdown(SHUT_WR), not close(1). -t 30:
# after one side ended, the other may still answer for 30 s.
for p in "${forwards[@]}"; do netdev+=",guestfwd=tcp:10.0.2.100:$p-cmd:socat -t 30 STDIO,,shut-down TCP:127.0.0.1:$p"; done
for e in "${exposes[@]}"; do netdev+=",hostfwd=tcp:127.0.0.1:${e#*:}-:${e%%:*}"; done

rm -f "$qmp" "$test_console" "$pidfile"
# shellcheck disable=SC2054 # the commas are QEMU's option syntax
qemu+=(-smp 2 -m "$memory" -nodefaults -no-user-config -display none
  -kernel "$run/vmlinuz" -initrd "$run/initrd.img"
  -append "root=PARTUUID=$partuuid rootfstype=ext4 rootwait fsck.repair=yes console=ttyAMA0${append:+ $append}"
  -drive "file=$image,format=raw,if=none,id=hd0,cache=unsafe${snapshot:+,snapshot=on}"
  -device virtio-blk-pci,drive=hd0
  -netdev "$netdev" -device virtio-net-pci,netdev=net0,romfile=
  -device virtio-rng-pci
  -chardev "file,id=serial0,path=$console" -serial chardev:serial0
  -qmp "unix:$qmp,server=on,wait=off"
  -device virtio-serial-pci,id=vser0
  -chardev "socket,id=tcon,path=$test_console,server=on,wait=off"
  -device "virtserialport,bus=vser0.0,chardev=tcon,name=$TEST_CONSOLE_PORT"
  -pidfile "$pidfile")

say "booting $image ($arch, root PARTUUID=$partuuid) for at most $timeout s: console $console, QMP $qmp, pid $pidfile, test console $test_console"
((${#forwards[@]} == 0)) || say "forwarded into the guest: ${forwards[*]/#/10.0.2.100:} (from the host's 127.0.0.1)"
((${#exposes[@]} == 0)) || say "exposed on the host's 127.0.0.1 (guest:host): ${exposes[*]}"
t0=$SECONDS
# setsid: QEMU leads a process group of its own (with its socat children), which cleanup ends whole.
setsid nice -n 10 "${qemu[@]}" </dev/null &
qpid=$!
sleep "$timeout" &
spid=$!
set +e
wait -n -p ended "$qpid" "$spid"
rc=$?
set -e
if [[ ${ended:-} == "$spid" ]]; then
  kill -9 "$qpid" 2>/dev/null || true
  wait "$qpid" 2>/dev/null || true
  say "timeout: QEMU killed after $((SECONDS - t0)) s"
  exit 124
fi
kill "$spid" 2>/dev/null || true
case $rc in
  0) say "the guest powered off after $((SECONDS - t0)) s" ;;
  137) say "QEMU was killed (a power cut) after $((SECONDS - t0)) s" ;;
  *) say "QEMU exited with status $rc after $((SECONDS - t0)) s" ;;
esac
exit "$rc"
