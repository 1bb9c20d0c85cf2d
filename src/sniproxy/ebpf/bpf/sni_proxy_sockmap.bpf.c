// SPDX-License-Identifier: GPL-2.0
/* sni_proxy_sockmap: the kernel data path. Once the proxy has connected a client to its backend,
 * both sockets enter the maps below and every skb that arrives on one is redirected to the
 * egress of the other; Python only waits for the end of the connection.
 *
 * Maps (all keyed by socket cookie, SO_COOKIE):
 *   sni_proxy_sks   SOCKHASH, verdict program attached: the sockets being relayed.
 *   sni_proxy_dst   SOCKHASH, no program: the redirect targets (the same sockets). Separate
 *                   so that a source can leave sni_proxy_sks (end of its direction) while
 *                   the other direction still redirects into it.
 *   sni_proxy_conn  cookie -> {peer cookie, bytes/skbs redirected from this socket}. The byte
 *                   count is what user space compares with the peer's send queue before it
 *                   propagates a half-close (redirected bytes leave later, from a kworker).
 *   sni_proxy_cred  cookie -> {credit, notified, ring, pause, copied}: when the bytes
 *                   redirected from a socket pass its credit, the program notifies user space
 *                   once, on the worker's ring; `pause` keeps bytes in the socket (below).
 *   sni_proxy_rings one ring buffer per worker process (array of maps).
 *   sni_proxy_stat  per-CPU counters, summed in user space.
 *
 * Facts measured on 6.18 that shaped this program are in docs/kernel-datapath.md.
 */
#include "sni_proxy_common.h"

char LICENSE[] SEC("license") = "GPL";

/* 0 turns the per-CPU counters off (config ebpf.stats.enabled = false). */
const volatile __u32 sni_proxy_stats_on = 1;

enum sni_proxy_stat_slot {
	STAT_UP_SKBS,		/* client -> backend */
	STAT_UP_BYTES,
	STAT_DOWN_SKBS,		/* backend -> client */
	STAT_DOWN_BYTES,
	STAT_FIN_DROPS,		/* zero-length skbs (a FIN) dropped on purpose */
	STAT_NO_PEER,		/* a socket in sni_proxy_sks without a conn entry: passed locally */
	STAT_REDIRECT_FAIL,	/* the peer is no longer in sni_proxy_dst (closed): dropped */
	STAT_NOTIFY,		/* credit exceeded: user space told */
	STAT_NOTIFY_LOST,	/* ... but the worker's ring was missing or full */
	STAT_PASSED_BYTES,	/* bytes kept in a paused socket for user space */
	STAT_MAX,
};
/* Puts the enum into BTF for the layout check (enums no variable uses are dropped). */
const volatile enum sni_proxy_stat_slot sni_proxy_stat_slots = STAT_MAX;

#define DIR_UP 0
#define DIR_DOWN 1

struct sni_proxy_conn {
	__u64 peer;	/* cookie of the socket the bytes go to */
	__u64 bytes;	/* bytes redirected from this socket (written by BPF only) */
	__u64 skbs;
	__u64 passed;	/* bytes kept in this socket (SK_PASS) while paused */
	__u32 dir;	/* DIR_UP: this is the client socket */
	__u32 fin;	/* 1 once this socket's FIN (a zero-length skb) went through the program */
	__u32 passing;	/* 1 while paused: every skb stays in this socket, for user space */
	__u32 pad;
};

/* Written by user space (BPF only sets `notified`). */
struct sni_proxy_cred {
	__u64 credit;	/* notify once bytes > credit */
	__u64 copied;	/* bytes of `passed` that user space has moved to the peer */
	__u32 notified;	/* set by BPF when it notified; cleared by user space with a new credit */
	__u32 ring;	/* index in sni_proxy_rings of the worker that owns the connection */
	__u32 pause;	/* 1: keep new bytes in this socket instead of redirecting them */
	__u32 pad;
};

/* Sizes are set from user space at open (config ebpf.sockmap.max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sni_proxy_sks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sni_proxy_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sni_proxy_conn);
} sni_proxy_conn SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sni_proxy_cred);
} sni_proxy_cred SEC(".maps");

/* Template of the per-worker rings; user space creates the real ones (same type and size). */
struct sni_proxy_ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 64);
	__type(key, __u32);
	__array(values, struct sni_proxy_ring);
} sni_proxy_rings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_stat SEC(".maps");

static __always_inline void count(__u32 slot, __u64 n)
{
	if (sni_proxy_stats_on)
		sni_proxy_count(&sni_proxy_stat, slot, n);
}

/* Tell the owning worker, once per credit, that this socket passed its credit. */
static __always_inline void check_credit(__u64 cookie, __u64 bytes)
{
	struct sni_proxy_cred *cred = bpf_map_lookup_elem(&sni_proxy_cred, &cookie);
	void *ring;

	/* Plain (not atomic) test-and-set: two CPUs may both notify; user space ignores a
	 * duplicate, and clang 14's default BPF CPU has no compare-and-swap. */
	if (!cred || bytes <= cred->credit || cred->notified)
		return;
	cred->notified = 1;
	ring = bpf_map_lookup_elem(&sni_proxy_rings, &cred->ring);
	if (ring && bpf_ringbuf_output(ring, &cookie, sizeof(cookie), 0) == 0)
		count(STAT_NOTIFY, 1);
	else
		count(STAT_NOTIFY_LOST, 1);
}

SEC("sk_skb/stream_verdict")
int sni_proxy_skv(struct __sk_buff *skb)
{
	struct sni_proxy_conn *conn;
	struct sni_proxy_cred *cred;
	__u64 cookie, peer, len = skb->len, bytes;

	cookie = bpf_get_socket_cookie(skb);
	conn = bpf_map_lookup_elem(&sni_proxy_conn, &cookie);
	/* A FIN arrives as a zero-length skb. Redirecting or passing it broke the peer (EPIPE)
	 * or lost data on 6.18; user space sees the EOF (EPOLLRDHUP) and propagates it itself
	 * once `fin` is set and the peer has queued every redirected byte. */
	if (len == 0) {
		if (conn)
			conn->fin = 1;
		count(STAT_FIN_DROPS, 1);
		return SK_DROP;
	}
	if (!conn) {
		/* Not ours (or being removed): keep the bytes in this socket for a reader. */
		count(STAT_NO_PEER, 1);
		return SK_PASS;
	}
	/* Backpressure. Pausing by removing the socket from sni_proxy_sks dropped an skb when
	 * the verdict ran concurrently on another CPU (the kernel drops an skb that finds no
	 * program), so a paused socket stays in the map and the program keeps its bytes in the
	 * socket instead (SK_PASS: queued on the psock, charged to the receive buffer, so TCP's
	 * window closes). User space moves them to the peer, then asks to resume; the program
	 * goes back to redirecting only when every passed byte was moved, so order holds. */
	cred = bpf_map_lookup_elem(&sni_proxy_cred, &cookie);
	if (cred && (conn->passing || cred->pause)) {
		if (conn->passing && !cred->pause && cred->copied == conn->passed) {
			conn->passing = 0;
		} else {
			conn->passing = 1;
			conn->passed += len;
			count(STAT_PASSED_BYTES, len);
			return SK_PASS;
		}
	}
	peer = conn->peer;
	if (bpf_sk_redirect_hash(skb, &sni_proxy_dst, &peer, 0) != SK_PASS) {
		/* The peer closed and the kernel dropped it from the map: nowhere to send. */
		count(STAT_REDIRECT_FAIL, 1);
		return SK_DROP;
	}
	/* Atomic adds without using their result (clang 14's default BPF CPU has no fetch-add);
	 * the re-read may include another CPU's add, which only makes the credit check earlier. */
	__sync_fetch_and_add(&conn->bytes, len);
	__sync_fetch_and_add(&conn->skbs, 1);
	bytes = conn->bytes;
	if (conn->dir == DIR_UP) {
		count(STAT_UP_SKBS, 1);
		count(STAT_UP_BYTES, len);
	} else {
		count(STAT_DOWN_SKBS, 1);
		count(STAT_DOWN_BYTES, len);
	}
	check_credit(cookie, bytes);
	return SK_PASS;
}
