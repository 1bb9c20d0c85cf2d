/* Structs shared by the tracers' BPF programs (sni_proxy_trace_*.bpf.c) and their Python
 * readers (the modules of sniproxy/observe/tracing). Python describes each struct and enum it
 * reads once (ebpf/layout.py StructLayout / EnumLayout) and checks that description against
 * this object's BTF when it opens it: a change here alone fails the load, naming the member.
 *
 * Names: programs and maps are "sni_proxy_" + at most 5 characters (the kernel keeps 15).
 */
#ifndef SNI_PROXY_TRACE_H
#define SNI_PROXY_TRACE_H

#define TASK_COMM_LEN 16
#define HIST_SLOTS 32		/* log2 buckets: 2^31 us is 35 minutes, longer goes to the last */

/* ---- syscalls ---------------------------------------------------------------------- */
struct sc_key {
	__u32 tgid;		/* 0 unless counting per process (-P) */
	__s32 nr;		/* syscall number */
};

struct sc_value {
	__u64 count;
	__u64 errors;		/* returned -1..-4095 */
	__u64 total_ns;		/* time in the syscall (only with latency on) */
};

struct sc_errkey {
	__u32 tgid;
	__s32 nr;
	__u32 err;		/* errno */
};

struct sc_hist {
	__u64 slots[HIST_SLOTS];	/* slot i: latency in [2^i, 2^(i+1)) us (slot 0: < 2 us) */
};

/* ---- TCP ----------------------------------------------------------------------------- */
enum tcp_event_kind {
	TCP_EV_CLOSE = 1,	/* lifecycle row (tcplife) */
	TCP_EV_CONNECT = 2,	/* SYN_SENT -> ESTABLISHED (tcpconnlat) */
	TCP_EV_CONNECT_FAIL = 3,/* SYN_SENT -> CLOSE; err says why */
	TCP_EV_RETRANS = 4,	/* one tcp_retransmit_skb (tcpretrans) */
};

struct tcp_event {
	__u8 kind;		/* enum tcp_event_kind */
	__u8 family;		/* AF_INET 2, AF_INET6 10 */
	__u8 state;		/* retrans: socket state; close: state before close */
	__u8 pad;
	__u32 tgid;		/* process that opened/closed it (best effort, as tcplife) */
	__u32 tid;
	__s32 err;		/* connect failure: sk_err (errno), retrans: error of the send */
	__u8 saddr[16];		/* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;		/* host order */
	__u16 dport;
	__u64 ts_ns;		/* bpf_ktime_get_ns() of the event */
	__u64 duration_ns;	/* close: lifetime, connect: latency */
	__u64 bytes_acked;	/* close: sent and acknowledged */
	__u64 bytes_received;	/* close */
	__u32 srtt_us;		/* smoothed RTT (srtt_us >> 3) */
	__u32 total_retrans;	/* close: retransmitted segments over the life */
	__u32 segs;		/* retrans: segments in the retransmitted skb */
	__u32 pad2;
	__u64 cookie;		/* socket address: the key of one flow while it lives */
	char comm[TASK_COMM_LEN];
};

/* ---- memory --------------------------------------------------------------------------- */
struct mem_alloc {
	__u64 size;
	__u64 ts_ns;
	__s32 stack_id;		/* user (or kernel) stack id, -errno when lost */
	__u32 tgid;
};

#endif
