#!/usr/bin/env bash
# Tier 3: boot the real guest kernel + initrd with ironclad-vmm on a host with hardware
# virtualization, check the agent's ready line and its health over hybrid vsock, print the timings.
#
# Runs in one call on a bare machine. It uses prebuilt artifacts when they are there (the device
# tool carries them: target/release/ironclad-vmm, target/release/ironclad-boot, target/guest/vmlinux,
# target/guest/initrd.img) and builds what is missing when cargo (and, for the kernel,
# linux-source-6.12) is available.
#
# Exit codes: 0 all boots passed; 1 a boot failed; 2 this host cannot run tier 3 (reported why).
set -uo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-5}
# release (prebuilt artifacts carried to a device machine) or debug (the nested tier's L1).
PROFILE=${IRONCLAD_PROFILE:-release}
echo "== host"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "cores: $(nproc), kernel: $(uname -r)"
virt_env=$( (systemd-detect-virt 2>/dev/null || true) | head -1)
echo "runs in: ${virt_env:-unknown}$([ -f /.dockerenv ] && echo ', a docker container')"
# A container may have the kvm module loaded on its host but no device node: make one from sysfs.
if [ ! -e /dev/kvm ]; then
    modprobe kvm_intel 2>/dev/null || modprobe kvm_amd 2>/dev/null || true
    if [ -r /sys/class/misc/kvm/dev ]; then
        IFS=: read -r major minor </sys/class/misc/kvm/dev
        mknod /dev/kvm c "$major" "$minor" 2>/dev/null && echo "made /dev/kvm from sysfs ($major:$minor)"
    fi
fi
echo "kvm module: $( [ -d /sys/module/kvm ] && echo loaded || echo absent)"
kvm=no
if [ -e /dev/kvm ] && exec 3<>/dev/kvm 2>/dev/null; then kvm=yes; exec 3>&-; fi
virt=$(grep -m1 -ow -E 'vmx|svm' /proc/cpuinfo || true)
echo "/dev/kvm opens: $kvm"
echo "hardware virtualization flag: ${virt:-none}"
if [ "$kvm" != yes ] || [ -z "$virt" ]; then
    echo "RESULT: CANNOT RUN (tier 3 needs /dev/kvm and vmx/svm; this host has kvm=$kvm, flag=${virt:-none})"
    exit 2
fi

need_build=()
for f in "target/$PROFILE/ironclad-vmm" "target/$PROFILE/ironclad-boot"; do [ -x "$f" ] || need_build+=("$f"); done
if [ "${#need_build[@]}" -gt 0 ]; then
    if command -v cargo >/dev/null; then
        echo "== building ${need_build[*]}"
        cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" -p ironclad-vmm -p ironclad-tests \
            || { echo "RESULT: FAIL (build)"; exit 1; }
    else
        echo "RESULT: CANNOT RUN (missing ${need_build[*]} and no cargo to build them)"
        exit 2
    fi
fi
if [ ! -f target/guest/vmlinux ] || [ ! -f target/guest/initrd.img ]; then
    if command -v cargo >/dev/null && [ -f /usr/src/linux-source-6.12.tar.xz ]; then
        echo "== building the guest"
        make guest || { echo "RESULT: FAIL (guest build)"; exit 1; }
    else
        echo "RESULT: CANNOT RUN (no target/guest/vmlinux + initrd.img, and nothing to build them with)"
        exit 2
    fi
fi

echo "== ironclad-vmm booting the guest ($RUNS runs)"
export PATH="$PWD/target/$PROFILE:$PATH" IRONCLAD_GUEST_DIR="$PWD/target/guest"
failures=0
for i in $(seq 1 "$RUNS"); do
    echo "-- run $i"
    if ! timeout 120 "target/$PROFILE/ironclad-boot" --hypervisor ironclad; then
        failures=$((failures + 1))
    fi
done
if [ "$failures" -eq 0 ]; then
    echo "RESULT: PASS ($RUNS/$RUNS boots reached the agent's ready line and answered the health check)"
    exit 0
fi
echo "RESULT: FAIL ($failures of $RUNS runs failed)"
exit 1
