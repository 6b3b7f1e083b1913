#!/usr/bin/env bash
# The nested tier: ironclad-vmm boots the real guest on this machine. QEMU's TCG emulates AMD SVM
# with nested paging (-cpu max), so an L1 guest (Debian's kernel, started by virtme-ng over this
# machine's own root, read-only with a writable overlay) loads kvm_amd and offers a real /dev/kvm;
# inside it the boot test, the agent's guest tests, the containerd and CRI end-to-end suites, the
# hostile-guest suite, the pool suite and tests/device/kvm-e2e.sh run with ironclad-vmm, which `auto` picks there
# because the L1 CPU shows svm. Each suite's output streams here; any failure fails this script.
#
# usage: tests/nested/run.sh [SUITE...]   (default: boot containers containerd cri hostile pool kvm-e2e; `bench`
#        runs `ironclad-bench nested` there and writes its section into docs/benchmarks.md)
# Needs what scripts/install-prereqs.sh installs (QEMU, kmod, the L1 kernel and virtme-ng under
# $IRONCLAD_NESTED_DIR) and a built workspace and guest (make guest). Missing pieces fail the
# run, naming them, unless IRONCLAD_ALLOW_SKIP=1.
set -euo pipefail
cd "$(dirname "$0")/../.."

NESTED_DIR=${IRONCLAD_NESTED_DIR:-/var/lib/ironclad/nested}
L1_MEMORY=${IRONCLAD_NESTED_MEMORY:-4G}
L1_CPUS=${IRONCLAD_NESTED_CPUS:-1}
# A stuck L1 must not hold CI forever: each L1 gets this long (the longest suite takes ~15 minutes).
TIMEOUT=${IRONCLAD_NESTED_TIMEOUT:-1800}
# The emulator that runs L1: backports' QEMU, which install-prereqs.sh unpacks under $NESTED_DIR/qemu
# (bookworm's 7.2 wedged the L1 now and then, see tests/nested/watchdog.py), with its own firmware.
QEMU=${IRONCLAD_NESTED_QEMU:-$NESTED_DIR/qemu/usr/bin/qemu-system-x86_64}
QEMU_DATA=${IRONCLAD_NESTED_QEMU_DATA:-$NESTED_DIR/qemu/usr/share/qemu}
RESULTS="$PWD/target/nested"
suites=("$@")
[ "${#suites[@]}" -gt 0 ] || suites=(boot containers containerd cri hostile pool kvm-e2e)

say() { echo "nested: $*" >&2; }

missing=()
[ -x "$QEMU" ] || missing+=("the L1's QEMU at $QEMU (scripts/install-prereqs.sh)")
kernel=$(ls "$NESTED_DIR"/current/boot/vmlinuz-* 2>/dev/null | head -1 || true)
[ -n "$kernel" ] || missing+=("the L1 kernel under $NESTED_DIR/current (scripts/install-prereqs.sh)")
[ -x "$NESTED_DIR/venv/bin/vng" ] || missing+=("virtme-ng in $NESTED_DIR/venv (scripts/install-prereqs.sh)")
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || missing+=("depmod (apt-get install kmod)")
[ -f target/guest/vmlinux ] && [ -f target/guest/initrd.img ] || missing+=("target/guest (make guest)")
if [ "$(id -u)" -ne 0 ]; then missing+=("root (the containerd suite and kvm_amd need it)"); fi
if [ "${#missing[@]}" -gt 0 ]; then
    reason=$(IFS=', '; echo "${missing[*]}")
    if [ "${IRONCLAD_ALLOW_SKIP:-}" = 1 ]; then
        say "SKIPPED the nested tier: needs $reason"
        [ -z "${IRONCLAD_SKIP_LOG:-}" ] || echo "nested tier: needs $reason" >>"$IRONCLAD_SKIP_LOG"
        exit 0
    fi
    say "cannot run the nested tier: it needs $reason (set IRONCLAD_ALLOW_SKIP=1 to skip it)"
    exit 1
fi

# The test executables, as cargo built them (the same ones `cargo test` runs here).
declare -A executables
while read -r name path; do
    executables[$name]=$path
done < <(cargo test --locked -p ironclad-tests --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["profile"]["test"]:
        print(message["target"]["name"], message["executable"])
')
cargo build --locked -p ironclad-vmm -p ironclad-shim -p ironclad-jailer -p ironclad-pool -p ironclad-tests --bins
if printf '%s\n' "${suites[@]}" | grep -qx bench; then
    cargo build --release --locked -p ironclad-vmm -p ironclad-shim -p ironclad-jailer -p ironclad-bench
fi

commands=()
for suite in "${suites[@]}"; do
    case "$suite" in
        boot | containers | containerd | cri | hostile | pool)
            [ -n "${executables[$suite]:-}" ] || { say "no test executable for $suite"; exit 1; }
            extra=${IRONCLAD_NESTED_TEST_ARGS:-}
            # IRONCLAD_NESTED_TEST_ARGS: more arguments for the test executables (a name filter).
            # IRONCLAD_NESTED_SKIP: names of containerd tests to leave out (default: none).
            skip=""
            for name in ${IRONCLAD_NESTED_SKIP:-}; do skip+="--skip $name "; done
            if [ "$suite" = containerd ] && [ -z "${IRONCLAD_NESTED_TEST_ARGS:-}" ]; then
                # The longest suite runs in three L1s: the emulator's wedges come minutes into an
                # L1's life, and each lane of L1s runs one after another.
                second=(memory_limits host_directories echo_exit memory_the_guest_frees)
                third=(stdin_tty every_task_start ctr_run_cni)
                commands+=("containerd=libtest ${executables[$suite]} --test-threads=1 $skip $(printf -- '--skip %s ' "${second[@]}" "${third[@]}")")
                commands+=("containerd-2=libtest ${executables[$suite]} --test-threads=1 $skip ${second[*]}")
                commands+=("containerd-3=libtest ${executables[$suite]} --test-threads=1 $skip ${third[*]}")
            elif [ "$suite" = containerd ]; then
                commands+=("$suite=libtest ${executables[$suite]} --test-threads=1 $skip $extra")
            else
                commands+=("$suite=libtest ${executables[$suite]} --test-threads=1 $extra")
            fi
            ;;
        kvm-e2e) commands+=("kvm-e2e=env IRONCLAD_PROFILE=debug RUNS=2 bash tests/device/kvm-e2e.sh") ;;
        bench)
            commands+=("bench=target/release/ironclad-bench nested --report $RESULTS/benchmarks.md --json $RESULTS/benchmarks-nested.json")
            ;;
        *) say "unknown suite $suite (boot, containers, containerd, cri, hostile, pool, kvm-e2e, bench)"; exit 1 ;;
    esac
done

rm -rf "$RESULTS"
mkdir -p "$RESULTS"
# The benchmark writes its section into a copy of the report (the checkout is read-only in L1).
cp docs/benchmarks.md "$RESULTS/benchmarks.md"
started=$(date +%s)

# Starts an L1 for one suite (SUITE=COMMAND) and waits for it. virtme-ng's console fallback
# prints the script's output on the console and loses its exit status: the suite's status comes
# back through the writable results directory instead. The console goes to a file of the suite's,
# followed from here with the suite's name before each line: QEMU never waits on a pipe's reader.
# Its stdin is /dev/null: a QEMU in a background process group that reads a terminal is stopped.
# tests/nested/watchdog.py stops an L1 that the emulator left wedged (see there).
run_l1() {
    local suite=${1%%=*}
    local monitor="$RESULTS/$suite.monitor.sock" console="$RESULTS/$suite.console.log"
    say "L1: $(basename "$kernel") under QEMU TCG with -cpu max, $L1_CPUS vCPUs, $L1_MEMORY; suite: $suite"
    rm -f "$monitor" "$RESULTS/$suite.wedged"
    timeout --kill-after=30 "$TIMEOUT" \
        env PATH="$NESTED_DIR/venv/bin:$PATH" QEMU_MODULE_DIR="${QEMU%/bin/*}/lib/x86_64-linux-gnu/qemu" vng --verbose --run "$kernel" --disable-kvm --force-9p \
        --cpus "$L1_CPUS" --memory "$L1_MEMORY" --overlay-rwdir=/opt \
        --qemu "$QEMU" --qemu-opts="${QEMU_DATA:+-L $QEMU_DATA }-cpu max -monitor unix:$monitor,server=on,wait=off" --rwdir="$RESULTS" \
        --exec "IRONCLAD_EXPECT_BACKEND=ironclad ${IRONCLAD_NESTED_PS:+IRONCLAD_NESTED_PS=$IRONCLAD_NESTED_PS }tests/nested/inside.sh $RESULTS $(printf '%q ' "$1")" \
        </dev/null >>"$console" 2>&1 &
    local vng_pid=$!
    python3 tests/nested/watchdog.py "$monitor" "$RESULTS/$suite.wedged" &
    local watchdog_pid=$!
    tail -n 0 -F --pid="$vng_pid" "$console" 2>/dev/null |
        grep --line-buffered -v -E '^\[ *[0-9]+\.[0-9]+\] ' | sed -u "s/^/[$suite] /" || true
    set +e
    wait "$vng_pid"
    local status=$?
    set -e
    kill "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
    [ "$status" -ne 124 ] || say "the L1 running $suite was stopped after ${TIMEOUT}s"
}

# One L1 per suite: the emulator's wedges (tests/nested/watchdog.py) came after many minutes of one
# L1's life. A suite that meets one runs again in a fresh L1, from the first test its earlier L1s
# did not pass (inside.sh records each): as long as its L1s make progress, up to MAX_ATTEMPTS
# L1s, and up to WEDGE_RETRIES more after L1s in which no test passed.
WEDGE_RETRIES=${IRONCLAD_NESTED_WEDGE_RETRIES:-2}
MAX_ATTEMPTS=${IRONCLAD_NESTED_MAX_ATTEMPTS:-6}
passed_count() { if [ -f "$RESULTS/$1.passed" ]; then wc -l <"$RESULTS/$1.passed"; else echo 0; fi; }
run_suite() {
    local suite=${1%%=*} attempt before idle=0
    for ((attempt = 0; attempt < MAX_ATTEMPTS; attempt++)); do
        before=$(passed_count "$suite")
        run_l1 "$1"
        [ -f "$RESULTS/$suite.wedged" ] && [ ! -f "$RESULTS/$suite.status" ] || return 0
        mv "$RESULTS/$suite.wedged" "$RESULTS/$suite.wedged-$attempt"
        [ "$(passed_count "$suite")" -gt "$before" ] || idle=$((idle + 1))
        if [ "$idle" -gt "$WEDGE_RETRIES" ]; then
            say "the L1 was wedged by the emulator $idle times running $suite with no test passing: giving up on it"
            return 0
        fi
        if [ "$((attempt + 1))" -eq "$MAX_ATTEMPTS" ]; then
            say "the L1s running $suite were wedged by the emulator $MAX_ATTEMPTS times: giving up on it"
            return 0
        fi
        say "the L1 was wedged by the emulator ($(cat "$RESULTS/$suite.wedged-$attempt")) with $(passed_count "$suite") of $suite's tests passed; running the rest in a fresh L1"
    done
}

# The L1s run in LANES lanes at once (one vCPU each; this machine has two cores), the suites
# spread over them longest first by the minutes they took here, each lane one L1 after another.
LANES=${IRONCLAD_NESTED_LANES:-2}
# A benchmark shares the machine with nothing.
if printf '%s\n' "${suites[@]}" | grep -qx bench; then LANES=1; fi
declare -A minutes=([containerd]=13 [bench]=10 [containerd-3]=6 [containerd-2]=5 [hostile]=5 [cri]=4 [pool]=3 [containers]=3 [boot]=2 [kvm-e2e]=1)
declare -a lane_load lane_commands
for ((lane = 0; lane < LANES; lane++)); do lane_load[lane]=0; lane_commands[lane]=""; done
while read -r _ index; do
    command=${commands[index]}
    best=0
    for ((lane = 1; lane < LANES; lane++)); do
        [ "${lane_load[lane]}" -ge "${lane_load[best]}" ] || best=$lane
    done
    lane_load[best]=$((lane_load[best] + ${minutes[${command%%=*}]:-5}))
    lane_commands[best]+="$index "
done < <(for index in "${!commands[@]}"; do echo "${minutes[${commands[index]%%=*}]:-5} $index"; done | sort -rn)
for ((lane = 0; lane < LANES; lane++)); do
    (for index in ${lane_commands[lane]}; do run_suite "${commands[index]}"; done) &
done
wait
elapsed=$(($(date +%s) - started))

failed=0
for setup in "$RESULTS"/*.setup-failed; do
    [ -e "$setup" ] || continue
    say "the L1 setup failed for $(basename "$setup" .setup-failed): $(cat "$setup") (console: ${setup%.setup-failed}.console.log)"
    failed=1
done
for command in "${commands[@]}"; do
    suite=${command%%=*}
    status=$(cat "$RESULTS/$suite.status" 2>/dev/null || echo "no result")
    if [ "$status" = 0 ]; then
        say "$suite: passed"
    else
        say "$suite: FAILED ($status)"
        failed=1
    fi
done
if [ "$(cat "$RESULTS/bench.status" 2>/dev/null)" = 0 ]; then
    cp "$RESULTS/benchmarks.md" docs/benchmarks.md
    cp "$RESULTS/benchmarks-nested.json" docs/benchmarks-nested.json
    say "wrote the nested section of docs/benchmarks.md and docs/benchmarks-nested.json"
fi
say "nested tier: $((${#commands[@]})) suites in ${elapsed}s, $([ "$failed" = 0 ] && echo "all passed" || echo "FAILED")"
exit "$failed"
