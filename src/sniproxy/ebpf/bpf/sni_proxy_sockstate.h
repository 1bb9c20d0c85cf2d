/* The record the socket-state reader (sni_proxy_sockstate.bpf.c) returns for
 * getsockopt(SOL_TCP, SNI_PROXY_SOCKSTATE_OPT). Shared with src/sniproxy/ebpf/sockstate.py (a
 * StructLayout checked against the object's BTF at load) and with the compiled hand-over
 * src/sniproxy/ebpf/_handover.c (which includes this header). Needs __u8/__u16/__u32 declared
 * first (vmlinux.h in BPF, <linux/types.h> in user space).
 */
#ifndef SNI_PROXY_SOCKSTATE_H
#define SNI_PROXY_SOCKSTATE_H

#define SNI_PROXY_SOCKSTATE_OPT 0x5e1f0001

/* sni_proxy_sockstate.options: as tcp_info's tcpi_options, plus usec timestamps */
#define SNI_PROXY_SS_TIMESTAMPS 1
#define SNI_PROXY_SS_SACK 2
#define SNI_PROXY_SS_WSCALE 4
#define SNI_PROXY_SS_USEC_TS 8

struct sni_proxy_sockstate {
	__u8 local_addr[16];	/* IPv4 (also IPv4-mapped IPv6) in the first 4 bytes */
	__u8 peer_addr[16];
	__u16 local_port;	/* host byte order */
	__u16 peer_port;	/* host byte order */
	__u8 family;		/* 4 or 6 */
	__u8 state;		/* TCP_ESTABLISHED = 1, ... */
	__u8 options;		/* SNI_PROXY_SS_* */
	__u8 wscale;		/* snd_wscale | rcv_wscale << 4 (tcpi_snd_wscale, tcpi_rcv_wscale) */
	__u32 copied_seq;	/* first byte user space has not read */
	__u32 rcv_nxt;		/* next byte expected from the peer */
	__u32 write_seq;	/* sequence number of the next byte user space writes */
	__u32 snd_una;		/* first byte not acknowledged by the peer */
	__u32 tsoffset;		/* TCP timestamp = CLOCK_MONOTONIC ms + tsoffset */
	__u32 snd_mss;		/* mss_cache (tcpi_snd_mss) */
	__u32 advmss;		/* tcpi_advmss */
	__u32 pmtu;		/* icsk_pmtu_cookie (tcpi_pmtu) */
};

#endif
