# ironclad: `make demo` and `make test` are the two commands; the rest are their steps.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO ?= cargo
GUEST_DIR := target/guest
# The agent runs as /init with nothing else in the image: a static glibc build. Passing --target keeps
# crt-static away from build scripts and proc macros, which must stay dynamic.
STATIC_TARGET := x86_64-unknown-linux-gnu
AGENT_STATIC := target/$(STATIC_TARGET)/release/ironclad-agent
# The agent that lies, for the tests that check the shim contains a hostile guest.
HOSTILE_AGENT_STATIC := target/$(STATIC_TARGET)/release/ironclad-hostile-agent
# Root caches for the machine; anyone else in their home.
export IRONCLAD_CACHE ?= $(if $(filter 0,$(shell id -u)),/var/cache/ironclad,$(HOME)/.cache/ironclad)
# Tests that cannot run here fail, naming what they need; IRONCLAD_ALLOW_SKIP=1 lets them skip,
# and each skip is recorded here and summed up at the end of `make test`.
export IRONCLAD_SKIP_LOG := $(CURDIR)/target/test-skips.log
PREFIX ?= /usr/local
CONFIG_DIR ?= /etc/ironclad
# Where `make install` puts ironclad-pool's unit (`systemctl enable --now ironclad-pool`).
SYSTEMD_DIR ?= /etc/systemd/system

.PHONY: all prereqs kernel agent initrd guest lint test test-nested demo boot-demo install bench bench-nested fuzz clean

all: guest

prereqs:
	scripts/install-prereqs.sh

# Built once into $(IRONCLAD_CACHE)/kernel/<key>; copied here so the tree can travel (device runs).
kernel:
	mkdir -p $(GUEST_DIR)
	dir=$$(guest-kernel/build.sh); \
	rm -f $(GUEST_DIR)/bzImage $(GUEST_DIR)/vmlinux; \
	cp "$$dir/bzImage" $(GUEST_DIR)/bzImage; \
	cp "$$dir/vmlinux" $(GUEST_DIR)/vmlinux

# libseccomp (libcontainer's seccomp support) must be linked statically too, or the binary mixes a
# static libc with a shared library and crashes at start.
agent:
	RUSTFLAGS="-C target-feature=+crt-static" LIBSECCOMP_LINK_TYPE=static \
		LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
		$(CARGO) build --release --locked --target $(STATIC_TARGET) -p ironclad-agent -p ironclad-hostile-agent
	@for agent in $(AGENT_STATIC) $(HOSTILE_AGENT_STATIC); do \
		if readelf -l $$agent | grep -q INTERP || readelf -d $$agent | grep -q NEEDED; then \
			echo "$$agent is not statically linked" >&2; exit 1; fi; done

initrd: agent
	mkdir -p $(GUEST_DIR)
	$(CARGO) build --release --locked -p ironclad-rootfs-builder
	target/release/ironclad-rootfs --agent $(AGENT_STATIC) --output $(GUEST_DIR)/initrd.img
	target/release/ironclad-rootfs --agent $(HOSTILE_AGENT_STATIC) --output $(GUEST_DIR)/hostile-initrd.img

guest: kernel initrd

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The end-to-end tests start the shim binary through containerd: build every binary first.
test: prereqs guest lint
	$(CARGO) build --workspace --locked
	rm -f $(IRONCLAD_SKIP_LOG)
	$(CARGO) test --workspace --locked
	tests/nested/run.sh
	@scripts/skip-summary.sh $(IRONCLAD_SKIP_LOG)

# Only the nested tier: ironclad-vmm booting the real guest inside an L1 guest with emulated SVM.
test-nested: prereqs guest
	$(CARGO) build --workspace --locked
	tests/nested/run.sh

# ctr run through a private containerd, ironclad next to runc.
demo: prereqs guest
	$(CARGO) build --release --locked -p ironclad-shim -p ironclad-jailer -p ironclad-tests
	target/release/ironclad-demo

# Just the guest: boot it and talk to its agent, without containerd.
boot-demo: prereqs guest
	$(CARGO) run --release --locked -p ironclad-tests --bin ironclad-boot

# Binaries to $(PREFIX)/bin, the guest to $(PREFIX)/share/ironclad, and the default config, which an
# existing one is never replaced by.
install: guest
	$(CARGO) build --release --locked -p ironclad-shim -p ironclad-vmm -p ironclad-jailer -p ironclad-pool
	install -D -m 0755 target/release/containerd-shim-ironclad-v2 $(PREFIX)/bin/containerd-shim-ironclad-v2
	install -D -m 0755 target/release/ironclad-pool $(PREFIX)/bin/ironclad-pool
	install -d $(SYSTEMD_DIR)
	sed 's|/usr/local/bin/ironclad-pool|$(PREFIX)/bin/ironclad-pool|; s|/etc/ironclad/config.toml|$(CONFIG_DIR)/config.toml|' \
		pool/ironclad-pool.service > $(SYSTEMD_DIR)/ironclad-pool.service
	chmod 0644 $(SYSTEMD_DIR)/ironclad-pool.service
	install -D -m 0755 target/release/ironclad-vmm $(PREFIX)/bin/ironclad-vmm
	install -D -m 0755 target/release/ironclad-jailer $(PREFIX)/bin/ironclad-jailer
	install -D -m 0644 $(GUEST_DIR)/vmlinux $(PREFIX)/share/ironclad/vmlinux
	install -D -m 0644 $(GUEST_DIR)/initrd.img $(PREFIX)/share/ironclad/initrd.img
	@if [ -e $(CONFIG_DIR)/config.toml ]; then \
		echo "keeping the existing $(CONFIG_DIR)/config.toml"; \
	else \
		mkdir -p $(CONFIG_DIR); \
		sed 's|/usr/local/share/ironclad|$(PREFIX)/share/ironclad|' shim/config.toml > $(CONFIG_DIR)/config.toml; \
		echo "wrote $(CONFIG_DIR)/config.toml"; \
	fi
	scripts/pin-guest.sh $(CONFIG_DIR)/config.toml $(PREFIX)/share/ironclad/vmlinux $(PREFIX)/share/ironclad/initrd.img

# Release builds; the short version (a few minutes here). Writes docs/benchmarks.md (one section per
# benchmark), docs/benchmarks-vmm.json, docs/benchmarks-runtimes.json, docs/benchmarks-pods.json and
# docs/charts/, naming the
# machine and the backend.
bench: prereqs guest
	$(CARGO) build --release --locked -p ironclad-vmm -p ironclad-shim -p ironclad-jailer -p ironclad-pool -p ironclad-agent -p ironclad-bench
	target/release/ironclad-bench vmm --vmm target/release/ironclad-vmm
	target/release/ironclad-bench agent --runs 100
	target/release/ironclad-bench runtimes --runs 20 --density 1,10,25
	target/release/ironclad-bench pods --runs 10

# ironclad-vmm against QEMU on the same KVM, and ironclad against runc, inside the nested tier's L1:
# the nested section of docs/benchmarks.md (ratios; about 10 minutes here).
bench-nested: prereqs guest
	$(CARGO) build --workspace --locked
	tests/nested/run.sh bench

# Every cargo fuzz target (fuzz/) for FUZZ_SECONDS, on the nightly toolchain (cargo-fuzz installed
# pinned); new inputs are kept, minimised, in fuzz/corpus, which `make test` replays on stable.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

clean:
	$(CARGO) clean
