// SPDX-License-Identifier: GPL-2.0
/* Test-only impairment for a veth end (this kernel has no sch_netem): drops about 1% of the
 * IP packets and sends about 2% twice, pseudo-randomly, so TCP's own recovery (retransmission,
 * SACK, duplicate segments) runs end to end across the splice. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

/* Drops ~1% of the IP packets, sends ~2% twice (the copy to `dup_flags`: 0 is the device's
 * egress, BPF_F_INGRESS its ingress); ARP and the rest pass. */
static __always_inline int impair(struct __sk_buff *skb, __u64 dup_flags)
{
	__u32 r;

	if (skb->protocol != bpf_htons(0x0800) && skb->protocol != bpf_htons(0x86DD))
		return 0;
	r = bpf_get_prandom_u32() % 1000;
	if (r < 10)
		return 2;					/* TC_ACT_SHOT */
	if (r < 30)
		bpf_clone_redirect(skb, skb->ifindex, dup_flags);	/* a duplicate, sent first */
	return 0;
}

/* At a sender's egress: a local drop, which TCP sends again as a new transmission. */
SEC("tc")
int lossy_link(struct __sk_buff *skb)
{
	return impair(skb, 0);
}

/* At a receiver's ingress: the packet crossed the splice and is lost just before its
 * receiver, who asks for it again with duplicate ACKs and SACK blocks (which cross the splice
 * and must be translated); the duplicate is delivered twice. */
SEC("tc")
int lossy_link_ingress(struct __sk_buff *skb)
{
	return impair(skb, BPF_F_INGRESS);
}
