#!/usr/bin/env bash
# Builds the Debian package of Lichen from one `lichen` binary, with dpkg-deb alone (no cargo-deb,
# no debhelper), reproducibly: the same binary and SOURCE_DATE_EPOCH give the same bytes.
#
#   cross/deb.sh --arch arm64|armhf|amd64 --binary PATH [--out DIR] [--revision N]
#                [--compress xz|gzip|zstd|none]
#
# The cross binaries come from cross/build.sh: aarch64-unknown-linux-gnu -> arm64,
# armv7-unknown-linux-gnueabihf -> armhf. Writes DIR/lichen_<version>-<revision>_<arch>.deb (DIR
# defaults to the current directory) and prints its path. The version is the workspace's, from
# Cargo.toml. SOURCE_DATE_EPOCH defaults to the last commit's time. Needs dpkg-deb and readelf
# (binutils); a binary with a symbol table is stripped, which for arm64/armhf needs the cross
# binutils (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf) or llvm-strip.
set -euo pipefail
umask 022
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
export LC_ALL=C

die() { echo "cross/deb.sh: $*" >&2; exit 1; }
usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }

arch='' binary='' out=. revision=1 compress=xz
while (($#)); do
  case $1 in
    --arch) arch=${2:-}; shift 2 || usage ;;
    --binary) binary=${2:-}; shift 2 || usage ;;
    --out) out=${2:-}; shift 2 || usage ;;
    --revision) revision=${2:-}; shift 2 || usage ;;
    --compress) compress=${2:-}; shift 2 || usage ;;
    -h | --help) usage ;;
    *) echo "cross/deb.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $arch && -n $binary ]] || usage
case $compress in xz | gzip | zstd | none) ;; *) die "--compress $compress: use xz, gzip, zstd or none" ;; esac
[[ $revision =~ ^[0-9A-Za-z.+~]+$ ]] || die "--revision $revision: a Debian revision is letters, digits and .+~"
for tool in dpkg-deb readelf gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install dpkg binutils gzip"
done
[[ -f $binary ]] || die "$binary does not exist: build it first (cargo build, or cross/build.sh for the boards)"

# The binary must be for the architecture the package claims: dpkg would install an arm64 package
# holding an x86-64 binary without a word, and the board would only say "Exec format error".
header=$(readelf -hW "$binary" 2>/dev/null) || die "$binary is not an ELF executable"
machine=$(sed -n 's/^ *Machine: *//p' <<<"$header")
flags=$(sed -n 's/^ *Flags: *//p' <<<"$header")
case $arch in
  arm64) want=AArch64 strip_tool=aarch64-linux-gnu-strip ;;
  armhf) want=ARM strip_tool=arm-linux-gnueabihf-strip
    [[ $flags == *hard-float* ]] || [[ $machine != ARM ]] || die "$binary is soft-float ARM; armhf needs armv7-unknown-linux-gnueabihf" ;;
  amd64) want="Advanced Micro Devices X86-64" strip_tool=x86_64-linux-gnu-strip ;;
  *) die "--arch $arch: use arm64, armhf or amd64" ;;
esac
[[ $machine == "$want" ]] || die "$binary is built for $machine, not $arch: pass the binary of that target (cross/README.md)"

version=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
  p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' "$repo/Cargo.toml")
[[ -n $version ]] || die "no version under [workspace.package] in $repo/Cargo.toml"
# A binary this machine can run must say it is that version: a stale binary would otherwise ship
# under a new version number.
if [[ $(dpkg --print-architecture 2>/dev/null) == "$arch" ]]; then
  said=$("$binary" version 2>/dev/null | awk 'NR == 1 && $1 == "lichen" { print $2 }') || true
  [[ $said == "$version" ]] || die "$binary says it is lichen ${said:-(no version)}, but Cargo.toml says $version: rebuild it"
fi
debversion=$version-$revision

if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
  SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null) \
    || die "SOURCE_DATE_EPOCH is not set and $repo is not a git checkout: set it (seconds since 1970)"
fi
export SOURCE_DATE_EPOCH

# Depends from the binary itself: the newest glibc symbol version it references, and the shared
# libraries it needs (a static musl build needs none); adduser for the postinst's fallback where
# systemd-sysusers is missing.
needed=$(readelf -dW "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
glibc=$(readelf -VW "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
depends=()
[[ -n $glibc ]] && depends+=("libc6 (>= $glibc)")
for lib in $needed; do
  case $lib in
    libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*) ;;
    libgcc_s.so.1) depends+=(libgcc-s1) ;;
    *) die "$binary needs $lib, which cross/deb.sh does not know the package of: add it to Depends here" ;;
  esac
done
if [[ -n $needed && -z $glibc ]]; then
  die "$binary links shared libraries but references no GLIBC_ symbol version: is it a glibc build?"
fi
depends+=(adduser)

stage=$(mktemp -d "${TMPDIR:-/tmp}/lichen-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root

put() { # put MODE SOURCE DEST
  install -D -m "$1" "$2" "$root$3"
}
put 0755 "$binary" /usr/bin/lichen
# Release builds are stripped by cargo (`strip = true`); debug builds are stripped here, as dh_strip
# would. (The section table is read into a variable first: `readelf | grep -q` under pipefail fails
# whenever grep exits before readelf has written its last block, and the binary went unstripped.)
sections=$(readelf -SW "$root/usr/bin/lichen") || die "readelf could not read $binary"
if [[ $sections == *' .symtab '* || $sections == *' .debug_'* ]]; then
  tool=$strip_tool
  command -v "$tool" >/dev/null || tool=llvm-strip
  command -v "$tool" >/dev/null \
    || die "$binary has symbols and neither $strip_tool nor llvm-strip is installed to strip it"
  "$tool" --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/lichen"
fi
put 0644 "$repo/systemd/lichen.service" /usr/lib/systemd/system/lichen.service
put 0644 "$repo/systemd/lichen-firstboot.service" /usr/lib/systemd/system/lichen-firstboot.service
put 0755 "$repo/systemd/lichen-firstboot" /usr/lib/lichen/firstboot
put 0644 "$repo/systemd/lichen.sysusers" /usr/lib/sysusers.d/lichen.conf
put 0644 "$repo/systemd/config.toml" /etc/lichen/config.toml
install -d -m 0755 "$root/etc/lichen/pods"
put 0644 "$here/debian/copyright" /usr/share/doc/lichen/copyright
put 0644 "$here/debian/lintian-overrides" /usr/share/lintian/overrides/lichen

maintainer=${DEB_MAINTAINER:-Lichen maintainers <maintainers@lichen.dev>}
{
  echo "lichen ($debversion) unstable; urgency=medium"
  echo
  echo "  * Lichen $version, built from https://github.com/lichen-edge/lichen;"
  echo "    the changes are in its commit history."
  echo
  echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$stage/changelog.Debian.gz"
put 0644 "$stage/changelog.Debian.gz" /usr/share/doc/lichen/changelog.Debian.gz

# Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and 1 per directory.
installed_size=$(find "$root" -mindepth 1 -printf '%y %s\n' \
  | awk '$1 == "f" { n += int(($2 + 1023) / 1024) } $1 != "f" { n += 1 } END { print n }')

mkdir -m 0755 "$root/DEBIAN"
dep_line=$(IFS=,; echo "${depends[*]}")
dep_line=${dep_line//,/, }
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$installed_size/" \
  -e "s|@MAINTAINER@|$maintainer|" -e "s/@DEPENDS@/$dep_line/" "$here/debian/control" \
  | { if [[ -z $dep_line ]]; then grep -v '^Depends: $'; else cat; fi; } >"$root/DEBIAN/control"
echo /etc/lichen/config.toml >"$root/DEBIAN/conffiles"
(cd "$root" && find usr -type f | sort | xargs md5sum) >"$root/DEBIAN/md5sums"
for script in postinst prerm postrm; do
  install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
chmod 0644 "$root"/DEBIAN/{control,conffiles,md5sums}

# Reproducible: fixed times, and dpkg-deb writes sorted tar members owned by root:root.
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb=$out/lichen_${debversion}_$arch.deb
dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
echo "$deb"
