#!/usr/bin/env bash
# Bakes Lichen into a flashable OS image (Raspberry Pi OS, or a Debian image for ARM boards) so
# that a board boots straight into Lichen with its settings, without mounting anything and without
# root loop devices: the ext4 root is written with debugfs, the FAT boot partition with mtools.
#
#   images/bake.sh --image IN.img --deb lichen_X_arm64.deb --config lichen.toml
#                  [--ca-cert ca.crt --bootstrap-token-file FILE] [--kubeconfig FILE]
#                  [--upgrade-keys cosign.pub] [--out OUT.img | --in-place] [--lichen-host PATH]
#
# What it does (images/README.md has the reasons):
# - installs the package's files into the root file system, owned by root with the package's
#   modes, registers the package with the image's dpkg, and enables lichen.service and
#   lichen-firstboot.service;
# - puts lichen.toml (and lichen-kubeconfig.yaml, lichen-ca.crt, lichen-upgrade-keys.pub,
#   lichen-bootstrap-token) on the
#   boot partition, where the first boot validates them, moves them into /etc/lichen (the token
#   into /var/lib/lichen) and deletes them from the card's FAT partition.
#
# It refuses an image without a partition table, a FAT or an ext4 root with systemd, a package for
# another architecture or a newer glibc than the image has, a config `lichen check` rejects, a CA
# file without a PEM certificate and a token file without a bootstrap token (never shown).
# The check runs with --lichen-host PATH, else the package's own binary if this machine can run
# it, else a `lichen` on PATH; with none of them it says the check was skipped.
# Needs: sfdisk (fdisk), jq, mtools, debugfs and e2fsck (e2fsprogs), dpkg-deb, readelf (binutils).
set -euo pipefail
export LC_ALL=C MTOOLS_SKIP_CHECK=1

die() { echo "images/bake.sh: $*" >&2; exit 1; }
say() { echo "bake: $*"; }
usage() { sed -n '6,8p' "$0" | sed 's/^# *//' >&2; exit 2; }

# toml_value TABLE KEY FILE: the string value of KEY in [TABLE] of FILE ('' for the top level), or
# nothing. A line-by-line reading, enough for warnings: [TABLE] sections and TABLE.KEY lines at the
# top level, not inline tables.
toml_value() {
  awk -v t="$1" -v k="$2" '
    /^[[:space:]]*\[/ { s = $0; sub(/^[[:space:]]*\[[[:space:]]*/, "", s); sub(/[[:space:]]*\].*$/, "", s); table = s; next }
    !/=/ { next }
    { key = $0; sub(/[[:space:]]*=.*$/, "", key); sub(/^[[:space:]]*/, "", key) }
    (table == t && key == k) || (table == "" && t != "" && key == t "." k) {
      v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); sub(/[[:space:]]*(#.*)?$/, "", v)
      gsub(/^["\x27]|["\x27]$/, "", v); print v; exit
    }' "$3"
}

# pem_problem FILE BLOCK NONE KEY: silent if FILE holds at least one PEM BLOCK block with base64
# inside and no private key; else prints KEY (a private key is there) or NONE (no such block).
pem_problem() {
  awk -v block="$2" -v none="$3" -v keymsg="$4" '
    { sub(/\r$/, "") }
    /^-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----$/ { key = 1 }
    $0 == "-----BEGIN " block "-----" { if (!inside) { inside = 1; body = 0; bad = 0 }; next }
    $0 == "-----END " block "-----" { if (inside && body && !bad) found++; inside = 0; next }
    inside && $0 == "" { next }
    inside { if ($0 ~ /^[A-Za-z0-9+\/=]+$/) body++; else bad = 1 }
    END {
      if (key) print keymsg
      else if (!found) print none
    }' "$1"
}

# ca_problem FILE: silent if FILE holds a cluster CA certificate (and no private key); else why not.
ca_problem() {
  pem_problem "$1" CERTIFICATE "it holds no PEM certificate (no -----BEGIN CERTIFICATE----- block with base64 inside): give the cluster CA, /etc/kubernetes/pki/ca.crt on a kubeadm control plane" \
    "it holds a private key: give only the cluster CA certificate, and never put a CA key on a board"
}

# pubkey_problem FILE: silent if FILE holds a PEM public key (and no private key); else why not.
pubkey_problem() {
  pem_problem "$1" "PUBLIC KEY" "it holds no PEM public key (no -----BEGIN PUBLIC KEY----- block with base64 inside): give cosign.pub, or what openssl ec -pubout writes" \
    "it holds a private key: give only the public key (cosign.pub); the signing key never goes on a board"
}

# read_token FILE: sets token to FILE's bootstrap token (one line; surrounding blanks and a Windows
# line end are ignored), or why to the reason it is not one. Never prints the token.
token='' why=''
read_token() {
  local size t
  token='' why=''
  size=$(wc -c <"$1")
  if ((size > 256)); then
    why="it is $size bytes long, too long for a bootstrap token"
    return
  fi
  t=$(tr -d '\r' <"$1" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d')
  if [[ $t == *$'\n'* ]]; then
    why="it has more than one line; it must hold one bootstrap token"
  elif [[ $t =~ ^[a-z0-9]{6}\.[a-z0-9]{16}$ ]]; then
    token=$t
  else
    why="it is not of the form <id>.<secret> (6 and 16 characters of a-z and 0-9) that \`kubeadm token create\` prints"
  fi
}

image='' deb='' config='' kubeconfig='' out='' in_place='' lichen_host='' ca_cert='' token_file='' upgrade_keys=''
while (($#)); do
  case $1 in
    --image) image=${2:-}; shift 2 || usage ;;
    --deb) deb=${2:-}; shift 2 || usage ;;
    --config) config=${2:-}; shift 2 || usage ;;
    --kubeconfig) kubeconfig=${2:-}; shift 2 || usage ;;
    --ca-cert) ca_cert=${2:-}; shift 2 || usage ;;
    --upgrade-keys) upgrade_keys=${2:-}; shift 2 || usage ;;
    --bootstrap-token-file) token_file=${2:-}; shift 2 || usage ;;
    --out) out=${2:-}; shift 2 || usage ;;
    --in-place) in_place=yes; shift ;;
    --lichen-host) lichen_host=${2:-}; shift 2 || usage ;;
    -h | --help) usage ;;
    *) echo "images/bake.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $image && -n $deb && -n $config ]] || usage
[[ -z $in_place || -z $out ]] || die "give --out or --in-place, not both"

missing=()
for t in sfdisk:fdisk jq:jq mcopy:mtools debugfs:e2fsprogs e2fsck:e2fsprogs dpkg-deb:dpkg readelf:binutils; do
  command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
((${#missing[@]} == 0)) || die "missing tools: apt-get install $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"

[[ -f $image ]] || die "$image: no such image file"
[[ -f $deb ]] || die "$deb: no such package (build one with cross/deb.sh)"
[[ -f $config ]] || die "$config: no such config file"
[[ -z $kubeconfig || -f $kubeconfig ]] || die "$kubeconfig: no such kubeconfig file"
[[ -z $ca_cert || -f $ca_cert ]] || die "$ca_cert: no such CA certificate file"
[[ -z $token_file || -f $token_file ]] || die "$token_file: no such bootstrap token file"
case $(od -An -tx1 -N6 "$image" | tr -d ' \n') in
  fd377a585a00) die "$image is xz-compressed: run \`unxz -k $image\` and bake the .img" ;;
  1f8b*) die "$image is gzip-compressed: run \`gunzip -k $image\` and bake the .img" ;;
  504b0304*) die "$image is a zip archive: unzip it and bake the .img inside" ;;
esac

stage=$(mktemp -d "${TMPDIR:-/tmp}/lichen-bake.XXXXXX")
created_out=''
cleanup() {
  rm -rf "$stage"
  # A half-baked copy must not be mistaken for a good one.
  if [[ -n $created_out ]]; then rm -f "$created_out"; fi
}
trap cleanup EXIT
# debugfs takes paths as words; the staging paths must not split.
[[ $stage != *[[:space:]]* ]] || die "TMPDIR must not contain spaces ($stage)"

# --- the package -------------------------------------------------------------------------------
[[ $(dpkg-deb -f "$deb" Package 2>/dev/null) == lichen ]] || die "$deb is not a lichen package"
deb_arch=$(dpkg-deb -f "$deb" Architecture)
deb_version=$(dpkg-deb -f "$deb" Version)
need_glibc=$(dpkg-deb -f "$deb" Depends | sed -n 's/.*libc6 (>= \([^)]*\)).*/\1/p')
dpkg-deb -x "$deb" "$stage/root"
dpkg-deb -e "$deb" "$stage/DEBIAN"

# --- the config --------------------------------------------------------------------------------
validator='' validator_what=''
if [[ -n $lichen_host ]]; then
  [[ -x $lichen_host ]] || die "--lichen-host $lichen_host is not an executable"
  validator=$lichen_host validator_what="$lichen_host (--lichen-host)"
elif [[ $(dpkg --print-architecture 2>/dev/null) == "$deb_arch" ]]; then
  validator=$stage/root/usr/bin/lichen validator_what="the package's own lichen $deb_version"
elif command -v lichen >/dev/null; then
  validator=$(command -v lichen) validator_what="$(command -v lichen) on PATH"
fi
if [[ -n $validator ]]; then
  # A scratch state directory and no static pods: this judges the file alone, as the board will.
  if ! "$validator" check --config "$config" --state-dir "$stage/check/state" \
    --static-pod-dir "$stage/check/no-pods" >"$stage/check.out" 2>&1; then
    cat "$stage/check.out" >&2
    die "$config is rejected by \`lichen check\` ($validator_what): fix it and bake again"
  fi
  say "config $config passed \`lichen check\` ($validator_what)"
else
  say "config validation skipped: no lichen runs here (pass --lichen-host PATH); the board checks it at first boot"
fi
# The warnings below read the config line by line; relative paths in it are relative to /etc/lichen.
if [[ -n $kubeconfig ]]; then
  named=$(toml_value '' kubeconfig "$config")
  if [[ $named != /etc/lichen/kubeconfig && $named != kubeconfig ]]; then
    say "WARNING: --kubeconfig is installed as /etc/lichen/kubeconfig, but $config says kubeconfig = \"$named\";" \
      "add kubeconfig = \"/etc/lichen/kubeconfig\" or the node stays standalone"
  fi
fi
if [[ -n $ca_cert ]]; then
  why=$(ca_problem "$ca_cert")
  [[ -z $why ]] || die "$ca_cert is not a cluster CA certificate: $why"
  named=$(toml_value join ca_cert "$config")
  if [[ $named != /etc/lichen/ca.crt && $named != ca.crt ]]; then
    say "WARNING: --ca-cert is installed as /etc/lichen/ca.crt, but $config's [join] says ca_cert = \"$named\";" \
      "add ca_cert = \"/etc/lichen/ca.crt\" to [join] or the join does not use it"
  fi
fi
if [[ -n $upgrade_keys ]]; then
  why=$(pubkey_problem "$upgrade_keys")
  [[ -z $why ]] || die "$upgrade_keys is not a file of upgrade signing public keys: $why"
  if ! grep -Eq '^[[:space:]]*(upgrade\.)?trusted_keys[[:space:]]*=.*/etc/lichen/upgrade-keys\.pub' "$config"; then
    say "WARNING: --upgrade-keys is installed as /etc/lichen/upgrade-keys.pub, but $config does not name it;" \
      "add trusted_keys = [\"/etc/lichen/upgrade-keys.pub\"] to [upgrade] or remote upgrades stay off"
  fi
fi
if [[ -n $(toml_value join token "$config") ]]; then
  # Not the value: only that there is one.
  say "WARNING: $config sets [join] token inline: the token would stay in /etc/lichen/config.toml," \
    "readable by the lichen group, long after the join, and Lichen cannot delete it there;" \
    "remove it and bake with --bootstrap-token-file FILE instead"
fi
if [[ -n $token_file ]]; then
  read_token "$token_file"
  [[ -n $token ]] || die "$token_file does not hold a bootstrap token: $why (its content is not shown)"
  (umask 077 && printf '%s\n' "$token" >"$stage/bootstrap-token")
  token=''
  if [[ -z $(toml_value join server "$config") ]]; then
    say "WARNING: --bootstrap-token-file is installed as /var/lib/lichen/bootstrap-token, but $config has no" \
      "[join] server, so the node never joins with it; add [join] server = \"https://<apiserver>:6443\""
  fi
  named=$(toml_value join token_file "$config") state=$(toml_value '' state_dir "$config")
  if [[ -n $named && $named != /var/lib/lichen/bootstrap-token ]] || [[ -z $named && -n $state && $state != /var/lib/lichen ]]; then
    say "WARNING: --bootstrap-token-file is installed as /var/lib/lichen/bootstrap-token, but $config makes" \
      "Lichen read the token from ${named:-$state/bootstrap-token}; remove [join] token_file and state_dir" \
      "or the join does not find the token"
  fi
fi

# --- the image ---------------------------------------------------------------------------------
if [[ -n $in_place ]]; then
  img=$image
else
  out=${out:-${image%.img}-lichen.img}
  [[ ! -e $out ]] || die "$out exists: delete it or choose another --out"
  created_out=$out
  cp --sparse=always "$image" "$out"
  img=$out
fi

table=$(sfdisk --json "$img" 2>/dev/null) || die "$image has no partition table (is it a whole-disk image?)"
sector=$(jq -r '.partitiontable.sectorsize // 512' <<<"$table")
fat_off='' root_off='' ext_offs=()
while read -r start node; do
  [[ -n $start ]] || continue
  off=$((start * sector))
  sig=$(od -An -tx1 -j $((off + 510)) -N2 "$img" | tr -d ' \n')
  fat16=$(od -An -c -j $((off + 54)) -N5 "$img" | tr -d ' \n')
  fat32=$(od -An -c -j $((off + 82)) -N5 "$img" | tr -d ' \n')
  if [[ $sig == 55aa && ($fat32 == FAT32 || $fat16 == FAT1*) ]]; then
    [[ -n $fat_off ]] || { fat_off=$off fat_node=$node; }
  elif [[ $(od -An -tx1 -j $((off + 1080)) -N2 "$img" | tr -d ' \n') == 53ef ]]; then
    ext_offs+=("$off:$node")
  fi
done < <(jq -r '.partitiontable.partitions[] | "\(.start) \(.node)"' <<<"$table")
[[ -n $fat_off ]] || die "$image has no FAT partition for the boot files"
((${#ext_offs[@]})) || die "$image has no ext2/3/4 partition for the root file system"

# dbg OFFSET COMMAND: one read-only debugfs request on the file system at OFFSET.
dbg() { debugfs -R "$2" "$img?offset=$1" 2>/dev/null; }
# kind PATH: regular, directory, symlink or none, in the root file system.
kind() {
  local t
  t=$(debugfs -R "stat $1" "$img?offset=$root_off" 2>/dev/null | sed -n '1s/.*Type: \([a-z]*\).*/\1/p') || true
  echo "${t:-none}"
}
for e in "${ext_offs[@]}"; do
  if [[ -n $(dbg "${e%%:*}" 'stat /etc/fstab' | head -n 1) ]]; then
    root_off=${e%%:*} root_node=${e#*:}
    break
  fi
done
[[ -n $root_off ]] || die "no ext partition of $image has an /etc/fstab: no root file system found"
[[ $(kind /etc/systemd) == directory ]] || die "the root file system of $image ($root_node) has no /etc/systemd: Lichen needs a systemd image"

# Where the board mounts the FAT partition: that is where the first boot looks for the settings.
boot_dir=$(dbg "$root_off" 'cat /etc/fstab' | awk '$1 !~ /^#/ && $3 == "vfat" { print $2 }' | head -n 1)
[[ -n $boot_dir ]] || die "the image's /etc/fstab mounts no vfat partition, so the board could not read lichen.toml from it"

# The image's architecture: its dpkg's, else the ELF machine of a program it ships.
dbg "$root_off" 'cat /var/lib/dpkg/status' >"$stage/status" || true
img_arch=$(awk -v RS= '/(^|\n)Package: dpkg\n/' "$stage/status" | sed -n 's/^Architecture: //p' | head -n 1)
if [[ -z $img_arch ]]; then
  for p in /usr/bin/dash /bin/dash /usr/bin/bash /bin/bash /usr/lib/systemd/systemd /lib/systemd/systemd; do
    [[ $(kind "$p") == regular ]] || continue
    debugfs -R "dump $p $stage/elf" "$img?offset=$root_off" >/dev/null 2>&1 || continue
    case $(readelf -hW "$stage/elf" 2>/dev/null | sed -n 's/^ *Machine: *//p') in
      AArch64) img_arch=arm64 ;;
      ARM) img_arch=armhf; [[ $(readelf -hW "$stage/elf") == *hard-float* ]] || img_arch=armel ;;
      "Advanced Micro Devices X86-64") img_arch=amd64 ;;
      "Intel 80386") img_arch=i386 ;;
      *) img_arch=unknown ;;
    esac
    break
  done
fi
[[ -n $img_arch ]] || die "cannot tell the architecture of $image (no dpkg status, no /usr/bin/dash or bash)"
[[ $img_arch == "$deb_arch" ]] || die "$deb is for $deb_arch but $image is $img_arch: build the package with cross/deb.sh --arch $img_arch"
img_glibc=$(awk -v RS= -v a="$img_arch" '/(^|\n)Package: libc6\n/ && $0 ~ ("\nArchitecture: " a "\n")' "$stage/status" \
  | sed -n 's/^Version: //p' | head -n 1)
if [[ -n $need_glibc && -n $img_glibc ]]; then
  dpkg --compare-versions "$img_glibc" ge "$need_glibc" \
    || die "$deb needs glibc $need_glibc but $image has $img_glibc: use a newer image (Raspberry Pi OS bookworm or later)"
elif [[ -n $need_glibc ]]; then
  say "WARNING: the image's glibc version is unknown (no libc6 in its dpkg status); the package needs $need_glibc"
fi
say "image: $img_arch, root $root_node (ext), boot $fat_node (FAT) mounted at $boot_dir"

# --- the root file system ----------------------------------------------------------------------
cmds=$stage/debugfs.cmds
: >"$cmds"
sif() { echo "set_inode_field $1 $2 $3" >>"$cmds"; }
mkdir_img() { # mkdir_img PATH: debugfs corrupts the file system on mkdir of an existing directory.
  case $(kind "$1") in
    none) echo "mkdir $1" >>"$cmds"; sif "$1" mode 040755; sif "$1" uid 0; sif "$1" gid 0 ;;
    directory) ;;
    *) die "$1 exists in the image and is not a directory" ;;
  esac
}
put_file() { # put_file SOURCE PATH MODE
  case $(kind "$2") in
    none) ;;
    regular | symlink) echo "rm $2" >>"$cmds" ;;
    *) die "$2 exists in the image and is not a file" ;;
  esac
  echo "write $1 $2" >>"$cmds"
  sif "$2" mode "0100$3"; sif "$2" uid 0; sif "$2" gid 0
}
put_link() { # put_link PATH TARGET
  case $(kind "$1") in
    none) ;;
    regular | symlink) echo "rm $1" >>"$cmds" ;;
    *) die "$1 exists in the image and is not a symlink" ;;
  esac
  echo "symlink $1 $2" >>"$cmds"
}

conffiles=$(cat "$stage/DEBIAN/conffiles" 2>/dev/null || true)
kept=()
while read -r rel; do
  path=/${rel#./}
  src=$stage/root/${rel#./}
  if [[ -d $src && ! -L $src ]]; then
    mkdir_img "$path"
  elif [[ -L $src ]]; then
    put_link "$path" "$(readlink "$src")"
  elif grep -qxF "$path" <<<"$conffiles" && [[ $(kind "$path") != none ]]; then
    # As dpkg would: a config file already in the image is the administrator's.
    kept+=("$path")
  else
    put_file "$src" "$path" "$(stat -c %a "$src")"
  fi
done < <(cd "$stage/root" && find . -mindepth 1 | sort)

# Enabled as `systemctl enable` would, from the units' [Install] WantedBy=multi-user.target.
mkdir_img /etc/systemd/system/multi-user.target.wants
for unit in lichen.service lichen-firstboot.service; do
  put_link "/etc/systemd/system/multi-user.target.wants/$unit" "/usr/lib/systemd/system/$unit"
done
# The first-boot service looks where this image mounts its boot partition.
cat >"$stage/boot-partition.conf" <<EOF
# Written by images/bake.sh from the image's /etc/fstab: the boot partition is mounted at $boot_dir.
[Unit]
ConditionPathExists=|$boot_dir/lichen.toml
ConditionPathExistsGlob=|$boot_dir/lichen-*

[Service]
Environment=LICHEN_BOOT_DIR=$boot_dir
EOF
mkdir_img /etc/systemd/system/lichen-firstboot.service.d
put_file "$stage/boot-partition.conf" /etc/systemd/system/lichen-firstboot.service.d/boot-partition.conf 644

# Registered with dpkg as if installed, so `apt install ./lichen_<newer>.deb` upgrades it and
# `apt remove` removes it. The postinst never runs here: lichen-firstboot does its work at boot.
if [[ -s $stage/status ]]; then
  info=$stage/info
  mkdir -p "$info"
  dpkg-deb -c "$deb" | awk '{ print $6 }' | sed -e 's|^\./|/|' -e 's|/$||' -e 's|^$|/.|' -e 's|^\.$|/.|' >"$info/lichen.list"
  cp "$stage/DEBIAN/md5sums" "$info/lichen.md5sums"
  for s in conffiles postinst prerm postrm; do
    if [[ -f $stage/DEBIAN/$s ]]; then cp "$stage/DEBIAN/$s" "$info/lichen.$s"; fi
  done
  for f in $conffiles; do
    echo " $f $(md5sum <"$stage/root$f" | cut -d' ' -f1)"
  done >"$stage/conffile-sums"
  {
    awk -v RS= -v ORS='\n\n' '!/^Package: lichen\n/' "$stage/status"
    awk -v sums="$stage/conffile-sums" '
      /^Package:/ { print; print "Status: install ok installed"; next }
      /^Description:/ && (getline line < sums) > 0 {
        print "Conffiles:"; print line; while ((getline line < sums) > 0) print line
      }
      { print }' "$stage/DEBIAN/control"
    echo
  } >"$stage/status.new"
  mkdir_img /var/lib/dpkg/info
  for f in "$info"/*; do
    case $f in *.postinst | *.prerm | *.postrm) mode=755 ;; *) mode=644 ;; esac
    put_file "$f" "/var/lib/dpkg/info/${f##*/}" "$mode"
  done
  put_file "$stage/status.new" /var/lib/dpkg/status 644
fi

debugfs -w -f "$cmds" "$img?offset=$root_off" >"$stage/debugfs.out" 2>"$stage/debugfs.err" || true
# (grep -c, not `grep -v | grep -q`: under pipefail an early-exiting grep -q can fail the pipe.)
if [[ $(grep -cv '^debugfs [0-9.]* (' "$stage/debugfs.err") != 0 ]]; then
  cat "$stage/debugfs.err" >&2
  die "debugfs could not write the root file system of $img (is it full?)"
fi
# The proof that the writes left a consistent file system, and that the binary arrived whole.
if ! e2fsck -fn "$img?offset=$root_off" >"$stage/fsck.out" 2>&1; then
  cat "$stage/fsck.out" >&2
  die "e2fsck finds the root file system of $img damaged after writing"
fi
debugfs -R "dump /usr/bin/lichen $stage/lichen.back" "$img?offset=$root_off" >/dev/null 2>&1
cmp -s "$stage/lichen.back" "$stage/root/usr/bin/lichen" || die "/usr/bin/lichen in $img differs from the package's"

# --- the boot partition ------------------------------------------------------------------------
mcopy -o -i "$img@@$fat_off" "$config" ::/lichen.toml
if [[ -n $kubeconfig ]]; then mcopy -o -i "$img@@$fat_off" "$kubeconfig" ::/lichen-kubeconfig.yaml; fi
if [[ -n $ca_cert ]]; then mcopy -o -i "$img@@$fat_off" "$ca_cert" ::/lichen-ca.crt; fi
if [[ -n $upgrade_keys ]]; then mcopy -o -i "$img@@$fat_off" "$upgrade_keys" ::/lichen-upgrade-keys.pub; fi
if [[ -n $token_file ]]; then mcopy -o -i "$img@@$fat_off" "$stage/bootstrap-token" ::/lichen-bootstrap-token; fi

created_out=''
say "installed lichen $deb_version ($deb_arch) into $root_node and enabled lichen.service and lichen-firstboot.service"
for k in "${kept[@]}"; do say "kept the image's own $k"; done
boot_files=$boot_dir/lichen.toml
for f in ${kubeconfig:+lichen-kubeconfig.yaml} ${ca_cert:+lichen-ca.crt} ${upgrade_keys:+lichen-upgrade-keys.pub} \
  ${token_file:+lichen-bootstrap-token}; do
  boot_files+=", $boot_dir/$f"
done
say "$boot_files on the boot partition; the first boot moves them to /etc/lichen${token_file:+ and /var/lib/lichen}"
say "wrote $img"
