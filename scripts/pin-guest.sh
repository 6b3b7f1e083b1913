#!/usr/bin/env bash
# Writes the sha256 of the installed guest kernel and initrd into the shim's config
# (`kernel_sha256`, `initrd_sha256`), replacing earlier pins: the shim checks both before every
# boot and refuses a changed file. `make install` runs this after installing the files.
#
# usage: scripts/pin-guest.sh CONFIG KERNEL INITRD
set -euo pipefail
config=${1:?usage: pin-guest.sh CONFIG KERNEL INITRD}
kernel=${2:?usage: pin-guest.sh CONFIG KERNEL INITRD}
initrd=${3:?usage: pin-guest.sh CONFIG KERNEL INITRD}

pin() {
    local key=$1 file=$2 digest
    digest=$(sha256sum "$file" | awk '{print $1}')
    if grep -q "^$key *=" "$config"; then
        sed -i "s|^$key *=.*|$key = \"$digest\"|" "$config"
    else
        printf '%s = "%s"\n' "$key" "$digest" >>"$config"
    fi
    echo "pinned $file in $config: $key = $digest"
}
pin kernel_sha256 "$kernel"
pin initrd_sha256 "$initrd"
