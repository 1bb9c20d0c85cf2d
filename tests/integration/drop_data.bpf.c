// SPDX-License-Identifier: GPL-2.0
/* Test-only loss for a veth end (this kernel has no sch_netem): drops about 10 % of the IPv4
 * TCP packets that carry data, pseudo-randomly (on a veth most are GSO packets of up to
 * 64 KiB, so a drop loses tens of segments: few packets, hence the high rate). Handshake packets always pass: a lost SYN-ACK
 * is resent by inet_rtx_syn_ack(), which RetransSegs counts but tcp_retransmit_skb does not
 * trace, and the proof compares exactly those two. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int drop_data(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct tcphdr tcp;
	__u32 ihl, payload;

	if (skb->protocol != bpf_htons(0x0800))
		return 0;
	if (bpf_skb_load_bytes(skb, 14, &ip, sizeof(ip)) || ip.protocol != 6)
		return 0;
	ihl = ip.ihl * 4;
	if (ihl < 20 || bpf_skb_load_bytes(skb, 14 + ihl, &tcp, sizeof(tcp)))
		return 0;
	if (tcp.syn)
		return 0;
	/* GSO packets carry tot_len 0 past 64 KiB: the skb length says how much is there */
	payload = skb->len - 14 - ihl - tcp.doff * 4;
	if (!payload || payload > skb->len)
		return 0;
	if (bpf_get_prandom_u32() % 100 < 10)
		return 2;	/* TC_ACT_SHOT */
	return 0;
}
