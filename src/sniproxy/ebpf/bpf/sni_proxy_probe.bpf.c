// SPDX-License-Identifier: GPL-2.0
/* sni_proxy_probe: one tiny program per attach kind the project uses, and one map per map type.
 *
 * Used by the loader's tests and `sni-proxy demo` to prove, on the running kernel, that each
 * kind loads and attaches: sk_skb verdict on a sockhash, raw tracepoint, BTF tracepoint, classic
 * tracepoint (needs tracefs to attach), perf_event and uprobe. Every program only counts.
 */
#include "sni_proxy_common.h"

char LICENSE[] SEC("license") = "GPL";

/* Set from user space before load (BpfObject(rodata=...)): 0 counts every process. */
const volatile __u32 sni_proxy_tgid = 0;
/* Added to every count, so a test can prove .rodata reached the kernel. */
const volatile __u64 sni_proxy_step = 1;

enum sni_proxy_probe_slot {
	SLOT_SKB_VERDICT,
	SLOT_RAW_TP,
	SLOT_TP_BTF,
	SLOT_PERF_EVENT,
	SLOT_UPROBE,
	SLOT_TRACEPOINT,
	SLOT_MAX,
};
/* An enum reaches BTF only when a variable has its type: user space checks its slot names
 * against this one at open (ebpf/layout.py). */
const volatile enum sni_proxy_probe_slot sni_proxy_probe_slots = SLOT_MAX;

/* Per-CPU counters, one slot per program above: summed in user space. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLOT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_pcpu SEC(".maps");

/* Plain hash and LRU hash: round-trip targets for the loader's map tests. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} sni_proxy_phash SEC(".maps");

/* Sockets keyed by socket cookie, as the sockmap relay does. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} sni_proxy_sk SEC(".maps");

static __always_inline bool sni_proxy_wanted(void)
{
	return sni_proxy_tgid == 0 || (bpf_get_current_pid_tgid() >> 32) == sni_proxy_tgid;
}

SEC("sk_skb/stream_verdict")
int sni_proxy_skv(struct __sk_buff *skb)
{
	sni_proxy_count(&sni_proxy_pcpu, SLOT_SKB_VERDICT, sni_proxy_step);
	return SK_PASS;
}

SEC("raw_tp/sys_enter")
int sni_proxy_rawtp(struct bpf_raw_tracepoint_args *ctx)
{
	if (sni_proxy_wanted())
		sni_proxy_count(&sni_proxy_pcpu, SLOT_RAW_TP, sni_proxy_step);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sni_proxy_tpbtf, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	/* prev is the task leaving the CPU: count our own switches out. */
	if (sni_proxy_tgid == 0 || BPF_CORE_READ(prev, tgid) == sni_proxy_tgid)
		sni_proxy_count(&sni_proxy_pcpu, SLOT_TP_BTF, sni_proxy_step);
	return 0;
}

SEC("perf_event")
int sni_proxy_perf(struct bpf_perf_event_data *ctx)
{
	if (sni_proxy_wanted())
		sni_proxy_count(&sni_proxy_pcpu, SLOT_PERF_EVENT, sni_proxy_step);
	return 0;
}

/* Bare "uprobe": attached explicitly with a binary and offset (Program.attach_uprobe). */
SEC("uprobe")
int sni_proxy_upr(struct pt_regs *ctx)
{
	sni_proxy_count(&sni_proxy_pcpu, SLOT_UPROBE, sni_proxy_step);
	return 0;
}

/* Classic tracepoint: loads everywhere, attaches only where tracefs is mounted. */
SEC("tracepoint/syscalls/sys_enter_getppid")
int sni_proxy_tp(void *ctx)
{
	if (sni_proxy_wanted())
		sni_proxy_count(&sni_proxy_pcpu, SLOT_TRACEPOINT, sni_proxy_step);
	return 0;
}
