/* Structures shared by sni_proxy_tcp_splice.bpf.c and src/sniproxy/ebpf/tcpsplice.py (which
 * describes each with a StructLayout, checked against this object's BTF at load: a change on
 * one side alone fails there, naming the field).
 *
 * A spliced connection is two map entries, one per direction, keyed by the 4-tuple of the
 * packets that arrive at the proxy (client -> listener, backend -> proxy's local port), and
 * one slot in the flow-state array that both entries point to.
 */
#ifndef SNI_PROXY_TCP_SPLICE_H
#define SNI_PROXY_TCP_SPLICE_H

#define SNI_PROXY_TS_C2B 0	/* packets from the client, rewritten into the backend connection */
#define SNI_PROXY_TS_B2C 1	/* packets from the backend, rewritten into the client connection */

/* sni_proxy_ts_dir.flags */
#define SNI_PROXY_TS_F_TSTAMP 1	/* both connections use TCP timestamps: translate them */
#define SNI_PROXY_TS_F_NEIGH 2	/* out device has neighbours (Ethernet): bpf_redirect_neigh */
#define SNI_PROXY_TS_F_HOLD 4	/* B2C during the insertion: drop (the backend retransmits) */

/* sni_proxy_ts_event.why */
#define SNI_PROXY_TS_EV_FIN 1	/* both directions sent FIN and saw it acknowledged */
#define SNI_PROXY_TS_EV_RST 2	/* a RST went through (either way) */
/* End events wake the worker only once this many bytes wait in its ring (about 340 events):
 * below that the worker drains the ring on a timer (relay/tcpsplice.py END_POLL_S), so a
 * busy worker is not woken once per finished connection (issue 14). */
#define SNI_PROXY_TS_RING_WAKE_BYTES (16 * 1024)

/* skb->mark of a spliced packet between the ingress redirect and the egress hook: tells it
 * apart from a packet of the proxy's own socket with the same 4-tuple (loopback). */
#define SNI_PROXY_TS_MARK 0x5e1f7c00
/* skb->mark of the copy of a backend ACK handed to the proxy's own socket (clone_redirect
 * back to ingress): the ingress program lets it through untouched. */
#define SNI_PROXY_TS_MARK_PASS 0x5e1f7c01
/* skb->mark of the copy of the backend packet that engaged the flow: the ingress program cuts
 * it down to a pure ACK of the hand-over bytes for the proxy's own socket (ack_only). */
#define SNI_PROXY_TS_MARK_ACK 0x5e1f7c02
/* skb->mark of a packet the egress hook of lo rewrote in place: it comes back to lo's ingress
 * as a packet of the other connection, which the ingress hook passes without a lookup. */
#define SNI_PROXY_TS_MARK_DONE 0x5e1f7c03

struct sni_proxy_ts_key {
	__u8 family;		/* 4 or 6 */
	__u8 pad[3];
	__u32 saddr[4];		/* IPv4: saddr[0] only, the rest zero; network byte order */
	__u32 daddr[4];
	__u16 sport;		/* network byte order */
	__u16 dport;
};

/* Written by user space only (replaced whole, never modified by BPF). */
struct sni_proxy_ts_dir {
	__u32 saddr[4];		/* the rewritten tuple: the other connection's */
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u32 seq_delta;	/* added to the sequence number */
	__u32 ack_delta;	/* added to the acknowledgement number and SACK edges */
	__u32 handover_end;	/* B2C: backend ACKs up to here acknowledge the proxy's own bytes */
	__u32 flow;		/* slot in sni_proxy_tsfl */
	__u32 ifindex;		/* redirect target (egress) */
	__u32 ts_base;		/* receiver-side socket's TCP_TIMESTAMP minus CLOCK_MONOTONIC ms */
	__u8 dir;		/* SNI_PROXY_TS_C2B / _B2C */
	__u8 flags;		/* SNI_PROXY_TS_F_* */
	__u8 win_shift_in;	/* window scale of the sender's connection */
	__u8 win_shift_out;	/* window scale the receiver applies */
	__u32 gen;		/* generation of the flow slot, echoed in events */
};

/* One direction's counters, written by every packet of that direction. A cache line of its
 * own: the two directions are usually handled on two CPUs (each packet in its sender's
 * context), and counters sharing a line made every packet take it from the other CPU. */
struct sni_proxy_ts_ctr {
	__u64 bytes;		/* payload bytes */
	__u64 packets;		/* segments (GSO counted per segment) */
	__u64 last_ns;		/* bpf_ktime_get_ns() of the last packet this way */
	__u32 nxt;		/* highest end of payload seen, in the receiver's space: the byte
				 * count without retransmissions (user space sets the start) */
	__u32 pad;
	__u64 pad2[4];
};

/* One per spliced connection, reset by user space at arm. The first line is written rarely
 * (first packets, FIN, RST, the proxy sockets' frozen packets) and read by every packet of
 * both directions; the per-direction counters follow, a line each. */
struct sni_proxy_ts_flow {
	__u32 ts_off[2];	/* TSval offset per direction, valid once ts_learned[dir] */
	__u32 fin_seq[2];	/* sequence number after the FIN, in the receiver's space */
	__u8 ts_learned[2];
	__u8 fin[2];		/* a FIN went this way */
	__u8 fin_acked[2];	/* ... and was acknowledged by the other side */
	__u8 rst;		/* 0, or 1 + the direction of the first RST */
	__u8 engaged;		/* the backend sent data/FIN/RST or acked past the hand-over */
	__u8 reported;		/* the end event was sent */
	__u8 pad[3];
	__u32 ring;		/* worker ring index in sni_proxy_tsrg */
	__u32 gen;
	__u32 pad2;
	__u64 frozen;		/* packets of the proxy's own sockets dropped by the egress hook */
	__u64 pad3[2];
	struct sni_proxy_ts_ctr ctr[2];
};

/* The flow's end, with what user space needs of its final state (so it reads no map). */
struct sni_proxy_ts_event {
	__u32 flow;
	__u32 gen;
	__u32 why;
	__u8 rst;		/* as in sni_proxy_ts_flow */
	__u8 fin[2];
	__u8 fin_acked[2];
	__u8 pad[3];
	__u32 fin_seq[2];
	__u32 nxt[2];
};

#endif
