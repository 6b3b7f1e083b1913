#!/usr/bin/env bash
# Installs what ironclad needs on Debian 12, idempotently: nothing is fetched when everything is there.
# Debian packages through apt; vhost-device-vsock through cargo install (pinned), into /usr/local.
set -euo pipefail

APT_PACKAGES=(
    linux-source-6.12           # the guest kernel's source
    build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils   # to build it
    qemu-system-x86             # boots the guest where KVM has no hardware virtualization
    busybox-static              # debug shell for the initrd, busybox containers in tests
    e2fsprogs erofs-utils       # mkfs.ext4 / mkfs.erofs for block images
    containerd runc             # containerd and its runc runtime, for the end-to-end tests and benchmarks
    bsdutils                    # `script`: a terminal for `ctr run -t` in the tests
    fonts-dejavu-core           # the font of ironclad-bench's PNG charts
    libseccomp-dev pkg-config   # libcontainer's seccomp support, linked statically into the agent
)
VHOST_DEVICE_VSOCK_VERSION=0.3.0

say() { echo "prereqs: $*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]}"
        say "install them with: sudo apt-get install ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

installed_vsock=$(vhost-device-vsock --version 2>/dev/null | awk '{print $2}' || true)
if [ "$installed_vsock" != "$VHOST_DEVICE_VSOCK_VERSION" ]; then
    if ! command -v cargo >/dev/null; then
        say "vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION is missing and cargo is not installed to build it"
        exit 1
    fi
    root=/usr/local
    [ -w "$root/bin" ] || root="$HOME/.cargo"
    say "installing vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION into $root/bin (about 2 minutes)"
    cargo install --quiet --locked --root "$root" --version "$VHOST_DEVICE_VSOCK_VERSION" vhost-device-vsock
fi
say "all prerequisites present"
