// SPDX-License-Identifier: GPL-2.0
/* Outstanding-allocation tracer (bcc memleak) for one process's libc allocator, or for the
 * kernel's kmalloc/kfree.
 *
 * User mode: uprobes on malloc/calloc/realloc/posix_memalign/aligned_alloc/mmap keep the
 * requested size per thread; their uretprobes record (address -> size, time, user stack id);
 * free/munmap uprobes remove the address. What is left is outstanding, and user space groups
 * it by stack. Kernel mode: tp_btf kmem:kmalloc / kmem:kfree (raw_tp twins) do the same with
 * kernel stacks. Every map is bounded and a full one is counted in sni_proxy_mmsta.
 */
#include "sni_proxy_common.h"
#include "sni_proxy_trace.h"

#define PERF_MAX_STACK_DEPTH 127

const volatile __u32 filter_tgid = 0;		/* kernel mode: allocations by this process */
const volatile __u32 sample_every = 1;		/* record 1 allocation in N (--sample-rate) */
const volatile __u64 min_size = 0;		/* ignore smaller requests */

enum mem_stat {
	MEM_STAT_ALLOCS_FULL = 0,	/* allocation not tracked: sni_proxy_mmal full */
	MEM_STAT_STACK_LOST,		/* stack not captured (collision or error) */
	MEM_STAT_PENDING_LOST,		/* per-thread pending map full */
	MEM_STAT_ALLOCS,		/* allocations recorded */
	MEM_STAT_FREES,			/* frees of a tracked address */
	MEM_STAT_MAX,
};
/* An enum reaches BTF only when a variable has its type: this one lets user space check its
 * slot names against the enum at open (ebpf/layout.py). */
const volatile enum mem_stat sni_proxy_mem_stat_slots = MEM_STAT_MAX;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);		/* tid */
	__type(value, __u64);		/* size asked at entry */
	__uint(max_entries, 16384);
} sni_proxy_mmsz SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);		/* tid */
	__type(value, __u64);		/* posix_memalign's void **memptr */
	__uint(max_entries, 16384);
} sni_proxy_mmptr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);		/* address */
	__type(value, struct mem_alloc);
	__uint(max_entries, 131072);	/* outstanding allocations tracked; set before load */
} sni_proxy_mmal SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, PERF_MAX_STACK_DEPTH * sizeof(__u64));
	__uint(max_entries, 16384);
} sni_proxy_mmstk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MEM_STAT_MAX);
} sni_proxy_mmsta SEC(".maps");

static __always_inline int enter_alloc(__u64 size)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	if (size < min_size)
		return 0;
	if (sample_every > 1 && bpf_get_prandom_u32() % sample_every)
		return 0;
	if (bpf_map_update_elem(&sni_proxy_mmsz, &tid, &size, BPF_ANY))
		sni_proxy_count(&sni_proxy_mmsta, MEM_STAT_PENDING_LOST, 1);
	return 0;
}

static __always_inline void record(void *ctx, __u64 addr, __u64 size, __u64 stack_flags)
{
	struct mem_alloc a = {};

	a.size = size;
	a.ts_ns = bpf_ktime_get_ns();
	a.tgid = bpf_get_current_pid_tgid() >> 32;
	a.stack_id = bpf_get_stackid(ctx, &sni_proxy_mmstk, stack_flags);
	if (a.stack_id < 0)
		sni_proxy_count(&sni_proxy_mmsta, MEM_STAT_STACK_LOST, 1);
	if (bpf_map_update_elem(&sni_proxy_mmal, &addr, &a, BPF_ANY))
		sni_proxy_count(&sni_proxy_mmsta, MEM_STAT_ALLOCS_FULL, 1);
	else
		sni_proxy_count(&sni_proxy_mmsta, MEM_STAT_ALLOCS, 1);
}

static __always_inline int exit_alloc(struct pt_regs *ctx, __u64 addr)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *size = bpf_map_lookup_elem(&sni_proxy_mmsz, &tid);
	__u64 sz;

	if (!size)
		return 0;	/* not sampled, below min_size, or entered before attach */
	sz = *size;
	bpf_map_delete_elem(&sni_proxy_mmsz, &tid);
	if (addr && addr != (__u64)-1)	/* NULL, or MAP_FAILED for mmap */
		record(ctx, addr, sz, BPF_F_USER_STACK);
	return 0;
}

static __always_inline int do_free(__u64 addr)
{
	if (bpf_map_delete_elem(&sni_proxy_mmal, &addr) == 0)
		sni_proxy_count(&sni_proxy_mmsta, MEM_STAT_FREES, 1);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmmal, size_t size)
{
	return enter_alloc(size);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmmar, void *ret)
{
	return exit_alloc(ctx, (__u64)ret);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmcal, size_t nmemb, size_t size)
{
	return enter_alloc((__u64)nmemb * size);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmcar, void *ret)
{
	return exit_alloc(ctx, (__u64)ret);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmrea, void *ptr, size_t size)
{
	/* realloc frees the old block (when it moves or shrinks to 0 alike: the new address is
	 * recorded at return; the same address comes back when it grew in place). */
	do_free((__u64)ptr);
	return enter_alloc(size);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmrer, void *ret)
{
	return exit_alloc(ctx, (__u64)ret);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmpma, void **memptr, size_t alignment, size_t size)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 where = (__u64)memptr;

	bpf_map_update_elem(&sni_proxy_mmptr, &tid, &where, BPF_ANY);
	return enter_alloc(size);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmpmr, int ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *where = bpf_map_lookup_elem(&sni_proxy_mmptr, &tid);
	__u64 addr = 0;

	if (!where)
		return 0;
	if (ret == 0)
		bpf_probe_read_user(&addr, sizeof(addr), (void *)*where);
	bpf_map_delete_elem(&sni_proxy_mmptr, &tid);
	return exit_alloc(ctx, addr);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmala, size_t alignment, size_t size)
{
	return enter_alloc(size);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmalr, void *ret)
{
	return exit_alloc(ctx, (__u64)ret);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmfre, void *ptr)
{
	return do_free((__u64)ptr);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmmap, void *addr, size_t length)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	/* glibc's malloc maps big blocks itself: an mmap while this thread is inside a traced
	 * allocation is that block, already counted by its malloc. */
	if (bpf_map_lookup_elem(&sni_proxy_mmsz, &tid))
		return 0;
	return enter_alloc(length);
}

SEC("uretprobe")
int BPF_KRETPROBE(sni_proxy_mmmpr, void *ret)
{
	return exit_alloc(ctx, (__u64)ret);
}

SEC("uprobe")
int BPF_KPROBE(sni_proxy_mmunm, void *addr)
{
	return do_free((__u64)addr);
}

/* ---- kernel mode ------------------------------------------------------------------------ */
static __always_inline int on_kmalloc(void *ctx, const void *ptr, size_t bytes_alloc)
{
	if (filter_tgid && (bpf_get_current_pid_tgid() >> 32) != filter_tgid)
		return 0;
	if (!ptr || bytes_alloc < min_size)
		return 0;
	if (sample_every > 1 && bpf_get_prandom_u32() % sample_every)
		return 0;
	record(ctx, (__u64)ptr, bytes_alloc, 0);
	return 0;
}

SEC("tp_btf/kmalloc")
int BPF_PROG(sni_proxy_mmkmb, unsigned long call_site, const void *ptr, size_t bytes_req,
	     size_t bytes_alloc)
{
	return on_kmalloc(ctx, ptr, bytes_alloc);
}

SEC("tp_btf/kfree")
int BPF_PROG(sni_proxy_mmkfb, unsigned long call_site, const void *ptr)
{
	return do_free((__u64)ptr);
}

SEC("raw_tp/kmalloc")
int BPF_PROG(sni_proxy_mmkmr, unsigned long call_site, const void *ptr, size_t bytes_req,
	     size_t bytes_alloc)
{
	return on_kmalloc(ctx, ptr, bytes_alloc);
}

SEC("raw_tp/kfree")
int BPF_PROG(sni_proxy_mmkfr, unsigned long call_site, const void *ptr)
{
	return do_free((__u64)ptr);
}

char LICENSE[] SEC("license") = "GPL";
