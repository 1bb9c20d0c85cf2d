// SPDX-License-Identifier: GPL-2.0
/* Test-only delay and reordering for a veth end (this kernel has no sch_netem, sch_fq or
 * tbf): a cls_bpf classifier under an htb qdisc (tests/integration/test_tcp_splice_impair.py
 * builds it). Every REORDER_INTERVAL_NS two consecutive data packets go to a rate-limited
 * class (1:20) instead of the default, unlimited one (1:10): the first finds the class's
 * tokens full and leaves at once, the second waits until they are back (its length at the
 * slow rate, about a millisecond), so the packets sent after it on the fast class overtake
 * it: it arrives late and out of order. The pairs are spaced so the slow class never builds
 * a queue: every delay is one packet's time, never a backlog's. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define SLOW_CLASSID 0x00010020		/* 1:20 */
#define REORDER_INTERVAL_NS (5 * 1000 * 1000ULL)
#define MIN_DATA_LEN 200		/* bytes on the wire: pure ACKs and handshakes stay fast */

struct pacer {
	__u64 last_ns;
	__u32 pending;			/* packets still to send slow in the current pair */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pacer);
} reorder_pacer SEC(".maps");

/* cls_bpf without direct-action: the return value is the class id, 0 the qdisc default. */
SEC("classifier")
int reorder_link(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct pacer *p;
	__u64 now;

	if (skb->protocol != bpf_htons(0x0800) && skb->protocol != bpf_htons(0x86DD))
		return 0;
	if (skb->len < MIN_DATA_LEN)
		return 0;
	p = bpf_map_lookup_elem(&reorder_pacer, &zero);
	if (!p)
		return 0;
	if (p->pending) {
		p->pending--;
		return SLOW_CLASSID;
	}
	now = bpf_ktime_get_ns();
	if (now - p->last_ns < REORDER_INTERVAL_NS)
		return 0;
	p->last_ns = now;
	p->pending = 1;
	return SLOW_CLASSID;
}
