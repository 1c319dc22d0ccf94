#!/usr/bin/env bash
# Builds a Raspberry Pi OS Lite-like disk image of Debian bookworm from the Debian archive, for
# booting under QEMU (images/boot.sh) in tests and development. Users keep baking Raspberry Pi OS
# with images/bake.sh; this image only stands in for a board.
#
#   images/mkimage.sh --arch arm64|armhf --out base.img [--cache-dir DIR] [--size MIB] [--test-console]
#   images/mkimage.sh --arch arm64|armhf --rootfs-only [--cache-dir DIR]
#
# The image: an MBR; a FAT32 boot partition (at 4 MiB, 512 MiB, label bootfs) that the root's
# /etc/fstab mounts at /boot/firmware and that holds the kernel (vmlinuz) and initramfs
# (initrd.img); an ext4 root (label rootfs) filling the rest. The root is built by
# `mmdebstrap --mode=root --variant=minbase` of bookworm and bookworm-updates (a foreign
# architecture runs under qemu-user-static through binfmt_misc, which this script registers if
# needed) with systemd, udev, dbus, kmod, the
# Debian kernel and an initramfs of the virtio and ext4 modules only, iproute2, ca-certificates,
# dosfstools, DHCP on en*/eth* by systemd-networkd and a getty on ttyAMA0. No root password, no
# user, no SSH: the harness reads the serial console.
# --test-console adds a root command channel on a virtio-serial port for images/guest.sh exec; a
# test image only, never one for a board.
#
# The root file system tarball is cached in --cache-dir (default /var/cache/lichen-images), keyed
# by a hash of everything that goes into it, so the second build takes seconds. --rootfs-only fills
# that cache and stops (CI builds both roots in the background while it compiles). No loop device and
# no mount: mkfs.vfat -C and mcopy, mkfs.ext4 -d, sfdisk, dd. Runs as root (mmdebstrap's root
# mode, binfmt_misc); installs the Debian packages it needs when missing.
set -euo pipefail
PROG=mkimage.sh
# shellcheck source=images/board-lib.sh
. "$(dirname "$0")/board-lib.sh"
usage() { sed -n '6,7p' "$0" | sed 's/^# *//' >&2; exit 2; }

arch='' out='' cache_dir=/var/cache/lichen-images size_mib=2048 test_console='' rootfs_only=''
while (($#)); do
  case $1 in
    --arch) arch=${2:-}; shift 2 || usage ;;
    --out) out=${2:-}; shift 2 || usage ;;
    --cache-dir) cache_dir=${2:-}; shift 2 || usage ;;
    --size) size_mib=${2:-}; shift 2 || usage ;;
    --test-console) test_console=1; shift ;;
    --rootfs-only) rootfs_only=1; shift ;;
    -h | --help) usage ;;
    *) echo "images/mkimage.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $arch && ( -n $out || -n $rootfs_only ) ]] || usage
case $arch in
  arm64) qemu_arch=aarch64 kernel_pkg=linux-image-arm64 ;;
  armhf) qemu_arch=arm kernel_pkg=linux-image-armmp-lpae ;;
  *) die "--arch must be arm64 or armhf, not $arch" ;;
esac
if ! [[ $size_mib =~ ^[0-9]+$ ]] || ((size_mib < 1024)); then die "--size is the image size in MiB, at least 1024"; fi
[[ -n $rootfs_only || ! -e $out ]] || die "$out exists: delete it or choose another --out"
[[ $(id -u) -eq 0 ]] || die "run it as root: mmdebstrap --mode=root and binfmt_misc need root"

need_tools \
  "mmdebstrap|mmdebstrap|builds the root file system from the Debian archive" \
  "arch-test|arch-test|mmdebstrap checks with it that the foreign architecture runs" \
  "qemu-$qemu_arch-static|qemu-user-static|runs the $arch packages' maintainer scripts" \
  "update-binfmts|binfmt-support|registers qemu-$qemu_arch-static with binfmt_misc" \
  "mkfs.vfat|dosfstools|makes the FAT boot partition" \
  "mcopy|mtools|writes the kernel and initramfs onto the boot partition without mounting it" \
  "sfdisk|fdisk|writes the partition table" \
  "mkfs.ext4|e2fsprogs|makes the ext4 root from a directory"

# --- binfmt_misc: the kernel must hand $arch programs to qemu-$qemu_arch-static ------------------
binfmt=/proc/sys/fs/binfmt_misc
if [[ ! -e $binfmt/register ]]; then
  say "binfmt_misc is not mounted: mount -t binfmt_misc binfmt_misc $binfmt"
  mount -t binfmt_misc binfmt_misc "$binfmt" || die "cannot mount binfmt_misc on $binfmt"
fi
if [[ $(cat "$binfmt/status") != enabled ]]; then
  say "binfmt_misc is disabled: echo 1 > $binfmt/status"
  echo 1 >"$binfmt/status"
fi
entry=$binfmt/qemu-$qemu_arch
if [[ ! -e $entry ]]; then
  if [[ -e /var/lib/binfmts/qemu-$qemu_arch ]]; then
    say "qemu-$qemu_arch is not registered with binfmt_misc: update-binfmts --enable qemu-$qemu_arch"
    update-binfmts --enable "qemu-$qemu_arch" || true
  fi
  if [[ ! -e $entry && -e /usr/lib/binfmt.d/qemu-$qemu_arch.conf ]]; then
    say "registering qemu-$qemu_arch with binfmt_misc from /usr/lib/binfmt.d/qemu-$qemu_arch.conf"
    cat "/usr/lib/binfmt.d/qemu-$qemu_arch.conf" >"$binfmt/register"
  fi
  [[ -e $entry ]] || die "could not register qemu-$qemu_arch with binfmt_misc (reinstall qemu-user-static and binfmt-support)"
fi
if [[ $(head -n 1 "$entry") != enabled ]]; then
  say "qemu-$qemu_arch is disabled in binfmt_misc: echo 1 > $entry"
  echo 1 >"$entry"
fi
# The F flag opens the interpreter at registration, so it also works inside mmdebstrap's chroot.
grep -q '^flags:.*F' "$entry" || die "$entry lacks the F (fix binary) flag, so $arch programs cannot run in a chroot"

# --- the recipe: everything that goes into the cached root file system ---------------------------
suite=bookworm
# The release and its updates (point releases carry the security fixes), not the security archive:
# a test image needs no fix the day it is out, and every suite more is one more index that can be
# caught mid-sync (the security armhf index once was, for a whole morning, failing every build).
mirrors=(
  "deb http://deb.debian.org/debian $suite main"
  "deb http://deb.debian.org/debian $suite-updates main"
)
packages=(systemd-sysv udev dbus kmod "$kernel_pkg" initramfs-tools iproute2 ca-certificates dosfstools)
# The initramfs holds only what a QEMU virt board needs to find its root: with the default
# MODULES=most, mkinitramfs under qemu-user takes about 20 minutes.
initramfs_modules=(virtio_mmio virtio_pci virtio_blk virtio_net virtio_rng virtio_console ext4 crc32c_generic)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/mkimage.XXXXXX")
tarball=''
trap 'rm -rf "$work" ${out:+"$out.part"} ${tarball:+"$tarball.part"}' EXIT
ess=$work/essential customize=$work/customize
mkdir -p "$ess/etc/initramfs-tools/conf.d" "$ess/etc/initramfs-tools/hooks" \
  "$customize/etc/systemd/network"
# Written before the kernel is installed, so mkinitramfs runs once, with the short list. A conf.d
# snippet and a hook, not /etc/initramfs-tools/{initramfs.conf,modules}, which are the package's
# conffiles (dpkg would ask about them).
cat >"$ess/etc/initramfs-tools/conf.d/board-modules.conf" <<'EOF'
# images/mkimage.sh: only the modules listed by hooks/board-modules (virtio, ext4).
MODULES=list
EOF
cat >"$ess/etc/initramfs-tools/hooks/board-modules" <<EOF
#!/bin/sh
# images/mkimage.sh: the modules a QEMU virt board needs to reach its root (loaded at boot).
case "\$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in ${initramfs_modules[*]}; do force_load "\$m"; done
EOF
chmod 755 "$ess/etc/initramfs-tools/hooks/board-modules"
cat >"$customize/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
echo raspberrypi >"$customize/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\traspberrypi\n' >"$customize/etc/hosts"
# shellcheck disable=SC2016 # $1 is mmdebstrap's, expanded in its hook shell
customize_cmds=(
  'chroot "$1" systemctl enable systemd-networkd.service serial-getty@ttyAMA0.service'
  'rm -f "$1"/etc/resolv.conf'
)

recipe_version=1
key=$(
  {
    printf '%s\n' "recipe $recipe_version" "arch $arch" "suite $suite" "${mirrors[@]}" \
      "packages ${packages[*]}" "${customize_cmds[@]}"
    (cd "$work" && find essential customize -type f | sort | while read -r f; do
      echo "file $f $(stat -c %a "$f")"
      cat "$f"
    done)
  } | sha256sum | cut -c1-16
)
mkdir -p "$cache_dir"
tarball=$cache_dir/rootfs-$suite-$arch-$key.tar

# --- the root file system: from the cache, or built --------------------------------------------
t0=$SECONDS
if [[ -s $tarball ]]; then
  say "root file system from the cache: $tarball"
else
  say "building the $arch root file system with mmdebstrap (several minutes under qemu-user); cached as $tarball"
  args=(--mode=root --format=tar --variant=minbase "--architectures=$arch" "--include=$(IFS=,; echo "${packages[*]}")"
    "--essential-hook=sync-in $ess /" "--customize-hook=sync-in $customize /")
  for c in "${customize_cmds[@]}"; do args+=("--customize-hook=$c"); done
  # Retried: an archive mirror mid-sync fails apt-get update for a while.
  for attempt in 1 2 3; do
    if nice -n 10 mmdebstrap "${args[@]}" "$suite" "$tarball.part" "${mirrors[@]}" >&2; then break; fi
    ((attempt < 3)) || die "mmdebstrap failed three times (its messages are above)"
    say "mmdebstrap failed (attempt $attempt of 3): trying again in 30 s"
    rm -f "$tarball.part"
    sleep 30
  done
  mv "$tarball.part" "$tarball"
  say "root file system built in $((SECONDS - t0)) s"
fi
[[ -z $rootfs_only ]] || exit 0

# --- the image -----------------------------------------------------------------------------------
root=$work/root
mkdir "$root"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$tarball"
shopt -s nullglob
kernels=("$root"/boot/vmlinuz-*)
((${#kernels[@]})) || die "$tarball has no /boot/vmlinuz-*: delete it and build again"
kernel=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)
initrd=$root/boot/initrd.img-${kernel##*/vmlinuz-}
[[ -s $initrd ]] || die "$tarball has no ${initrd#"$root"}: delete it and build again"

disk_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
boot_start_mib=4 boot_mib=512
root_start_mib=$((boot_start_mib + boot_mib)) root_mib=$((size_mib - boot_start_mib - boot_mib))
# As Raspberry Pi OS writes it: partitions by PARTUUID, the boot partition at /boot/firmware.
mkdir -p "$root/boot/firmware"
cat >"$root/etc/fstab" <<EOF
proc            /proc           proc    defaults          0       0
PARTUUID=$disk_id-01  /boot/firmware  vfat    defaults          0       2
PARTUUID=$disk_id-02  /               ext4    defaults,noatime  0       1
EOF
if [[ -n $test_console ]]; then
  say "adding the test console (root commands from the host over virtio-serial $TEST_CONSOLE_PORT): a test image"
  cat >"$root/usr/local/sbin/test-console" <<EOF
#!/bin/bash
# The test harness's command channel (images/mkimage.sh --test-console; test images only): runs
# what images/guest.sh exec sends on the virtio-serial port $TEST_CONSOLE_PORT, as root.
# In: "<id> <timeout s> <base64 script>" per line. Out: "<id> <exit status> <base64 output>".
dev=/dev/virtio-ports/$TEST_CONSOLE_PORT
EOF
  cat >>"$root/usr/local/sbin/test-console" <<'EOF'
until [[ -e $dev ]]; do sleep 1; done
exec 3<>"$dev"
while true; do
  # A read at end of file means no host is connected: the port reads as empty until one is.
  if ! read -r id limit script <&3; then sleep 1; continue; fi
  [[ $id =~ ^[0-9A-Za-z]+$ && $limit =~ ^[0-9]+$ ]] || continue
  printf '%s' "$script" | base64 -d >/run/test-console.sh 2>/dev/null
  timeout -k 5 "$limit" bash /run/test-console.sh </dev/null >/run/test-console.out 2>&1
  printf '%s %s %s\n' "$id" "$?" "$(base64 -w0 </run/test-console.out)" >&3
done
EOF
  chmod 755 "$root/usr/local/sbin/test-console"
  cat >"$root/etc/systemd/system/test-console.service" <<EOF
[Unit]
Description=Test harness command channel (virtio-serial $TEST_CONSOLE_PORT; test images only)

[Service]
ExecStart=/usr/local/sbin/test-console
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
  mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
  ln -sf /etc/systemd/system/test-console.service "$root/etc/systemd/system/multi-user.target.wants/test-console.service"
fi

# Labelled bootfs and rootfs, as Raspberry Pi OS labels them (mkfs.fat warns about the lowercase).
if ! mkfs.vfat -F 32 -n bootfs -i "$disk_id" -C "$work/boot.vfat" $((boot_mib * 1024)) >"$work/mkfs.out" 2>&1; then
  cat "$work/mkfs.out" >&2
  die "mkfs.vfat failed"
fi
mcopy -i "$work/boot.vfat" "$kernel" ::/vmlinuz
mcopy -i "$work/boot.vfat" "$initrd" ::/initrd.img
truncate -s "${root_mib}M" "$work/root.ext4"
mkfs.ext4 -q -L rootfs -d "$root" "$work/root.ext4"

truncate -s "${size_mib}M" "$out.part"
sfdisk -q "$out.part" <<EOF
label: dos
label-id: 0x$disk_id
unit: sectors

start=$((boot_start_mib * 2048)), size=$((boot_mib * 2048)), type=c
start=$((root_start_mib * 2048)), size=$((root_mib * 2048)), type=83
EOF
dd if="$work/boot.vfat" of="$out.part" bs=1M seek="$boot_start_mib" conv=notrunc,sparse status=none
dd if="$work/root.ext4" of="$out.part" bs=1M seek="$root_start_mib" conv=notrunc,sparse status=none
mv "$out.part" "$out"
say "wrote $out ($arch, ${size_mib} MiB, kernel ${kernel##*/}, root PARTUUID=$disk_id-02${test_console:+, test console}) in $((SECONDS - t0)) s"
