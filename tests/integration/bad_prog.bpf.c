// SPDX-License-Identifier: GPL-2.0
/* Deliberately rejected by the verifier: dereferences a map lookup result without the NULL
 * check. Compiled by tests/integration/test_ebpf_objects.py into tmp_path; never shipped. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_bad SEC(".maps");

SEC("raw_tp/sys_enter")
int sni_proxy_badp(void *ctx)
{
	__u32 key = 0;
	__u64 *value = bpf_map_lookup_elem(&sni_proxy_bad, &key);

	return *value; /* the bug: value may be NULL */
}
