// SPDX-License-Identifier: GPL-2.0
/* Test-only impairment for a veth end (this kernel has no sch_netem): drops about 1% of the
 * IP packets and sends about 2% twice, pseudo-randomly, so TCP's own recovery (retransmission,
 * SACK, duplicate segments) runs end to end across the splice. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int lossy_link(struct __sk_buff *skb)
{
	__u32 r;

	/* ARP and the rest pass: only IP traffic is impaired */
	if (skb->protocol != bpf_htons(0x0800) && skb->protocol != bpf_htons(0x86DD))
		return 0;
	r = bpf_get_prandom_u32() % 1000;
	if (r < 10)
		return 2;					/* TC_ACT_SHOT */
	if (r < 30)
		bpf_clone_redirect(skb, skb->ifindex, 0);	/* a duplicate, sent first */
	return 0;
}

/* The same at a receiver's ingress: the packet crossed the splice and is lost just before its
 * receiver, who asks for it again with duplicate ACKs and SACK blocks (which cross the splice
 * and must be translated); the duplicate is delivered twice. */
SEC("tc")
int lossy_link_ingress(struct __sk_buff *skb)
{
	__u32 r;

	if (skb->protocol != bpf_htons(0x0800) && skb->protocol != bpf_htons(0x86DD))
		return 0;
	r = bpf_get_prandom_u32() % 1000;
	if (r < 10)
		return 2;					/* TC_ACT_SHOT */
	if (r < 30)
		bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS);
	return 0;
}
