#!/usr/bin/env bash
# Installs what ironclad needs on Debian 12, idempotently: nothing is fetched when everything is there.
# Debian packages through apt; vhost-device-vsock and virtiofsd through cargo install (pinned), into /usr/local.
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
    kmod python3-venv file      # the nested tier: depmod for the L1 kernel's modules, virtme-ng's venv
    containernetworking-plugins iproute2   # CNI bridge + host-local for the network tests, ip netns
    libcap-ng-dev               # to build virtiofsd
    protobuf-compiler           # protoc for the CRI client (k8s-cri) of the CRI tests
)
VHOST_DEVICE_VSOCK_VERSION=0.3.0
# The Rust virtiofsd: the sandbox's shared directory (host volumes, pod containers' rootfs).
VIRTIOFSD_VERSION=1.13.2
# The nested tier (tests/nested/run.sh): Debian's kernel as the L1 guest, started by virtme-ng.
NESTED_DIR=${IRONCLAD_NESTED_DIR:-/var/lib/ironclad/nested}
VIRTME_NG_VERSION=1.42

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

# cargo_install <crate> <version> <installed version>: builds the pinned version unless it is there.
cargo_install() {
    local crate=$1 version=$2 installed=$3
    [ "$installed" = "$version" ] && return
    if ! command -v cargo >/dev/null; then
        say "$crate $version is missing and cargo is not installed to build it"
        exit 1
    fi
    local root=/usr/local
    [ -w "$root/bin" ] || root="$HOME/.cargo"
    say "installing $crate $version into $root/bin (a few minutes)"
    cargo install --quiet --locked --root "$root" --version "$version" "$crate"
}
cargo_install vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION" \
    "$(vhost-device-vsock --version 2>/dev/null | awk '{print $2}' || true)"
# Debian's QEMU ships an older C virtiofsd in /usr/lib/qemu; ours is the Rust one on PATH.
cargo_install virtiofsd "$VIRTIOFSD_VERSION" \
    "$(command -v virtiofsd >/dev/null && virtiofsd --version 2>/dev/null | awk '{print $2}' || true)"
# The L1 kernel of the nested tier: the version Debian's linux-image-amd64 points at now, downloaded
# and unpacked under $NESTED_DIR (not installed: this machine's own kernel and boot setup stay as they
# are), `current` pointing at it. Older versions are removed once a newer one is in place.
install_l1_kernel() {
    local package version
    package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$package" ]; then
        say "apt knows no linux-image-amd64: cannot fetch the nested tier's L1 kernel (run apt-get update)"
        exit 1
    fi
    version=${package#linux-image-}
    if [ -f "$NESTED_DIR/$version/boot/vmlinuz-$version" ]; then
        ln -sfn "$version" "$NESTED_DIR/current"
        return
    fi
    say "fetching $package for the nested tier's L1 guest (about 70 MB, unpacked to $NESTED_DIR/$version)"
    local work
    work=$(mktemp -d)
    (cd "$work" && apt-get download -q "$package" >/dev/null 2>&1) || { rm -rf "$work"; say "apt-get download $package failed"; exit 1; }
    mkdir -p "$NESTED_DIR/$version.partial"
    dpkg-deb -x "$work"/"$package"_*.deb "$NESTED_DIR/$version.partial"
    rm -rf "$work" "$NESTED_DIR/$version"
    mv "$NESTED_DIR/$version.partial" "$NESTED_DIR/$version"
    ln -sfn "$version" "$NESTED_DIR/current"
    for old in "$NESTED_DIR"/*-amd64; do
        [ "$(basename "$old")" = "$version" ] || rm -rf "$old"
    done
}

# The emulator that runs the L1 guest: QEMU from bookworm-backports (10.0 when this was written),
# unpacked under $NESTED_DIR/qemu and used by the nested tier only; the system's QEMU (bookworm's 7.2,
# which boots the guest of the end-to-end tests) stays as it is. bookworm's QEMU 7.2 left the L1
# wedged in HLT with its timer interrupt pending about once per half hour of emulated SVM
# (tests/nested/watchdog.py); docs/testing.md has the runs. apt reads backports through a private
# configuration, so this machine's sources list is not changed.
install_l1_qemu() {
    local work version
    work=$(mktemp -d)
    cat >"$work/sources.list" <<EOF
deb http://deb.debian.org/debian bookworm-backports main
EOF
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    local apt=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=- \
        -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
    if ! apt-get "${apt[@]}" update -q >/dev/null 2>&1; then
        rm -rf "$work"
        if [ -x "$NESTED_DIR/qemu/usr/bin/qemu-system-x86_64" ]; then
            say "bookworm-backports unreachable: keeping the nested tier's QEMU in $NESTED_DIR/qemu"
            return
        fi
        say "cannot read bookworm-backports: the nested tier's QEMU cannot be fetched"
        exit 1
    fi
    version=$(apt-cache "${apt[@]}" madison qemu-system-x86 | awk -F'|' '/bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}')
    if [ -z "$version" ]; then
        rm -rf "$work"
        say "bookworm-backports has no qemu-system-x86: the nested tier's QEMU cannot be fetched"
        exit 1
    fi
    if [ "$(cat "$NESTED_DIR/qemu/VERSION" 2>/dev/null)" = "$version" ]; then
        rm -rf "$work"
        return
    fi
    say "fetching QEMU $version from bookworm-backports for the nested tier (about 14 MB, to $NESTED_DIR/qemu)"
    (cd "$work" && apt-get "${apt[@]}" download -q qemu-system-x86="$version" qemu-system-common="$version" \
        qemu-system-data="$version" >/dev/null 2>&1) || { rm -rf "$work"; say "apt-get download of QEMU $version failed"; exit 1; }
    rm -rf "$NESTED_DIR/qemu.partial"
    for deb in "$work"/*.deb; do
        dpkg-deb -x "$deb" "$NESTED_DIR/qemu.partial"
    done
    rm -rf "$work"
    local missing
    missing=$(ldd "$NESTED_DIR/qemu.partial/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}' | tr '\n' ' ')
    if [ -n "$missing" ]; then
        say "the nested tier's QEMU $version needs libraries this machine lacks: $missing"
        exit 1
    fi
    echo "$version" >"$NESTED_DIR/qemu.partial/VERSION"
    rm -rf "$NESTED_DIR/qemu"
    mv "$NESTED_DIR/qemu.partial" "$NESTED_DIR/qemu"
}

# virtme-ng, pinned, in a virtual environment of its own (Debian's python3).
install_virtme_ng() {
    if [ "$("$NESTED_DIR/venv/bin/vng" --version 2>/dev/null | awk '{print $NF}')" = "$VIRTME_NG_VERSION" ]; then
        return
    fi
    say "installing virtme-ng $VIRTME_NG_VERSION into $NESTED_DIR/venv"
    rm -rf "$NESTED_DIR/venv"
    /usr/bin/python3 -m venv "$NESTED_DIR/venv"
    "$NESTED_DIR/venv/bin/pip" install --quiet --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION"
}

if mkdir -p "$NESTED_DIR" 2>/dev/null && [ -w "$NESTED_DIR" ]; then
    install_l1_kernel
    install_l1_qemu
    install_virtme_ng
else
    say "cannot write $NESTED_DIR: the nested tier's L1 kernel and virtme-ng are not installed (run as root, or set IRONCLAD_NESTED_DIR)"
    [ "${IRONCLAD_ALLOW_SKIP:-}" = 1 ] || exit 1
fi
say "all prerequisites present"
