// SPDX-License-Identifier: GPL-2.0
/* Syscall counter (bcc syscount) on raw_syscalls sys_enter / sys_exit.
 *
 * tp_btf programs are tried first; on a kernel that refuses them user space loads the raw_tp
 * twins instead (the pattern of libbpf-tools' probe_tp_btf()). Neither needs tracefs.
 * sys_exit carries no syscall number, so sys_enter keeps (nr, entry time) per thread.
 * Filters (process, cgroup, failures only, one errno) are .rodata constants set before load,
 * so the verifier removes what is not asked for and unwanted tasks cost one compare.
 */
#include "sni_proxy_common.h"
#include "sni_proxy_trace.h"

#define MAX_ERRNO 4095
#define MAX_NR 1024		/* syscall numbers below this use the per-CPU arrays */

const volatile __u32 filter_tgid = 0;		/* 0: every process */
const volatile __u64 filter_cgroup_id = 0;	/* 0: every cgroup */
const volatile bool failures_only = false;	/* -x */
const volatile __u32 filter_errno = 0;		/* -e: only this errno (implies failures) */
const volatile bool measure_latency = false;	/* -L */
const volatile bool by_process = false;		/* -P */

enum sc_stat {
	SC_STAT_ENTER_LOST = 0,	/* per-thread map full: that call is not counted */
	SC_STAT_COUNT_FULL,	/* count map full (max distinct keys) */
	SC_STAT_ERRNO_FULL,
	SC_STAT_HIST_FULL,
	SC_STAT_NO_ENTER,	/* exit without a recorded enter (thread was inside at attach) */
	SC_STAT_MAX,
};
/* An enum reaches BTF only when a variable has its type: this one lets user space check its
 * slot names against the enum at open (ebpf/layout.py). */
const volatile enum sc_stat sni_proxy_sc_stat_slots = SC_STAT_MAX;

struct sc_start {
	__u64 ts;
	__s64 nr;	/* -1: no call in progress */
};

/* The call in progress, per thread: task-local storage is freed with the task (a thread that
 * dies inside exit_group leaves nothing behind) and costs far less than a hash update. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sc_start);
} sni_proxy_scst SEC(".maps");

/* Counts by syscall number when not per process: a per-CPU array slot is found without
 * hashing and updated without atomics (user space sums the CPUs). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct sc_value);
	__uint(max_entries, MAX_NR);
} sni_proxy_scarr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct sc_hist);
	__uint(max_entries, MAX_NR);	/* 1 when latency is off */
} sni_proxy_schar SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sc_key);
	__type(value, struct sc_value);
	__uint(max_entries, 10240);	/* set from max_samples */
} sni_proxy_sccnt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sc_errkey);
	__type(value, __u64);
	__uint(max_entries, 4096);
} sni_proxy_scerr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sc_key);
	__type(value, struct sc_hist);
	__uint(max_entries, 1024);	/* zero when latency is off */
} sni_proxy_schst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SC_STAT_MAX);
} sni_proxy_scsta SEC(".maps");

static __always_inline bool wanted(__u32 tgid)
{
	if (filter_tgid && tgid != filter_tgid)
		return false;
	if (filter_cgroup_id && bpf_get_current_cgroup_id() != filter_cgroup_id)
		return false;
	return true;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 slot = 0;

	/* bounded: at most 63 shifts, unrolled by the compiler into compares */
	if (v >= 1ULL << 16) { v >>= 16; slot += 16; }
	if (v >= 1ULL << 8) { v >>= 8; slot += 8; }
	if (v >= 1ULL << 4) { v >>= 4; slot += 4; }
	if (v >= 1ULL << 2) { v >>= 2; slot += 2; }
	if (v >= 1ULL << 1) { slot += 1; }
	return slot < HIST_SLOTS ? slot : HIST_SLOTS - 1;
}

static __always_inline int on_enter(long nr)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sc_start *start;

	if (nr < 0)	/* -1: a tracer or seccomp cancelled the call; nothing will run */
		return 0;
	if (!wanted(id >> 32))
		return 0;
	start = bpf_task_storage_get(&sni_proxy_scst, bpf_get_current_task_btf(), 0,
				     BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!start) {
		sni_proxy_count(&sni_proxy_scsta, SC_STAT_ENTER_LOST, 1);
		return 0;
	}
	start->ts = measure_latency ? bpf_ktime_get_ns() : 0;
	start->nr = nr;
	return 0;
}

static __always_inline void add_error(struct sc_key *key, __u32 err)
{
	struct sc_errkey ekey = { .tgid = key->tgid, .nr = key->nr, .err = err };
	__u64 one = 1, *count;

	count = bpf_map_lookup_elem(&sni_proxy_scerr, &ekey);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	if (bpf_map_update_elem(&sni_proxy_scerr, &ekey, &one, BPF_NOEXIST)) {
		count = bpf_map_lookup_elem(&sni_proxy_scerr, &ekey);	/* lost a race: add */
		if (count)
			__sync_fetch_and_add(count, 1);
		else
			sni_proxy_count(&sni_proxy_scsta, SC_STAT_ERRNO_FULL, 1);
	}
}

static __always_inline void add_latency(struct sc_key *key, __u64 ns)
{
	struct sc_hist zero = {}, *hist;
	__u32 slot = log2_slot(ns / 1000);

	hist = bpf_map_lookup_elem(&sni_proxy_schst, key);
	if (!hist) {
		bpf_map_update_elem(&sni_proxy_schst, key, &zero, BPF_NOEXIST);
		hist = bpf_map_lookup_elem(&sni_proxy_schst, key);
		if (!hist) {
			sni_proxy_count(&sni_proxy_scsta, SC_STAT_HIST_FULL, 1);
			return;
		}
	}
	__sync_fetch_and_add(&hist->slots[slot], 1);
}

static __always_inline struct sc_value *value_for(struct sc_key *key)
{
	struct sc_value init = {}, *value;
	__u32 nr = key->nr;

	if (!by_process && nr < MAX_NR)
		return bpf_map_lookup_elem(&sni_proxy_scarr, &nr);
	value = bpf_map_lookup_elem(&sni_proxy_sccnt, key);
	if (!value) {
		bpf_map_update_elem(&sni_proxy_sccnt, key, &init, BPF_NOEXIST);
		value = bpf_map_lookup_elem(&sni_proxy_sccnt, key);
	}
	return value;
}

static __always_inline int on_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sc_value *value;
	struct sc_start *start;
	struct sc_key key = {};
	bool failed = ret < 0 && ret >= -MAX_ERRNO;
	__u32 nr;
	__u64 ns = 0;

	if (!wanted(id >> 32))
		return 0;
	start = bpf_task_storage_get(&sni_proxy_scst, bpf_get_current_task_btf(), 0, 0);
	if (!start || start->nr < 0) {
		sni_proxy_count(&sni_proxy_scsta, SC_STAT_NO_ENTER, 1);
		return 0;
	}
	key.nr = start->nr;
	if (measure_latency)
		ns = bpf_ktime_get_ns() - start->ts;
	start->nr = -1;		/* consumed: an exit without a new enter is not counted twice */

	if ((failures_only || filter_errno) && !failed)
		return 0;
	if (filter_errno && -ret != filter_errno)
		return 0;
	if (by_process)
		key.tgid = id >> 32;

	value = value_for(&key);
	if (!value) {
		sni_proxy_count(&sni_proxy_scsta, SC_STAT_COUNT_FULL, 1);
		return 0;
	}
	/* per-CPU slot: plain adds; shared hash value (per process): atomic */
	if (!by_process && key.nr < MAX_NR) {
		value->count += 1;
		if (failed)
			value->errors += 1;
		if (measure_latency)
			value->total_ns += ns;
	} else {
		__sync_fetch_and_add(&value->count, 1);
		if (failed)
			__sync_fetch_and_add(&value->errors, 1);
		if (measure_latency)
			__sync_fetch_and_add(&value->total_ns, ns);
	}
	if (failed)
		add_error(&key, (__u32)-ret);
	if (measure_latency) {
		nr = key.nr;
		if (!by_process && nr < MAX_NR) {
			struct sc_hist *hist = bpf_map_lookup_elem(&sni_proxy_schar, &nr);

			if (hist)
				hist->slots[log2_slot(ns / 1000)] += 1;
		} else {
			add_latency(&key, ns);
		}
	}
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sni_proxy_scenb, struct pt_regs *regs, long nr)
{
	return on_enter(nr);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sni_proxy_scexb, struct pt_regs *regs, long ret)
{
	return on_exit(ret);
}

SEC("raw_tp/sys_enter")
int BPF_PROG(sni_proxy_scenr, struct pt_regs *regs, long nr)
{
	return on_enter(nr);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sni_proxy_scexr, struct pt_regs *regs, long ret)
{
	return on_exit(ret);
}

char LICENSE[] SEC("license") = "GPL";
