// SPDX-License-Identifier: GPL-2.0
/* sni_proxy_tcp_splice: after the ClientHello, the client's TCP connection and the backend's
 * are spliced at the packet level, like a NAT: every packet that arrives for one of the
 * proxy's two sockets is rewritten into a packet of the other connection (addresses, ports,
 * sequence and acknowledgement numbers, TCP timestamps, SACK blocks, window, checksums) and
 * redirected out. The end hosts then talk TCP to each other end to end; the proxy's sockets
 * go quiet (the egress hook drops what they still send).
 *
 * Programs (tc clsact, attached by src/sniproxy/ebpf/tcpsplice.py):
 *   sni_proxy_tsi  ingress: look up the 4-tuple, rewrite, redirect.
 *   sni_proxy_tse  egress: rewrite in place what a local end sends through lo to a local
 *                  end; freeze the proxy's own sockets of a spliced flow.
 * Maps:
 *   sni_proxy_tsfw  hash, 4-tuple of arriving packets -> struct sni_proxy_ts_dir (2 per flow)
 *   sni_proxy_tsfl  array, flow slot -> struct sni_proxy_ts_flow (counters, FIN/RST state)
 *   sni_proxy_tsrg  array of ring buffers, one per worker: "this flow ended" events
 *   sni_proxy_tsst  per-CPU counters (enum below)
 * The hand-over protocol (who reads what, when) is in docs/kernel-datapath.md.
 */
#include "sni_proxy_common.h"
#include "sni_proxy_tcp_splice.h"

char LICENSE[] SEC("license") = "GPL";

#define TC_ACT_UNSPEC -1	/* not ours: the next filter (or the stack) decides */
#define TC_ACT_SHOT 2
#define ETH_HLEN 14
#define ETH_P_IPV6 0x86DD
#define PROTO_TCP 6

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define TCP_HDR_MAX 60
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_SACK 5
#define TCPOPT_TIMESTAMP 8
#define SACK_MAX_BLOCKS 4	/* 2 + 4 * 8 = 34 bytes: the most that fits in 40 option bytes */

enum sni_proxy_ts_stat {
	TS_STAT_C2B_PKTS,
	TS_STAT_C2B_BYTES,
	TS_STAT_B2C_PKTS,
	TS_STAT_B2C_BYTES,
	TS_STAT_FROZEN,		/* packets of the proxy's own sockets dropped at egress */
	TS_STAT_TO_PROXY,	/* backend ACKs of the hand-over bytes left to the proxy socket */
	TS_STAT_NO_FLOW,	/* a map entry pointed at a missing flow slot */
	TS_STAT_EVENTS,
	TS_STAT_EVENTS_LOST,	/* worker ring missing or full: user space finds it by polling */
	TS_STAT_REDIRECT_FAIL,
	TS_STAT_MAX,
};

/* Anchors: put the event struct and the counter enum in the object's BTF (only sizeof and
 * the values are used below), so ebpf/tcpsplice.py's descriptions are checked at load. */
const volatile enum sni_proxy_ts_stat sni_proxy_ts_stat_slots = TS_STAT_MAX;
const volatile struct sni_proxy_ts_event sni_proxy_ts_event_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);	/* 2 * ebpf.tcp_splice.max_flows, set at open */
	__type(key, struct sni_proxy_ts_key);
	__type(value, struct sni_proxy_ts_dir);
} sni_proxy_tsfw SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4096);	/* ebpf.tcp_splice.max_flows, set at open */
	__type(key, __u32);
	__type(value, struct sni_proxy_ts_flow);
} sni_proxy_tsfl SEC(".maps");

struct sni_proxy_ts_ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 64);
	__type(key, __u32);
	__array(values, struct sni_proxy_ts_ring);
} sni_proxy_tsrg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_tsst SEC(".maps");

struct parsed {
	struct sni_proxy_ts_key key;
	__u32 l3_off;
	__u32 l4_off;
	__u32 l4_len;		/* TCP header + payload */
	__u32 hlen;		/* TCP header with options */
	__u8 flags;
};

static __always_inline void stat(__u32 slot, __u64 n)
{
	sni_proxy_count(&sni_proxy_tsst, slot, n);
}

static __always_inline __u32 get32(const __u8 *b, __u32 at)
{
	return ((__u32)b[at & 63] << 24) | ((__u32)b[(at + 1) & 63] << 16) |
	       ((__u32)b[(at + 2) & 63] << 8) | (__u32)b[(at + 3) & 63];
}

static __always_inline void put32(__u8 *b, __u32 at, __u32 v)
{
	b[at & 63] = v >> 24;
	b[(at + 1) & 63] = v >> 16;
	b[(at + 2) & 63] = v >> 8;
	b[(at + 3) & 63] = v;
}

/* IPv4 or IPv6 TCP, no IP options / extension headers, not a fragment. Anything else is
 * not a packet of a spliced flow (the proxy's sockets never produce it) and passes. */
static __always_inline int parse(struct __sk_buff *skb, struct parsed *p)
{
	struct tcphdr th;

	p->l3_off = ETH_HLEN;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		/* ihl 5 only: the proxy's sockets send no IP options, so a flow never has them */
		if (ip.ihl != 5 || ip.protocol != PROTO_TCP)
			return -1;
		/* a fragment has no (or a partial) TCP header to rewrite */
		if (ip.frag_off & bpf_htons(0x3fff))
			return -1;
		p->key.family = 4;
		p->key.saddr[0] = ip.saddr;
		p->key.daddr[0] = ip.daddr;
		p->l4_off = ETH_HLEN + sizeof(ip);
		/* 0: an IPv4 BIG TCP GSO packet, longer than 64 KiB (lo sends them on 6.18):
		 * its length is the skb's */
		p->l4_len = (ip.tot_len ? bpf_ntohs(ip.tot_len) : skb->len - ETH_HLEN) - sizeof(ip);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		/* extension headers: never sent by the proxy's sockets */
		if (ip6.nexthdr != PROTO_TCP)
			return -1;
		p->key.family = 6;
		__builtin_memcpy(p->key.saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->key.daddr, &ip6.daddr, 16);
		p->l4_off = ETH_HLEN + sizeof(ip6);
		/* 0: IPv6 BIG TCP (without the jumbo option) */
		p->l4_len = ip6.payload_len ? bpf_ntohs(ip6.payload_len) :
					      skb->len - ETH_HLEN - sizeof(ip6);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, p->l4_off, &th, sizeof(th)))
		return -1;
	p->key.sport = th.source;
	p->key.dport = th.dest;
	p->hlen = th.doff * 4;
	/* a header shorter than 20 bytes or longer than the packet is malformed: let the
	 * stack drop it */
	if (p->hlen < 20 || p->hlen > TCP_HDR_MAX || p->hlen > p->l4_len)
		return -1;
	p->flags = ((__u8 *)&th)[13];
	return 0;
}

static __always_inline void report(struct sni_proxy_ts_flow *f, __u32 slot, __u32 why)
{
	struct sni_proxy_ts_event ev = { .flow = slot, .gen = f->gen, .why = why };
	__u64 flags;
	void *ring;

	/* Plain test-and-set: two CPUs may both report; user space ignores a duplicate (and
	 * clang 14's default BPF CPU has no compare-and-swap). */
	if (f->reported)
		return;
	f->reported = 1;
	ev.rst = f->rst;
	ev.fin[0] = f->fin[0];
	ev.fin[1] = f->fin[1];
	ev.fin_acked[0] = f->fin_acked[0];
	ev.fin_acked[1] = f->fin_acked[1];
	ev.fin_seq[0] = f->fin_seq[0];
	ev.fin_seq[1] = f->fin_seq[1];
	ev.nxt[0] = f->ctr[0].nxt;
	ev.nxt[1] = f->ctr[1].nxt;
	ring = bpf_map_lookup_elem(&sni_proxy_tsrg, &f->ring);
	if (!ring) {
		stat(TS_STAT_EVENTS_LOST, 1);
		return;
	}
	flags = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) >= SNI_PROXY_TS_RING_WAKE_BYTES ?
		BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(ring, &ev, sizeof(ev), flags) == 0)
		stat(TS_STAT_EVENTS, 1);
	else
		stat(TS_STAT_EVENTS_LOST, 1);
}

/* The receiver-side socket's TCP timestamp clock now: Linux TSval is milliseconds of
 * CLOCK_MONOTONIC plus a per-connection offset; user space measured that offset at arm. */
static __always_inline __u32 receiver_clock(const struct sni_proxy_ts_dir *v)
{
	return v->ts_base + (__u32)(bpf_ktime_get_ns() / 1000000);
}

struct optscan {
	__u8 hdr[64];
	__u32 hlen;
	__u32 i;
	__u32 ts_at;
	__u32 sack_at;
	__u32 sack_n;
};

static long scan_option(__u32 n, struct optscan *s)
{
	__u32 i = s->i;
	__u8 kind, len;

	if (i >= s->hlen || i >= 64)
		return 1;
	kind = s->hdr[i & 63];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		s->i = i + 1;
		return 0;
	}
	if (i + 1 >= s->hlen)
		return 1;
	len = s->hdr[(i + 1) & 63];
	/* a length that overruns the header is malformed: stop, leave the rest alone */
	if (len < 2 || i + len > s->hlen)
		return 1;
	if (kind == TCPOPT_TIMESTAMP && len == 10) {
		s->ts_at = i + 2;
	} else if (kind == TCPOPT_SACK && len >= 10 && ((len - 2) & 7) == 0) {
		s->sack_at = i + 2;
		s->sack_n = (len - 2) / 8;
	}
	s->i = i + len;
	return 0;
}

/* Rewrite a packet that `v` says belongs to a spliced flow into the other connection's.
 * `in_place`: called by the egress hook of the device the rewritten packet leaves by (lo,
 * both ends local): it goes on as it is, once through the device. Otherwise (ingress) it is
 * redirected out. */
static __always_inline int splice(struct __sk_buff *skb, struct parsed *p,
				  struct sni_proxy_ts_dir *v, bool in_place)
{
	struct sni_proxy_ts_flow *f;
	struct sni_proxy_ts_ctr *ctr;
	struct optscan scan = {};
	__u8 old[64], *hdr = scan.hdr;
	__u32 seq, ack, nseq, payload, dir, other, ts_at, sack_at, sack_n;
	__u32 hlen, win;
	__s64 diff;
	int n;

	f = bpf_map_lookup_elem(&sni_proxy_tsfl, &v->flow);
	if (!f) {
		stat(TS_STAT_NO_FLOW, 1);
		return TC_ACT_UNSPEC;
	}
	/* A SYN reusing a spliced 4-tuple is a new connection, not part of the flow. If the
	 * flow is over (lingering), its entries go now, or they would capture the new
	 * connection's next packets; user space's later delete finds them gone. */
	if (p->flags & TH_SYN) {
		if (v->dir == SNI_PROXY_TS_C2B && f->reported) {
			struct sni_proxy_ts_key rev = { .family = p->key.family };

			__builtin_memcpy(rev.saddr, v->daddr, 16);
			__builtin_memcpy(rev.daddr, v->saddr, 16);
			rev.sport = v->dport;
			rev.dport = v->sport;
			bpf_map_delete_elem(&sni_proxy_tsfw, &rev);
			bpf_map_delete_elem(&sni_proxy_tsfw, &p->key);
		}
		return TC_ACT_UNSPEC;
	}
	/* While user space checks that no backend byte slipped into its socket during the
	 * insertion, the backend's packets are dropped: neither the socket nor the client may
	 * get them yet; the backend retransmits them to whichever is decided. */
	if (v->flags & SNI_PROXY_TS_F_HOLD)
		return TC_ACT_SHOT;
	hlen = p->hlen;
	if (hlen < 20 || hlen > TCP_HDR_MAX)	/* parse() checked; the verifier needs it here */
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p->l4_off, hdr, hlen))
		return TC_ACT_UNSPEC;
	dir = v->dir & 1;
	other = dir ^ 1;
	seq = get32(hdr, 4);
	ack = get32(hdr, 8);
	payload = p->l4_len - hlen;

	/* Backend ACKs of the bytes the proxy wrote itself (the ClientHello and what was queued
	 * with it) are needed by two: the proxy's socket, to stop retransmitting them, and the
	 * client, whose view of the backend's window comes only from spliced packets (a client
	 * that hit a zero window before the hand-over waits for one). So while the flow is not
	 * engaged, such an ACK is cloned back to ingress for the proxy's socket (marked, passed
	 * untouched) and the original is spliced. Data, FIN, RST, an ACK past the hand-over,
	 * or the ACK of its last byte engage the flow. A packet that engages it with data, a FIN
	 * or an ACK past the hand-over is usually the only ACK of the hand-over bytes there will
	 * be (a TLS server answers the hello at once): the proxy's socket gets a copy too, cut
	 * down to that ACK by the ingress hook (ack_only). Without it the socket retransmitted
	 * the hello for the flow's whole life (each answered by the backend with a duplicate ACK
	 * the client saw as a D-SACK) and gave up after tcp_retries2 (about 15 minutes),
	 * freeing its local port while the flow lived. */
	if (dir == SNI_PROXY_TS_B2C && !f->engaged) {
		/* The copy for the proxy's socket: at ingress back to ingress; at lo's egress
		 * out of lo again (the egress hook lets it through, and it loops back to
		 * ingress): a redirect to lo's own ingress never arrives on 6.18. */
		__u64 clone_to = in_place ? 0 : BPF_F_INGRESS;

		if (payload == 0 && !(p->flags & (TH_FIN | TH_RST)) &&
		    (__s32)(ack - v->handover_end) <= 0) {
			if (ack == v->handover_end)
				f->engaged = 1;
			skb->mark = SNI_PROXY_TS_MARK_PASS;
			bpf_clone_redirect(skb, skb->ifindex, clone_to);
			skb->mark = 0;
			stat(TS_STAT_TO_PROXY, 1);
		} else {
			f->engaged = 1;
			if ((p->flags & TH_ACK) && !(p->flags & TH_RST)) {
				skb->mark = SNI_PROXY_TS_MARK_ACK;
				bpf_clone_redirect(skb, skb->ifindex, clone_to);
				skb->mark = 0;
				stat(TS_STAT_TO_PROXY, 1);
			}
		}
	}

	__builtin_memcpy(old, hdr, sizeof(old));
	nseq = seq + v->seq_delta;
	/* ports */
	__builtin_memcpy(&hdr[0], &v->sport, 2);
	__builtin_memcpy(&hdr[2], &v->dport, 2);
	put32(hdr, 4, nseq);
	if (p->flags & TH_ACK)
		put32(hdr, 8, ack + v->ack_delta);
	/* Window: scaled by the sender's shift, read with the receiver's; equal on every Linux
	 * pair with the same tcp_rmem, otherwise rescaled (and clamped to the 16-bit field). */
	if (v->win_shift_in != v->win_shift_out) {
		__u64 w = (((__u64)hdr[14] << 8) | hdr[15]) << (v->win_shift_in & 15);

		w >>= (v->win_shift_out & 15);
		win = w > 0xffff ? 0xffff : (__u32)w;
		hdr[14] = win >> 8;
		hdr[15] = win;
	}
	/* Options: find the timestamp and SACK options wherever they are (bpf_loop: one
	 * verification of the body instead of one per possible option layout). */
	if (hlen == 32 && hdr[20] == TCPOPT_NOP && hdr[21] == TCPOPT_NOP &&
	    hdr[22] == TCPOPT_TIMESTAMP && hdr[23] == 10) {
		/* What Linux puts on nearly every segment of a connection with timestamps
		 * (NOP NOP TS, no SACK): no scan needed. */
		ts_at = 24;
		sack_at = 0;
		sack_n = 0;
	} else {
		scan.hlen = hlen;
		scan.i = 20;
		bpf_loop(40, scan_option, &scan, 0);
		ts_at = scan.ts_at;
		sack_at = scan.sack_at;
		sack_n = scan.sack_n;
	}
	if (ts_at && (v->flags & SNI_PROXY_TS_F_TSTAMP)) {
		__u32 tsval = get32(hdr, ts_at), tsecr = get32(hdr, ts_at + 4);

		/* TSval: the receiver's PAWS check compares it with the last value it saw from the
		 * proxy's socket, so the sender's clock is shifted onto that socket's clock, learnt
		 * from the first packet (a race between two CPUs learns two values 0-1 ms apart:
		 * harmless, PAWS allows 1). */
		if (!f->ts_learned[dir]) {
			f->ts_off[dir] = receiver_clock(v) - tsval;
			f->ts_learned[dir] = 1;
		}
		put32(hdr, ts_at, tsval + f->ts_off[dir]);
		/* TSecr echoes the other direction's (translated) TSval: undo that translation.
		 * Before the other direction was seen it echoes the proxy socket's clock, which
		 * the receiver cannot use: 0 tells it to take no RTT sample from it. */
		if (p->flags & TH_ACK)
			put32(hdr, ts_at + 4, f->ts_learned[other] ? tsecr - f->ts_off[other] : 0);
	}
	if (sack_at && (p->flags & TH_ACK)) {
		/* SACK edges acknowledge the other direction's bytes, like the ACK number */
		for (n = 0; n < SACK_MAX_BLOCKS; n++) {
			__u32 at = sack_at + 8 * n;

			if (n >= sack_n)
				break;
			put32(hdr, at, get32(hdr, at) + v->ack_delta);
			put32(hdr, at + 4, get32(hdr, at + 4) + v->ack_delta);
		}
	}

	/* FIN/RST tracking: a FIN's sequence number is kept in the receiver's space, where the
	 * other side's ACK (read before translation) acknowledges it. */
	if (p->flags & TH_FIN) {
		f->fin_seq[dir] = nseq + payload + 1;
		f->fin[dir] = 1;
	}
	if ((p->flags & TH_ACK) && f->fin[other] && (__s32)(ack - f->fin_seq[other]) >= 0)
		f->fin_acked[other] = 1;
	if ((p->flags & TH_RST) && !f->rst)
		f->rst = 1 + dir;	/* who reset first: a reset after its own FIN is a normal end */
	/* Plain max (two CPUs may race; the counts are for accounting only). Data only: an ACK
	 * sent after a FIN carries the FIN's sequence number + 1. */
	ctr = &f->ctr[dir];
	if (payload && (__s32)(nseq + payload - ctr->nxt) > 0)
		ctr->nxt = nseq + payload;
	ctr->last_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&ctr->bytes, payload);
	__sync_fetch_and_add(&ctr->packets, skb->gso_segs ? skb->gso_segs : 1);
	stat(dir == SNI_PROXY_TS_C2B ? TS_STAT_C2B_PKTS : TS_STAT_B2C_PKTS,
	     skb->gso_segs ? skb->gso_segs : 1);
	stat(dir == SNI_PROXY_TS_C2B ? TS_STAT_C2B_BYTES : TS_STAT_B2C_BYTES, payload);
	if (f->rst)
		report(f, v->flow, SNI_PROXY_TS_EV_RST);
	else if (f->fin_acked[0] && f->fin_acked[1])
		report(f, v->flow, SNI_PROXY_TS_EV_FIN);

	/* TCP header: one checksum difference over the whole header (the checksum field is
	 * equal in both copies). For CHECKSUM_PARTIAL skbs (loopback, veth) the helper leaves
	 * the field alone, as it must: the header is summed when the packet is sent. */
	diff = bpf_csum_diff((__be32 *)old, hlen, (__be32 *)hdr, hlen, 0);
	if (diff < 0 || bpf_skb_store_bytes(skb, p->l4_off, hdr, hlen, 0))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, p->l4_off + 16, 0, diff, 0))
		return TC_ACT_SHOT;
	/* Addresses: in the IPv4 header checksum and the TCP pseudo-header. */
	if (p->key.family == 4) {
		__u32 oa[2] = { p->key.saddr[0], p->key.daddr[0] };
		__u32 na[2] = { v->saddr[0], v->daddr[0] };

		diff = bpf_csum_diff(oa, 8, na, 8, 0);
		if (diff < 0 || bpf_skb_store_bytes(skb, p->l3_off + 12, na, 8, 0))
			return TC_ACT_SHOT;
		if (bpf_l3_csum_replace(skb, p->l3_off + 10, 0, diff, 0))
			return TC_ACT_SHOT;
	} else {
		__u32 oa[8], na[8];

		__builtin_memcpy(oa, p->key.saddr, 16);
		__builtin_memcpy(&oa[4], p->key.daddr, 16);
		__builtin_memcpy(na, v->saddr, 16);
		__builtin_memcpy(&na[4], v->daddr, 16);
		diff = bpf_csum_diff(oa, 32, na, 32, 0);
		if (diff < 0 || bpf_skb_store_bytes(skb, p->l3_off + 8, na, 32, 0))
			return TC_ACT_SHOT;
	}
	if (bpf_l4_csum_replace(skb, p->l4_off + 16, 0, diff, BPF_F_PSEUDO_HDR))
		return TC_ACT_SHOT;

	if (in_place) {
		skb->mark = SNI_PROXY_TS_MARK_DONE;
		return TC_ACT_UNSPEC;
	}
	skb->mark = SNI_PROXY_TS_MARK;
	/* Plain redirect only from lo to lo: the Ethernet header of any other device's packet
	 * carries MAC addresses the out device would not accept as its own. (lo to lo's own
	 * ingress, BPF_F_INGRESS, stalled the flow on 6.18: to lo's egress, which loops back.) */
	if ((v->flags & SNI_PROXY_TS_F_NEIGH) || skb->ifindex != v->ifindex)
		return bpf_redirect_neigh(v->ifindex, NULL, 0, 0);
	return bpf_redirect(v->ifindex, 0);
}

/* The proxy socket's copy of the backend packet that engaged the flow (see splice()), made
 * a pure ACK of at most the hand-over bytes: no payload (it would sit in the socket's receive
 * queue for the flow's life), no FIN (the socket's state stays as it is). Lengths and
 * checksums follow: the IPv4 header's, and the TCP pseudo-header's length, which is all a
 * CHECKSUM_PARTIAL skb (loopback, veth) carries; a device that verified the checksum
 * (CHECKSUM_UNNECESSARY) is not checked again. Other skbs fail the stack's check and the
 * socket keeps retransmitting, as before. */
static __always_inline int ack_only(struct __sk_buff *skb, struct parsed *p,
				    struct sni_proxy_ts_dir *v)
{
	__u32 old_len = p->l4_len, new_len = p->hlen, ack, end;
	__u16 word, nword;

	if (old_len > new_len) {
		if (bpf_skb_change_tail(skb, p->l4_off + new_len, 0))
			return TC_ACT_SHOT;
		if (p->key.family == 4) {
			__be16 o, n = bpf_htons(new_len + 20);

			/* the field as it was (0 for a BIG TCP packet) */
			if (bpf_skb_load_bytes(skb, p->l3_off + 2, &o, 2) ||
			    bpf_skb_store_bytes(skb, p->l3_off + 2, &n, 2, 0) ||
			    bpf_l3_csum_replace(skb, p->l3_off + 10, o, n, 2))
				return TC_ACT_SHOT;
		} else {
			__be16 n = bpf_htons(new_len);

			if (bpf_skb_store_bytes(skb, p->l3_off + 4, &n, 2, 0))
				return TC_ACT_SHOT;
		}
		/* 32-bit: a BIG TCP length does not fit 16 bits; summed as two halves, which is
		 * how the pseudo-header sum took it */
		if (bpf_l4_csum_replace(skb, p->l4_off + 16, bpf_htonl(old_len), bpf_htonl(new_len),
					BPF_F_PSEUDO_HDR | 4))
			return TC_ACT_SHOT;
	}
	if (p->flags & TH_FIN) {
		if (bpf_skb_load_bytes(skb, p->l4_off + 12, &word, 2))
			return TC_ACT_SHOT;
		nword = word & ~bpf_htons(TH_FIN);
		if (bpf_skb_store_bytes(skb, p->l4_off + 12, &nword, 2, 0) ||
		    bpf_l4_csum_replace(skb, p->l4_off + 16, word, nword, 2))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_load_bytes(skb, p->l4_off + 8, &ack, 4))
		return TC_ACT_SHOT;
	if ((__s32)(bpf_ntohl(ack) - v->handover_end) > 0) {
		/* client bytes spliced after the hand-over: the socket never sent those */
		end = bpf_htonl(v->handover_end);
		if (bpf_skb_store_bytes(skb, p->l4_off + 8, &end, 4, 0) ||
		    bpf_l4_csum_replace(skb, p->l4_off + 16, ack, end, 4))
			return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int sni_proxy_tsi(struct __sk_buff *skb)
{
	struct parsed p = {};
	struct sni_proxy_ts_dir *v;
	bool ack_copy = skb->mark == SNI_PROXY_TS_MARK_ACK;

	/* Rewritten in place as it left lo (sni_proxy_tse): now a packet of the other
	 * connection, for the stack. The mark goes, and so does a parse and a lookup per
	 * spliced packet on lo (a third of the per-packet cost there). */
	if (skb->mark == SNI_PROXY_TS_MARK_DONE) {
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	/* The proxy socket's copy of a backend ACK (see splice()): for the stack, untouched. */
	if (skb->mark == SNI_PROXY_TS_MARK_PASS) {
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	if (ack_copy)
		skb->mark = 0;
	if (parse(skb, &p))
		return TC_ACT_UNSPEC;
	v = bpf_map_lookup_elem(&sni_proxy_tsfw, &p.key);
	if (!v)
		return TC_ACT_UNSPEC;
	if (ack_copy)
		return ack_only(skb, &p, v);
	return splice(skb, &p, v, false);
}

SEC("tc")
int sni_proxy_tse(struct __sk_buff *skb)
{
	struct parsed p = {};
	struct sni_proxy_ts_dir *v;
	struct sni_proxy_ts_flow *f;
	__u32 seq, addr[4];
	__u16 port;

	/* A spliced packet on its way out: not the proxy's, pass (and give the mark back). */
	if (skb->mark == SNI_PROXY_TS_MARK) {
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	/* The proxy socket's copy of a backend ACK, cloned here on lo (see splice()): out of lo
	 * and back in, where the ingress hook lets it through by its mark. */
	if (skb->mark == SNI_PROXY_TS_MARK_PASS)
		return TC_ACT_UNSPEC;
	if (skb->mark == SNI_PROXY_TS_MARK_ACK) {
		skb->mark = SNI_PROXY_TS_MARK_PASS;
		if (parse(skb, &p))
			return TC_ACT_UNSPEC;
		v = bpf_map_lookup_elem(&sni_proxy_tsfw, &p.key);
		return v ? ack_only(skb, &p, v) : TC_ACT_SHOT;
	}
	if (parse(skb, &p))
		return TC_ACT_UNSPEC;
	/* A local client's or backend's packet to a proxy socket, on its way out of lo: spliced
	 * here, it crosses lo once. Left to the ingress hook, it would cross it twice (rewritten
	 * at ingress, redirected to lo's egress, looped back to ingress): twice the softirq
	 * work per packet when both ends are on this host. */
	v = bpf_map_lookup_elem(&sni_proxy_tsfw, &p.key);
	if (v) {
		if (v->ifindex == skb->ifindex && !(v->flags & SNI_PROXY_TS_F_NEIGH))
			return splice(skb, &p, v, true);
		return TC_ACT_UNSPEC;		/* leaves by another device: ingress redirects it */
	}
	/* A packet the proxy's socket sends is the reverse of the tuple it receives on (turned
	 * in place: the stack has no room for a second key next to splice()'s). */
	__builtin_memcpy(addr, p.key.saddr, 16);
	__builtin_memcpy(p.key.saddr, p.key.daddr, 16);
	__builtin_memcpy(p.key.daddr, addr, 16);
	port = p.key.sport;
	p.key.sport = p.key.dport;
	p.key.dport = port;
	v = bpf_map_lookup_elem(&sni_proxy_tsfw, &p.key);
	if (!v)
		return TC_ACT_UNSPEC;
	if (p.flags & TH_SYN) {
		/* The proxy connects again from the local port of a finished flow (user space
		 * closes the kept backend socket at the flow's end, so the port is free while the
		 * entries linger for retransmitted FINs): the lingering entries go now, or they
		 * would freeze the new connection's ACK and splice its backend's packets. */
		f = bpf_map_lookup_elem(&sni_proxy_tsfl, &v->flow);
		if (v->dir == SNI_PROXY_TS_B2C && f && f->reported) {
			struct sni_proxy_ts_key c2b = { .family = p.key.family };

			__builtin_memcpy(c2b.saddr, v->daddr, 16);
			__builtin_memcpy(c2b.daddr, v->saddr, 16);
			c2b.sport = v->dport;
			c2b.dport = v->sport;
			bpf_map_delete_elem(&sni_proxy_tsfw, &c2b);
			bpf_map_delete_elem(&sni_proxy_tsfw, &p.key);
		}
		return TC_ACT_UNSPEC;
	}
	if (v->dir == SNI_PROXY_TS_B2C) {
		/* The proxy's backend socket: its hand-over bytes (and their retransmissions) must
		 * reach the backend; its ACKs, window updates and FIN must not. */
		if (bpf_skb_load_bytes(skb, p.l4_off + 4, &seq, 4))
			return TC_ACT_UNSPEC;
		seq = bpf_ntohl(seq);
		if (p.l4_len > p.hlen && (__s32)(seq - v->handover_end) < 0)
			return TC_ACT_UNSPEC;
	}
	f = bpf_map_lookup_elem(&sni_proxy_tsfl, &v->flow);
	if (f)
		__sync_fetch_and_add(&f->frozen, 1);
	stat(TS_STAT_FROZEN, 1);
	return TC_ACT_SHOT;
}
