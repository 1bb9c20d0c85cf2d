/* Shared by every sni-proxy BPF program: includes and small helpers.
 *
 * Naming: the kernel keeps 15 characters of a program or map name, so every name is
 * "sni_proxy_" + at most 5 characters (e.g. sni_proxy_skv); `bpftool prog list` then shows the
 * whole name and it is recognisably ours.
 */
#ifndef SNI_PROXY_COMMON_H
#define SNI_PROXY_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#ifndef SK_PASS
#define SK_DROP 0
#define SK_PASS 1
#endif

#define ETH_P_IP 0x0800

/* Add to a per-CPU counter slot; a missing slot (index out of range) is silently ignored
 * because the verifier requires the NULL check and the index is a compile-time constant. */
static __always_inline void sni_proxy_count(void *map, __u32 slot, __u64 n)
{
	__u64 *counter = bpf_map_lookup_elem(map, &slot);

	if (counter)
		*counter += n;
}

#endif
