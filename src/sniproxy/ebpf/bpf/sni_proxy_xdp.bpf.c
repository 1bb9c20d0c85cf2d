// SPDX-License-Identifier: GPL-2.0
/* sni_proxy_xdp: XDP pass-counter. Counts every packet and byte, and separately IPv4/UDP
 * packets to one destination port (set before load), then passes everything on.
 *
 * Used by `sni-proxy demo` on `lo` (generic XDP) to show a real attach with traffic it sent
 * itself; it never drops or rewrites a packet.
 */
#include "sni_proxy_common.h"

char LICENSE[] SEC("license") = "GPL";

/* Destination UDP port to count separately, host byte order; 0 disables the UDP match. */
const volatile __u16 sni_proxy_port = 0;

enum sni_proxy_xdp_slot {
	SLOT_PACKETS,
	SLOT_BYTES,
	SLOT_UDP_PORT_PACKETS,
	SLOT_MAX,
};
/* An enum reaches BTF only when a variable has its type: user space checks its slot names
 * against this one at open (ebpf/layout.py). */
const volatile enum sni_proxy_xdp_slot sni_proxy_xdp_slots = SLOT_MAX;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLOT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_xcnt SEC(".maps");

static __always_inline bool sni_proxy_is_udp_to_port(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	if (sni_proxy_port == 0)
		return false;
	/* Every access below is bounds-checked against data_end: the verifier demands it. */
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return false;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
		return false;
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > data_end)
		return false;
	return udp->dest == bpf_htons(sni_proxy_port);
}

SEC("xdp")
int sni_proxy_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	sni_proxy_count(&sni_proxy_xcnt, SLOT_PACKETS, 1);
	sni_proxy_count(&sni_proxy_xcnt, SLOT_BYTES, data_end - data);
	if (sni_proxy_is_udp_to_port(data, data_end))
		sni_proxy_count(&sni_proxy_xcnt, SLOT_UDP_PORT_PACKETS, 1);
	return XDP_PASS;
}
