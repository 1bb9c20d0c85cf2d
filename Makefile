# sni-proxy: the two README commands are `make demo` and `make test`.
BPF_DIR   := src/sniproxy/ebpf/bpf
BPF_SRCS  := $(wildcard $(BPF_DIR)/*.bpf.c)
BPF_OBJS  := $(BPF_SRCS:.bpf.c=.bpf.o)
VMLINUX_H := $(BPF_DIR)/vmlinux.h
ARCH      := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
CLANG     ?= clang
BPFTOOL   ?= $(shell command -v bpftool || echo /usr/sbin/bpftool)

.PHONY: setup bpf test demo clean bench

setup:
	./scripts/bootstrap.sh

bpf: $(BPF_OBJS)

$(VMLINUX_H):
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_DIR)/%.bpf.o: $(BPF_DIR)/%.bpf.c $(VMLINUX_H) $(wildcard $(BPF_DIR)/*.h)
	$(CLANG) -O2 -g -target bpf -D__TARGET_ARCH_$(ARCH) -I$(BPF_DIR) -Wall -Werror \
		-c $< -o $@

# The whole test suite; eBPF tests fail (not skip) when eBPF is missing.
test: setup
	SNI_PROXY_REQUIRE_EBPF=1 .venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Sets everything up and starts the proxy on examples/demo-config.json with local demo backends.
demo: setup
	.venv/bin/python examples/demo.py

clean:
	rm -f $(BPF_DIR)/*.bpf.o $(VMLINUX_H)
