# sni-proxy developer targets. The README's two commands are scripts/demo.sh and scripts/test.sh
# (they need no make on a fresh machine); `make demo` / `make test` call them.
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
test:
	./scripts/test.sh $(PYTEST_ARGS)

# Sets everything up and starts the proxy on examples/demo-config.json with local demo backends.
demo:
	./scripts/demo.sh

clean:
	rm -f $(BPF_DIR)/*.bpf.o $(VMLINUX_H)
