// SPDX-License-Identifier: GPL-2.0
/* sni_proxy_skmsg_bench: the sk_msg relay that bench/sk_msg_vs_sk_skb.py measures against the
 * production sk_skb relay (sni_proxy_sockmap). Not used by the proxy.
 *
 * An sk_msg program runs on sendmsg() of a socket in its map, never on bytes the socket
 * receives from the network. So in this design user space still recv()s every byte from the
 * source socket and send()s it back on that same socket; the program redirects the message to
 * the egress of the peer socket. The counters prove what the program saw.
 *
 * Maps (names follow sni_proxy_common.h: "sni_proxy_" + at most 5 characters):
 *   sni_proxy_msks   SOCKHASH cookie -> socket, the sk_msg program attached (also the
 *                    redirect targets: bpf_msg_redirect_hash needs the peer in this map).
 *   sni_proxy_mpeer  HASH 4-tuple of a socket -> cookie of its peer, written by user space.
 *                    Keyed by 4-tuple, not cookie: the verifier refuses bpf_get_socket_cookie
 *                    in sk_msg programs on 6.18 ("program of this type cannot use helper").
 *   sni_proxy_mstat  per-CPU counters (enum below), summed in user space.
 */
#include "sni_proxy_common.h"

char LICENSE[] SEC("license") = "GPL";

enum sni_proxy_mstat_slot {
	MSTAT_MSGS,		/* messages redirected to a peer */
	MSTAT_BYTES,		/* ... and their bytes */
	MSTAT_NO_PEER,		/* messages of a socket without a peer entry: sent on it unchanged */
	MSTAT_REDIRECT_FAIL,	/* the peer is not in sni_proxy_msks: dropped */
	MSTAT_MAX,
};
/* An enum reaches BTF only when a variable has its type: the bench checks its slot names
 * against this one at open (ebpf/layout.py). */
const volatile enum sni_proxy_mstat_slot sni_proxy_mstat_slots = MSTAT_MAX;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} sni_proxy_msks SEC(".maps");

/* The socket a message is sent on, as user space sees it: addresses in network byte order
 * (the bytes of inet_aton), ports in host byte order. IPv4 only, like the benchmark. */
struct sni_proxy_flow {
	__u32 local_ip4;
	__u32 remote_ip4;
	__u32 local_port;
	__u32 remote_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct sni_proxy_flow);
	__type(value, __u64);
} sni_proxy_mpeer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MSTAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_mstat SEC(".maps");

SEC("sk_msg")
int sni_proxy_msg(struct sk_msg_md *msg)
{
	struct sni_proxy_flow flow = {
		.local_ip4 = msg->local_ip4,
		.remote_ip4 = msg->remote_ip4,
		/* local_port is already in host order; remote_port is the network-order port in
		 * a 32-bit field (shifted on little-endian), which bpf_ntohl turns into host order. */
		.local_port = msg->local_port,
		.remote_port = bpf_ntohl(msg->remote_port),
	};
	__u64 *peer = bpf_map_lookup_elem(&sni_proxy_mpeer, &flow);
	__u64 target;

	if (!peer) {
		sni_proxy_count(&sni_proxy_mstat, MSTAT_NO_PEER, 1);
		return SK_PASS;
	}
	/* Copy the key to the stack: the helper wants a pointer it may read at any time. */
	target = *peer;
	if (bpf_msg_redirect_hash(msg, &sni_proxy_msks, &target, 0) != SK_PASS) {
		sni_proxy_count(&sni_proxy_mstat, MSTAT_REDIRECT_FAIL, 1);
		return SK_DROP;
	}
	sni_proxy_count(&sni_proxy_mstat, MSTAT_MSGS, 1);
	sni_proxy_count(&sni_proxy_mstat, MSTAT_BYTES, msg->size);
	return SK_PASS;
}
