// SPDX-License-Identifier: GPL-2.0
/* CPU profiler: a perf_event program attached to one software cpu-clock event per CPU.
 *
 * Every sample is counted in sni_proxy_pcnt under (tgid, tid, comm, kernel stack id, user
 * stack id); the stacks themselves live in sni_proxy_pstk (a STACK_TRACE map). User space
 * sizes both maps from EbpfConfig.max_samples before load and symbolizes at snapshot time.
 * Nothing is dropped silently: every outcome has a slot in the per-CPU sni_proxy_pstat array.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define PERF_MAX_STACK_DEPTH 127	/* the kernel's own default (kernel.perf_event_max_stack) */
#define TASK_COMM_LEN 16
#define MAX_TARGET_TGIDS 64		/* EbpfConfig MAX_TARGET_PIDS */
#define EFAULT 14
#define EEXIST 17

/* Which tasks to sample; set from user space through .rodata before load, so the verifier
 * prunes the unused branches. */
#define FILTER_NONE 0
#define FILTER_TGIDS 1			/* tgid must be a key of sni_proxy_ptgid */
#define FILTER_CGROUP 2			/* task's cgroup v2 id must equal filter_cgroup_id */
const volatile __u32 filter_mode = FILTER_NONE;
const volatile __u64 filter_cgroup_id = 0;
/* Samples of the idle task (pid 0) say "this CPU had nothing to do"; bcc's profile hides
 * them by default and so do we. */
const volatile bool include_idle = false;

/* Slots of sni_proxy_pstat. Python reads them in this order: observe/profiler.py STATS, checked
 * against this enum in the object's BTF at load (ebpf/layout.py). */
enum sni_proxy_pstat_slot {
	STAT_SAMPLES = 0,	/* samples that passed the filter */
	STAT_DROPPED,		/* counts map full (max_samples reached): sample lost */
	STAT_KERNEL_STACK_COLLISIONS,	/* -EEXIST: kernel stack lost to a stack-map hash collision */
	STAT_USER_STACK_COLLISIONS,	/* -EEXIST: user stack lost to a stack-map hash collision */
	STAT_USER_ONLY,		/* -EFAULT on the kernel stack: sample taken in user mode */
	STAT_KERNEL_ONLY,	/* no user stack: kernel thread, or user stack unreadable */
	STAT_KERNEL_STACK_ERRORS,	/* any other kernel stack error */
	STAT_USER_STACK_ERRORS,	/* any other user stack error */
	STAT_MAX,
};

/* Puts the enum into BTF for the layout check (enums no variable uses are dropped). */
const volatile enum sni_proxy_pstat_slot sni_proxy_pstat_slots = STAT_MAX;

struct sample_key {
	__u32 tgid;
	__u32 tid;
	__s32 kernel_stack_id;	/* >= 0, or -errno */
	__s32 user_stack_id;	/* >= 0, or -errno */
	char comm[TASK_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, PERF_MAX_STACK_DEPTH * sizeof(__u64));
	__uint(max_entries, 16384);	/* resized from max_samples before load */
} sni_proxy_pstk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sample_key);
	__type(value, __u64);
	__uint(max_entries, 10000);	/* = max_samples, set before load */
} sni_proxy_pcnt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);		/* tgid */
	__type(value, __u8);
	__uint(max_entries, MAX_TARGET_TGIDS);
} sni_proxy_ptgid SEC(".maps");

/* Processes seen sampling, so user space can snapshot their /proc/PID/maps while they live
 * (a process that exits before symbolization is still resolved). LRU: bounded, oldest go. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);		/* tgid */
	__type(value, __u8);
	__uint(max_entries, 4096);
} sni_proxy_pseen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
} sni_proxy_pstat SEC(".maps");

static __always_inline void stat_inc(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&sni_proxy_pstat, &slot);

	if (value)	/* per-CPU slot: no other writer, no atomic needed */
		*value += 1;
}

static __always_inline bool wanted(__u32 tgid)
{
	if (tgid == 0 && !include_idle)
		return false;
	if (filter_mode == FILTER_TGIDS)
		return bpf_map_lookup_elem(&sni_proxy_ptgid, &tgid) != NULL;
	if (filter_mode == FILTER_CGROUP)
		return bpf_get_current_cgroup_id() == filter_cgroup_id;
	return true;
}

SEC("perf_event")
int sni_proxy_prof(struct bpf_perf_event_data *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sample_key key = {};
	__u64 one = 1, *count;
	__u8 zero = 0;
	long err;

	key.tgid = id >> 32;
	key.tid = (__u32)id;
	if (!wanted(key.tgid))
		return 0;
	stat_inc(STAT_SAMPLES);
	bpf_get_current_comm(&key.comm, sizeof(key.comm));
	/* Look up first: an LRU update allocates (and may evict) even when the key exists. */
	if (!bpf_map_lookup_elem(&sni_proxy_pseen, &key.tgid))
		bpf_map_update_elem(&sni_proxy_pseen, &key.tgid, &zero, BPF_ANY);

	key.kernel_stack_id = bpf_get_stackid(ctx, &sni_proxy_pstk, 0);
	if (key.kernel_stack_id == -EFAULT)
		stat_inc(STAT_USER_ONLY);	/* normal: the CPU was in user mode */
	else if (key.kernel_stack_id == -EEXIST)
		stat_inc(STAT_KERNEL_STACK_COLLISIONS);
	else if (key.kernel_stack_id < 0)
		stat_inc(STAT_KERNEL_STACK_ERRORS);

	key.user_stack_id = bpf_get_stackid(ctx, &sni_proxy_pstk, BPF_F_USER_STACK);
	if (key.user_stack_id == -EEXIST)
		stat_inc(STAT_USER_STACK_COLLISIONS);
	else if (key.user_stack_id == -EFAULT)
		stat_inc(STAT_KERNEL_ONLY);	/* kernel thread: no user memory */
	else if (key.user_stack_id < 0)
		stat_inc(STAT_USER_STACK_ERRORS);

	/* The sample is counted even when a stack was lost, so totals stay right; the key
	 * then carries the negative errno and user space shows "[lost stack]". */
	count = bpf_map_lookup_elem(&sni_proxy_pcnt, &key);
	if (count) {
		__sync_fetch_and_add(count, 1);	/* two CPUs may share a key (same thread migrated) */
		return 0;
	}
	err = bpf_map_update_elem(&sni_proxy_pcnt, &key, &one, BPF_NOEXIST);
	if (err == -EEXIST) {
		/* another CPU inserted the same key between our lookup and update */
		count = bpf_map_lookup_elem(&sni_proxy_pcnt, &key);
		if (count)
			__sync_fetch_and_add(count, 1);
	} else if (err) {
		stat_inc(STAT_DROPPED);	/* -E2BIG: max_samples distinct entries reached */
	}
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
