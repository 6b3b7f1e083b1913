#!/usr/bin/env bash
# Runs inside the L1 guest of the nested tier (tests/nested/run.sh starts it): makes /dev/kvm from
# the L1 kernel's kvm_amd on QEMU's emulated SVM, then runs each named test suite against
# ironclad-vmm and records its exit status in RESULTS_DIR/<suite>.status.
#
# usage: inside.sh RESULTS_DIR SUITE=COMMAND...   (COMMAND: a command and its arguments, separated
#        by spaces; it runs from the checkout's root. `libtest EXECUTABLE ARGS...` names a cargo
#        test executable: the tests its arguments select run one at a time, each one that passes
#        is recorded in RESULTS_DIR/<suite>.passed, and the suite in a later L1 runs only the tests
#        not recorded, so a suite whose L1 the emulator wedged resumes where it stopped)
set -uo pipefail
results=${1:?usage: inside.sh RESULTS_DIR SUITE=COMMAND...}
shift
cd "$(dirname "$0")/../.."

say() { echo "nested: $*"; }

# modprobe needs the module tree virtme-ng links in; insmod with full paths is the fallback.
load_kvm_amd() {
    modprobe kvm_amd 2>/dev/null && return 0
    local dir="/lib/modules/$(uname -r)/kernel"
    for module in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm-amd.ko; do
        [ -e "$dir/$module" ] && insmod "$dir/$module" 2>/dev/null
    done
    [ -d /sys/module/kvm_amd ]
}

# The results directory is shared by L1s running at once: every file here is named by the suite.
first=${1%%=*}
if ! grep -qw svm /proc/cpuinfo; then
    say "the L1 CPU shows no svm: QEMU did not emulate AMD SVM"
    echo "no svm in the L1 CPU" >"$results/$first.setup-failed"
    exit 1
fi
if ! load_kvm_amd || [ ! -c /dev/kvm ]; then
    say "kvm_amd did not load or /dev/kvm is missing"
    echo "kvm_amd did not load" >"$results/$first.setup-failed"
    exit 1
fi
# Sandbox networking: taps, the CNI bridge and veths, and the tc pieces that join them.
for module in tun veth bridge sch_ingress cls_u32 act_mirred act_gact; do
    if ! modprobe "$module" 2>/dev/null && ! grep -qw "${module}" /proc/modules; then
        say "module $module did not load: the network tests will say what is missing"
    fi
done
say "L1 $(uname -r): $(dmesg | grep -o 'Nested Paging enabled' | head -1), /dev/kvm ready"
# From here on the console carries the suites' output; L1's kernel messages stay in its log.
dmesg --console-off

# The tests find ironclad-vmm and the shim on PATH, and write below /var/tmp and /tmp (tmpfs here).
export PATH="$PWD/target/debug:$PATH"
export IRONCLAD_GUEST_DIR="$PWD/target/guest"
# Each private containerd's log (shim logs included) comes back in the results directory.
export IRONCLAD_KEEP_LOGS="$results/containerd-logs"
mkdir -p "$IRONCLAD_KEEP_LOGS"
# Each boot takes ~10 s here and every frame crosses emulated SVM: the network leak check makes
# 5 runs in a row, not 50, and the transfer check moves 2 MiB, not 32.
export IRONCLAD_NETWORK_RUNS=5
# Everything here runs emulated and a process takes seconds to start: containerd's 5 s for a dead
# shim's `delete` is too short for it to stop the VM, so the tier gives 30 s.
export IRONCLAD_SHIM_CLEANUP_TIMEOUT=30s
export IRONCLAD_NETWORK_BLOB_MIB=2
# The event-order check runs 200 short tasks in tier 2; here each takes ~15 s, so it runs 6.
export IRONCLAD_EVENT_TASKS=6
# IRONCLAD_NESTED_PS=SECONDS: the L1's processes on the console every so often, to see where a
# suite that never reports is stuck.
if [ -n "${IRONCLAD_NESTED_PS:-}" ]; then
    (while sleep "$IRONCLAD_NESTED_PS"; do
        ps -eo pid,etimes,stat,wchan:24,args --sort=pid | grep -v ' \[' | cut -c1-200
    done) &
fi
# The tests of a cargo test executable that its arguments select (libtest's `--list`), each name on
# a line of its own; the executable's status when it cannot list them.
selected_tests() {
    local listed
    listed=$("$@" --list) || return
    sed -n 's/: test$//p' <<<"$listed"
}

# Runs the tests of `libtest EXECUTABLE ARGS...` that no earlier L1 recorded as passed, one libtest
# run each, by exact name, and records each one that passes as soon as it has (the emulator can
# wedge this L1 at any moment; a test's own status says whether it passed, where its output, which
# child processes write into too, could not). Its status: 0 when every test passed, else the last
# failure's.
run_resumable() {
    local name=$1 executable=$2
    shift 2
    local passed="$results/$name.passed"
    touch "$passed"
    local selected
    selected=$(selected_tests "$executable" "$@") || {
        local status=$?
        say "$name: $executable cannot list its tests (exit $status)"
        return "$status"
    }
    if [ -z "$selected" ]; then
        say "$name: its arguments select no test"
        return 1
    fi
    local -a remaining=()
    local test
    while IFS= read -r test; do
        grep -qxF -- "$test" "$passed" || remaining+=("$test")
    done <<<"$selected"
    local done_before
    done_before=$(wc -l <"$passed")
    [ "$done_before" -eq 0 ] || say "$name: $done_before tests passed in an earlier L1; ${#remaining[@]} to run"
    local status=0 failed=()
    for test in "${remaining[@]}"; do
        if "$executable" --test-threads=1 --exact "$test" 2>&1; then
            printf '%s\n' "$test" >>"$passed"
        else
            status=$?
            failed+=("$test")
        fi
    done
    [ "$status" -eq 0 ] || say "$name: ${#failed[@]} tests failed: ${failed[*]}"
    return "$status"
}

for suite in "$@"; do
    name=${suite%%=*}
    command=${suite#*=}
    say "== $name: $command"
    started=$(date +%s)
    # shellcheck disable=SC2086 # the command and its arguments, split on spaces on purpose
    case "$command" in
        "libtest "*) run_resumable "$name" ${command#libtest } ;;
        *) $command 2>&1 ;;
    esac
    status=$?
    say "== $name: exit $status after $(($(date +%s) - started)) s"
    echo "$status" >"$results/$name.status"
done
dmesg >"$results/$first.l1-dmesg.log"
