# ironclad: `make demo` and `make test` are the two commands; the rest are their steps.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO ?= cargo
GUEST_DIR := target/guest
# The agent runs as /init with nothing else in the image: a static glibc build. Passing --target keeps
# crt-static away from build scripts and proc macros, which must stay dynamic.
STATIC_TARGET := x86_64-unknown-linux-gnu
AGENT_STATIC := target/$(STATIC_TARGET)/release/ironclad-agent
export IRONCLAD_CACHE ?= /var/cache/ironclad

.PHONY: all prereqs kernel agent initrd guest lint test demo bench clean

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
		$(CARGO) build --release --locked --target $(STATIC_TARGET) -p ironclad-agent
	@if readelf -l $(AGENT_STATIC) | grep -q INTERP || readelf -d $(AGENT_STATIC) | grep -q NEEDED; then \
		echo "$(AGENT_STATIC) is not statically linked" >&2; exit 1; fi

initrd: agent
	mkdir -p $(GUEST_DIR)
	$(CARGO) build --release --locked -p ironclad-rootfs-builder
	target/release/ironclad-rootfs --agent $(AGENT_STATIC) --output $(GUEST_DIR)/initrd.img

guest: kernel initrd

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: prereqs guest lint
	$(CARGO) test --workspace --locked

demo: prereqs guest
	$(CARGO) run --release --locked -p ironclad-tests --bin ironclad-boot

# Release builds; writes docs/benchmarks.md and docs/benchmarks-vmm.json, naming the machine.
bench:
	$(CARGO) build --release --locked -p ironclad-vmm -p ironclad-bench
	target/release/ironclad-bench vmm --vmm target/release/ironclad-vmm

clean:
	$(CARGO) clean
