// SPDX-License-Identifier: GPL-2.0
/* TCP tracer: lifecycle rows (bcc tcplife), connect latency and failures (tcpconnlat) and
 * retransmits (tcpretrans), from sock:inet_sock_set_state and tcp:tcp_retransmit_skb.
 *
 * Both hooks are tp_btf programs with raw_tp twins for kernels that refuse tp_btf; user
 * space loads one set. Events go to user space through one ring buffer; a full ring is
 * counted (TCP_STAT_RING_FULL), never silent. Per-socket state lives in a bounded hash
 * keyed by the socket's address, removed at TCP_CLOSE.
 */
#include "sni_proxy_common.h"
#include "sni_proxy_trace.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MAX_PORTS 8

const volatile __u32 filter_tgid = 0;		/* 0: every process */
const volatile __u8 filter_family = 0;		/* 0, AF_INET or AF_INET6 */
const volatile __u16 filter_lports[MAX_PORTS] = {};
const volatile __u32 filter_nlports = 0;
const volatile __u16 filter_dports[MAX_PORTS] = {};
const volatile __u32 filter_ndports = 0;
const volatile bool emit_close = true;
const volatile bool emit_connect = true;
/* tcp_retransmit_skb gained a third argument (int err) in 2025; user space reads the
 * tracepoint's BTF prototype and tells us, so an older kernel never sees the read. */
const volatile bool retrans_has_err = false;
/* The proxy's mode (ebpf.tracing.network): only sockets whose cookie the proxy put in
 * sni_proxy_tcrt are looked at, and their figures go to per-route counters instead of the
 * ring. Every other TCP socket of the machine costs one hash lookup per state change. */
const volatile bool scope_cookies = false;

enum tcp_stat {
	TCP_STAT_RING_FULL = 0,	/* event lost: ring buffer full (user space too slow) */
	TCP_STAT_SOCKS_FULL,	/* socket not tracked: sni_proxy_tcsk full */
	TCP_STAT_EVENTS,	/* events submitted */
	TCP_STAT_MAX,
};
/* Types reach BTF only when a variable has them: these let user space check how it reads the
 * counters, the ring's events and the per-route figures at open (ebpf/layout.py). The event
 * anchor is a pointer, as cilium/ebpf's examples force `struct event` into the ELF. */
const volatile enum tcp_stat sni_proxy_tcp_stat_slots = TCP_STAT_MAX;
const volatile enum tcp_event_kind sni_proxy_tcp_event_kind = TCP_EV_CLOSE;
const struct tcp_event *const sni_proxy_tcp_event_type = 0;

struct sock_info {
	__u64 birth_ns;		/* first state change: lifetime starts here */
	__u64 syn_ns;		/* SYN_SENT: connect latency starts here, 0 otherwise */
	__u32 tgid;
	__u32 tid;
	char comm[TASK_COMM_LEN];
	/* The flow as seen when ESTABLISHED: by the time TCP_CLOSE is traced the kernel has
	 * already released the local port (inet_put_port zeroes it). */
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);		/* struct sock * */
	__type(value, struct sock_info);
	__uint(max_entries, 65536);	/* concurrent TCP sockets tracked; set before load */
} sni_proxy_tcsk SEC(".maps");

struct route_tag {
	__u32 route;		/* crc32 of the route name (user space keeps the names) */
	__u32 side;		/* 0: backend socket, 1: client socket */
};

enum fail_reason { FAIL_REFUSED, FAIL_RESET, FAIL_TIMED_OUT, FAIL_UNREACHABLE, FAIL_ABORTED,
		   FAIL_OTHER, FAIL_MAX };
const volatile enum fail_reason sni_proxy_tcp_fail_slots = FAIL_MAX;

struct route_stats {
	__u64 connect_hist[HIST_SLOTS];	/* log2 us of SYN_SENT -> ESTABLISHED */
	__u64 connects;
	__u64 connect_sum_us;
	__u64 connect_fail[FAIL_MAX];
	__u64 retrans_segs;
	__u64 closes;
	__u64 srtt_sum_us;		/* smoothed RTT at close, summed over closes */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);		/* socket cookie (SO_COOKIE) */
	__type(value, struct route_tag);
	__uint(max_entries, 65536);	/* sockets of the proxy at once; LRU: a leak cannot fill it */
} sni_proxy_tcrt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);		/* struct sock * in SYN_SENT */
	__type(value, __u64);		/* bpf_ktime_get_ns() of the SYN */
	__uint(max_entries, 16384);	/* connects in flight */
} sni_proxy_tcsy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct route_tag);
	__type(value, struct route_stats);
	__uint(max_entries, 1024);	/* (route, side) pairs */
} sni_proxy_tcagg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);	/* bytes; ~7000 events; set before load */
} sni_proxy_tcrb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, TCP_STAT_MAX);
} sni_proxy_tcsta SEC(".maps");

static __always_inline bool port_in(const volatile __u16 *ports, __u32 n, __u16 port)
{
	for (int i = 0; i < MAX_PORTS; i++) {
		if (i >= n)
			break;
		if (ports[i] == port)
			return true;
	}
	return false;
}

/* The local port from inet_sport, not skc_num: TCP_CLOSE is traced after inet_put_port()
 * zeroed skc_num, and -L must still match the row emitted there. */
static __always_inline __u16 local_port(const struct sock *sk)
{
	return bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
}

static __always_inline __u16 remote_port(const struct sock *sk)
{
	return bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
}

/* Port filters. A port of 0 is not known yet (an active open before connect() picked its
 * port, a passive child before the peer's port is copied in): `known_only` lets it pass while
 * the socket is followed, the final check before a row is emitted (known_only false) does not. */
static __always_inline bool ports_wanted(__u16 lport, __u16 dport, bool known_only)
{
	if (filter_nlports && (lport || !known_only) &&
	    !port_in(filter_lports, filter_nlports, lport))
		return false;
	if (filter_ndports && (dport || !known_only) &&
	    !port_in(filter_dports, filter_ndports, dport))
		return false;
	return true;
}

/* Family and the ports known so far; the process filter is applied by the callers (it
 * needs sock_info). */
static __always_inline bool flow_wanted(const struct sock *sk, __u16 family)
{
	if (filter_family && family != filter_family)
		return false;
	if (!filter_nlports && !filter_ndports)
		return true;
	return ports_wanted(local_port(sk), remote_port(sk), true);
}

static __always_inline void fill_flow(struct tcp_event *e, const struct sock *sk, __u16 family)
{
	e->family = family;
	e->sport = local_port(sk);
	e->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	/* explicit sizes: BPF_CORE_READ_INTO on an array would copy one element */
	if (family == AF_INET) {
		bpf_core_read(e->saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(e->daddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_core_read(e->saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(e->daddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
	e->cookie = (__u64)sk;
	e->ts_ns = bpf_ktime_get_ns();
}

#define SHUTDOWN_MASK 3		/* RCV_SHUTDOWN | SEND_SHUTDOWN (include/net/sock.h) */
#define ECONNRESET 104
#define ECONNREFUSED 111
#define ETIMEDOUT 110
#define EHOSTUNREACH 113

/* sk_err of a connect that left SYN_SENT for CLOSE, as the application will see it.
 *
 * tcp_reset() (RST answering the SYN: ECONNREFUSED), ICMP errors (tcp_v4_err/tcp_v6_err)
 * and the SYN timer (tcp_write_err: sk_err_soft or ETIMEDOUT) store sk_err before the state
 * change; tcp_disconnect() (connect(AF_UNSPEC) or shutdown() on a connecting socket)
 * stores ECONNRESET just after it, so the tracepoint reads 0 there. An application's
 * close() marks the socket fully shut down first (__tcp_close), and a connect that failed
 * before its SYN left (no local port: inet_hash_connect) has sent nothing: both keep 0,
 * "aborted".
 *
 * sk_err is also read-and-cleared by the application (SO_ERROR, sock_error()) without the
 * socket lock: an application that polls or reads SO_ERROR on another CPU between the
 * kernel storing the error and this tracepoint takes it first, and sk_err reads 0 here
 * (seen under load: three tracers on one close, the first read EHOSTUNREACH and the second
 * 0). So 0 is not taken as "disconnected": what closed the socket says which error it was.
 *  - the SYN timer gave up: tcp_write_timer_handler() clears icsk_pending before running
 *    tcp_retransmit_timer(), every other path closes with the timer still pending;
 *  - a RST: the only segment that closes a SYN_SENT socket, and tcp_v4_rcv/tcp_v6_rcv
 *    count every segment in segs_in before processing it (an ICMP error is not counted);
 *  - tcp_disconnect(): runs in the process that holds the socket lock (lock_sock), while
 *    softirq paths (ICMP, RST, timer) only close a socket nobody owns;
 *  - else an ICMP error: its errno is not kept anywhere else, but one that came while the
 *    socket was locked is in sk_err_soft; EHOSTUNREACH otherwise (host and admin-prohibited
 *    unreachables, time exceeded: the usual ones). */
static __always_inline int connect_error(const struct sock *sk)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	int err = BPF_CORE_READ(sk, sk_err);
	int soft;

	if (err)
		return err;
	if (BPF_CORE_READ(sk, sk_shutdown) == SHUTDOWN_MASK || BPF_CORE_READ(tp, segs_out) == 0)
		return 0;
	soft = BPF_CORE_READ(sk, sk_err_soft);
	if (!BPF_CORE_READ((const struct inet_connection_sock *)sk, icsk_pending))
		return soft ? soft : ETIMEDOUT;
	if (BPF_CORE_READ(tp, segs_in) > 0)
		return ECONNREFUSED;
	if (BPF_CORE_READ(sk, sk_lock.owned))
		return ECONNRESET;
	return soft ? soft : EHOSTUNREACH;
}

static __always_inline struct tcp_event *reserve(void)
{
	struct tcp_event *e = bpf_ringbuf_reserve(&sni_proxy_tcrb, sizeof(*e), 0);

	if (!e) {
		sni_proxy_count(&sni_proxy_tcsta, TCP_STAT_RING_FULL, 1);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	return e;
}

/* No wake-up per event: user space drains the ring every POLL_TIMEOUT_MS anyway, and a
 * wake-up per event (two per connection and more) costs a context switch each on a busy
 * machine. Only a ring filling up (a quarter of it) wakes the reader early. */
static __always_inline void submit(struct tcp_event *e)
{
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_query(&sni_proxy_tcrb, BPF_RB_AVAIL_DATA) >
	    bpf_ringbuf_query(&sni_proxy_tcrb, BPF_RB_RING_SIZE) / 4)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, flags);
	sni_proxy_count(&sni_proxy_tcsta, TCP_STAT_EVENTS, 1);
}

static __always_inline void set_ident(struct sock_info *info)
{
	__u64 id = bpf_get_current_pid_tgid();

	info->tgid = id >> 32;
	info->tid = (__u32)id;
	bpf_get_current_comm(info->comm, sizeof(info->comm));
}

static __always_inline void copy_ident(struct tcp_event *e, struct sock_info *info)
{
	e->tgid = info->tgid;
	e->tid = info->tid;
	__builtin_memcpy(e->comm, info->comm, sizeof(e->comm));
}

/* bytes_acked counts sequence numbers: the SYN of an active open and our FIN once acked
 * are one each; the row reports application bytes. */
static __always_inline __u64 payload_sent(const struct sock *sk, const struct tcp_sock *tp,
					  struct sock_info *info, int oldstate)
{
	__u64 acked = BPF_CORE_READ(tp, bytes_acked);
	bool fin_sent = oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 ||
			oldstate == TCP_CLOSING || oldstate == TCP_LAST_ACK;

	if (info->syn_ns && acked)
		acked--;
	/* write_seq includes a queued FIN: everything up to it acknowledged means the FIN too */
	if (fin_sent && acked && BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
		acked--;
	return acked;
}

/* bytes_received includes the peer's FIN; tcp_fin() marks its receipt with SOCK_DONE. */
static __always_inline __u64 payload_received(const struct sock *sk, const struct tcp_sock *tp)
{
	__u64 received = BPF_CORE_READ(tp, bytes_received);
	unsigned long flags = BPF_CORE_READ(sk, __sk_common.skc_flags);

	if ((flags & (1UL << SOCK_DONE)) && received)
		received--;
	return received;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 slot = 0;

	if (v >= 1ULL << 16) { v >>= 16; slot += 16; }
	if (v >= 1ULL << 8) { v >>= 8; slot += 8; }
	if (v >= 1ULL << 4) { v >>= 4; slot += 4; }
	if (v >= 1ULL << 2) { v >>= 2; slot += 2; }
	if (v >= 1ULL << 1) { slot += 1; }
	return slot < HIST_SLOTS ? slot : HIST_SLOTS - 1;
}

static __always_inline struct route_tag *route_of(const struct sock *sk)
{
	__u64 cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);

	if (!cookie)	/* never asked for: not one of the proxy's sockets */
		return NULL;
	return bpf_map_lookup_elem(&sni_proxy_tcrt, &cookie);
}

static __always_inline struct route_stats *route_stats(struct route_tag *tag)
{
	struct route_stats zero = {}, *st;

	st = bpf_map_lookup_elem(&sni_proxy_tcagg, tag);
	if (st)
		return st;
	bpf_map_update_elem(&sni_proxy_tcagg, tag, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&sni_proxy_tcagg, tag);
}

static __always_inline __u32 fail_reason(int err)
{
	switch (err) {
	case 111: return FAIL_REFUSED;		/* ECONNREFUSED */
	case 104: return FAIL_RESET;		/* ECONNRESET */
	case 110: return FAIL_TIMED_OUT;	/* ETIMEDOUT */
	case 113: case 101: case 112: case 100: return FAIL_UNREACHABLE;
	case 0: return FAIL_ABORTED;
	default: return FAIL_OTHER;
	}
}

/* Per-route counters of the proxy's own sockets (scope_cookies). */
static __always_inline int route_state(const struct sock *sk, int oldstate, int newstate)
{
	struct route_tag *tag = route_of(sk);
	struct route_stats *st;
	__u64 key = (__u64)sk, *syn, now;
	__u32 reason;

	if (!tag)
		return 0;
	if (newstate == TCP_SYN_SENT) {
		now = bpf_ktime_get_ns();
		bpf_map_update_elem(&sni_proxy_tcsy, &key, &now, BPF_ANY);
		return 0;
	}
	st = route_stats(tag);
	if (!st)
		return 0;
	if (oldstate == TCP_SYN_SENT) {
		syn = bpf_map_lookup_elem(&sni_proxy_tcsy, &key);
		if (newstate == TCP_ESTABLISHED && syn) {
			now = (bpf_ktime_get_ns() - *syn) / 1000;
			st->connects += 1;	/* per-CPU value: plain adds */
			st->connect_sum_us += now;
			st->connect_hist[log2_slot(now)] += 1;
		} else if (newstate == TCP_CLOSE) {
			reason = fail_reason(connect_error(sk));
			if (reason < FAIL_MAX)
				st->connect_fail[reason] += 1;
		}
		if (syn)
			bpf_map_delete_elem(&sni_proxy_tcsy, &key);
	}
	if (newstate == TCP_CLOSE && oldstate != TCP_SYN_SENT) {
		st->closes += 1;
		st->srtt_sum_us += BPF_CORE_READ((struct tcp_sock *)sk, srtt_us) >> 3;
	}
	if (newstate == TCP_CLOSE) {
		key = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
		bpf_map_delete_elem(&sni_proxy_tcrt, &key);	/* the cookie is never reused */
	}
	return 0;
}

static __always_inline int on_state(const struct sock *sk, int oldstate, int newstate)
{
	__u64 key = (__u64)sk;
	struct sock_info *info, fresh = {};
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct tcp_event *e;
	__u16 family;
	bool birth;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	if (scope_cookies)
		return route_state(sk, oldstate, newstate);
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (!flow_wanted(sk, family)) {
		/* A socket followed while one of its ports was unknown, now known and not
		 * wanted: forget it here, its TCP_CLOSE will not get this far either. */
		if (filter_nlports || filter_ndports)
			bpf_map_delete_elem(&sni_proxy_tcsk, &key);
		return 0;
	}

	info = bpf_map_lookup_elem(&sni_proxy_tcsk, &key);
	birth = newstate == TCP_SYN_SENT || newstate == TCP_SYN_RECV;
	if (!info || birth) {
		/* Only births: a socket opened before we attached has no row (its lifetime and
		 * byte counts would be wrong). Passive children appear at SYN_RECV or at their
		 * SYN_RECV -> ESTABLISHED step. A birth always starts afresh: an entry found
		 * then belongs to an earlier life of this address (a connect() again after a
		 * failed one, or a socket freed without a traced TCP_CLOSE). */
		if (!birth && !(oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED))
			return 0;
		fresh.birth_ns = bpf_ktime_get_ns();
		/* Process context only for an active open; a passive child is created in
		 * softirq, its owner is learnt when the application closes it. */
		if (newstate == TCP_SYN_SENT)
			set_ident(&fresh);
		if (bpf_map_update_elem(&sni_proxy_tcsk, &key, &fresh, BPF_ANY)) {
			sni_proxy_count(&sni_proxy_tcsta, TCP_STAT_SOCKS_FULL, 1);
			return 0;
		}
		info = bpf_map_lookup_elem(&sni_proxy_tcsk, &key);
		if (!info)
			return 0;
	}
	if (newstate == TCP_SYN_SENT) {
		info->syn_ns = bpf_ktime_get_ns();
		set_ident(info);
	} else if (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK) {
		/* close()/shutdown() by the application: its process context */
		set_ident(info);
	}

	if (newstate == TCP_ESTABLISHED) {
		struct tcp_event flow = {};

		fill_flow(&flow, sk, family);
		__builtin_memcpy(info->saddr, flow.saddr, sizeof(info->saddr));
		__builtin_memcpy(info->daddr, flow.daddr, sizeof(info->daddr));
		info->sport = flow.sport;
		info->dport = flow.dport;
	}

	if (oldstate == TCP_SYN_SENT && (newstate == TCP_ESTABLISHED || newstate == TCP_CLOSE)) {
		if (emit_connect && (!filter_tgid || info->tgid == filter_tgid) &&
		    ports_wanted(local_port(sk), remote_port(sk), false) && (e = reserve())) {
			fill_flow(e, sk, family);
			copy_ident(e, info);
			e->duration_ns = e->ts_ns - info->syn_ns;
			if (newstate == TCP_CLOSE) {
				e->kind = TCP_EV_CONNECT_FAIL;
				e->err = connect_error(sk);
			} else {
				e->kind = TCP_EV_CONNECT;
				e->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
			}
			submit(e);
		}
	}
	if (newstate != TCP_CLOSE)
		return 0;
	if (emit_close && oldstate != TCP_SYN_SENT &&
	    (!filter_tgid || info->tgid == filter_tgid) &&
	    ports_wanted(info->sport ? info->sport : local_port(sk),
			 info->sport ? info->dport : remote_port(sk), false) && (e = reserve())) {
		fill_flow(e, sk, family);
		copy_ident(e, info);
		if (info->sport) {
			__builtin_memcpy(e->saddr, info->saddr, sizeof(e->saddr));
			__builtin_memcpy(e->daddr, info->daddr, sizeof(e->daddr));
			e->sport = info->sport;
			e->dport = info->dport;
		}
		e->kind = TCP_EV_CLOSE;
		e->state = oldstate;
		e->duration_ns = e->ts_ns - info->birth_ns;
		e->bytes_acked = payload_sent(sk, tp, info, oldstate);
		e->bytes_received = payload_received(sk, tp);
		e->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
		e->total_retrans = BPF_CORE_READ(tp, total_retrans);
		e->err = BPF_CORE_READ(sk, sk_err);
		submit(e);
	}
	bpf_map_delete_elem(&sni_proxy_tcsk, &key);
	return 0;
}

static __always_inline int on_retrans(const struct sock *sk, const struct sk_buff *skb, int err)
{
	__u64 key = (__u64)sk;
	struct sock_info *info;
	struct tcp_event *e;
	__u16 family;
	void *cb;

	if (scope_cookies) {
		struct route_tag *tag = route_of(sk);
		struct route_stats *st = tag ? route_stats(tag) : NULL;

		if (st) {
			cb = (void *)skb + bpf_core_field_offset(struct sk_buff, cb);
			st->retrans_segs += BPF_CORE_READ((struct tcp_skb_cb *)cb, tcp_gso_segs);
		}
		return 0;
	}
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (!flow_wanted(sk, family))
		return 0;
	info = bpf_map_lookup_elem(&sni_proxy_tcsk, &key);
	if (filter_tgid && (!info || info->tgid != filter_tgid))
		return 0;
	e = reserve();
	if (!e)
		return 0;
	fill_flow(e, sk, family);
	if (info)
		copy_ident(e, info);
	e->kind = TCP_EV_RETRANS;
	e->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->err = err;
	/* TCP_SKB_CB(skb)->tcp_gso_segs: a GSO skb retransmits several segments at once and
	 * RetransSegs counts every one of them. */
	cb = (void *)skb + bpf_core_field_offset(struct sk_buff, cb);
	e->segs = BPF_CORE_READ((struct tcp_skb_cb *)cb, tcp_gso_segs);
	e->srtt_us = BPF_CORE_READ((struct tcp_sock *)sk, srtt_us) >> 3;
	e->total_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	submit(e);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(sni_proxy_tcstb, const struct sock *sk, const int oldstate, const int newstate)
{
	return on_state(sk, oldstate, newstate);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(sni_proxy_tcstr, const struct sock *sk, const int oldstate, const int newstate)
{
	return on_state(sk, oldstate, newstate);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(sni_proxy_tcrtb, const struct sock *sk, const struct sk_buff *skb)
{
	int err = 0;

	if (retrans_has_err)
		err = (int)ctx[2];
	return on_retrans(sk, skb, err);
}

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(sni_proxy_tcrtr, const struct sock *sk, const struct sk_buff *skb)
{
	int err = 0;

	if (retrans_has_err)
		err = (int)ctx[2];
	return on_retrans(sk, skb, err);
}

char LICENSE[] SEC("license") = "GPL";
