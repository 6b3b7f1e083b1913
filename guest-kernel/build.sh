#!/usr/bin/env bash
# Builds the ironclad guest kernel from Debian's linux-source-6.12 package:
# allnoconfig + config-fragment, producing vmlinux (ELF) and bzImage.
# The result is cached outside the work tree under $IRONCLAD_CACHE/kernel/<key>, where <key> is the
# sha256 of the fragment, this script and the source package version, so a second build is instant.
# Prints the cache directory holding vmlinux and bzImage as the last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${IRONCLAD_CACHE:-/var/cache/ironclad}
source_pkg=linux-source-6.12
tarball=/usr/src/linux-source-6.12.tar.xz

log() { echo "guest-kernel: $*" >&2; }

if ! version=$(dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null) || [ -z "$version" ] || [ ! -f "$tarball" ]; then
    log "missing $source_pkg: install it with 'apt-get install $source_pkg' (or run 'make prereqs')"
    exit 1
fi

key=$( { cat "$here/config-fragment" "$here/build.sh"; echo "$source_pkg=$version"; } | sha256sum | cut -c1-16)
out="$cache_root/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    log "cache hit: reusing $out (key $key, $source_pkg $version)"
    echo "$out"
    exit 0
fi

log "cache miss: building $source_pkg $version into $out (key $key)"
work="$cache_root/kernel-build/$key"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

tar -xf "$tarball" -C "$work"
src="$work/linux-source-6.12"

make -C "$src" -s ARCH=x86_64 KCONFIG_ALLCONFIG="$here/config-fragment" allnoconfig >&2

# Kconfig silently drops symbols whose dependencies are not met: fail loudly instead.
missing=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    if ! grep -qxF "$line" "$src/.config"; then
        log "fragment line did not take effect: $line"
        missing=1
    fi
done < "$here/config-fragment"
[ "$missing" = 0 ] || { log "config-fragment does not apply cleanly to $source_pkg $version"; exit 1; }

make -C "$src" -s ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2

stage="$out.tmp.$$"
rm -rf "$stage"
mkdir -p "$stage"
cp "$src/vmlinux" "$stage/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$src/.config" "$stage/config"
echo "$(( $(date +%s) - start ))" > "$stage/build-seconds"
echo "$source_pkg=$version" > "$stage/source"
rm -rf "$out"
mv "$stage" "$out"
log "built in $(cat "$out/build-seconds") s: $(stat -c %s "$out/bzImage") bytes bzImage, $(stat -c %s "$out/vmlinux") bytes vmlinux"
echo "$out"
