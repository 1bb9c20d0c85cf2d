/* The tcp_splice hand-over's socket reader: getsockopt(SOL_TCP, SNI_PROXY_SOCKSTATE_OPT) on a
 * TCP socket returns struct sni_proxy_sockstate (addresses, sequence numbers, negotiated
 * options), read under the socket lock in one system call.
 *
 * Without it the hand-over needs 10-12 calls per socket: TCP_INFO, getsockname, getpeername,
 * TIOCOUTQ, and TCP_REPAIR on/off around TCP_QUEUE_SEQ reads of both queues and
 * TCP_TIMESTAMP, with SIOCINQ twice around the receive sequence (copied_seq is not readable
 * there). A cgroup getsockopt program runs after the kernel's own getsockopt, with the socket
 * locked (see __cgroup_bpf_run_filter_getsockopt); for an option TCP does not know it turns
 * ENOPROTOOPT into an answer. Every other getsockopt in the cgroup returns at the first test.
 *
 * The struct tcp_sock is reached with bpf_rdonly_cast (kernel 6.2+: reads only, CAP_PERFMON);
 * CO-RE relocates the fields. Shared with src/sniproxy/ebpf/sockstate.py (layout checked
 * against this object's BTF at load).
 */
#include "sni_proxy_common.h"

#define SOL_TCP 6
#define AF_INET 2
#define AF_INET6 10
#include "sni_proxy_sockstate.h"

/* Puts the struct in the object's BTF (a local variable's type is not), for the layout check. */
const volatile struct sni_proxy_sockstate sni_proxy_sst_layout = {};

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

static __always_inline bool v4_mapped(const struct in6_addr *a)
{
	return a->in6_u.u6_addr32[0] == 0 && a->in6_u.u6_addr32[1] == 0 &&
	       a->in6_u.u6_addr32[2] == bpf_htonl(0xffff);
}

SEC("cgroup/getsockopt")
int sni_proxy_sst(struct bpf_sockopt *ctx)
{
	struct sni_proxy_sockstate *out = ctx->optval;
	struct bpf_sock *bsk = ctx->sk;
	struct tcp_sock *tp;
	struct sock_common *skc;

	if (ctx->level != SOL_TCP || ctx->optname != SNI_PROXY_SOCKSTATE_OPT)
		return 1;
	if (!bsk || (void *)(out + 1) > ctx->optval_end)
		return 1;	/* the caller's buffer is too small: ENOPROTOOPT stays */
	if (bsk->protocol != IPPROTO_TCP || (bsk->family != AF_INET && bsk->family != AF_INET6))
		return 1;
	tp = bpf_rdonly_cast(bsk, bpf_core_type_id_kernel(struct tcp_sock));
	skc = &tp->inet_conn.icsk_inet.sk.__sk_common;

	if (skc->skc_family == AF_INET6 && !v4_mapped(&skc->skc_v6_daddr)) {
		out->family = 6;
		__builtin_memcpy(out->local_addr, &skc->skc_v6_rcv_saddr, 16);
		__builtin_memcpy(out->peer_addr, &skc->skc_v6_daddr, 16);
	} else {
		out->family = 4;
		__builtin_memset(out->local_addr, 0, 16);
		__builtin_memset(out->peer_addr, 0, 16);
		__builtin_memcpy(out->local_addr, &skc->skc_rcv_saddr, 4);
		__builtin_memcpy(out->peer_addr, &skc->skc_daddr, 4);
	}
	out->local_port = skc->skc_num;
	out->peer_port = bpf_ntohs(skc->skc_dport);
	out->state = skc->skc_state;

	__u8 options = 0;
	if (BPF_CORE_READ_BITFIELD(tp, rx_opt.tstamp_ok))
		options |= SNI_PROXY_SS_TIMESTAMPS;
	if (BPF_CORE_READ_BITFIELD(tp, rx_opt.sack_ok))
		options |= SNI_PROXY_SS_SACK;
	if (BPF_CORE_READ_BITFIELD(tp, rx_opt.wscale_ok)) {
		options |= SNI_PROXY_SS_WSCALE;
		out->wscale = BPF_CORE_READ_BITFIELD(tp, rx_opt.snd_wscale) |
			      BPF_CORE_READ_BITFIELD(tp, rx_opt.rcv_wscale) << 4;
	} else {
		out->wscale = 0;
	}
	if (bpf_core_field_exists(tp->tcp_usec_ts) && BPF_CORE_READ_BITFIELD(tp, tcp_usec_ts))
		options |= SNI_PROXY_SS_USEC_TS;
	out->options = options;

	out->copied_seq = tp->copied_seq;
	out->rcv_nxt = tp->rcv_nxt;
	out->write_seq = tp->write_seq;
	out->snd_una = tp->snd_una;
	out->tsoffset = tp->tsoffset;
	out->snd_mss = tp->mss_cache;
	out->advmss = tp->advmss;
	out->pmtu = tp->inet_conn.icsk_pmtu_cookie;

	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
