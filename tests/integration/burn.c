/* Workload for the profiler tests and benchmark. Build with frame pointers so user stacks unwind:
 *   clang -O2 -fno-omit-frame-pointer -pthread -o burn burn.c
 *
 * usage: burn MODE SECONDS [THREADS]
 *   ratio    each thread alternates burn_a (70 % of the time) and burn_b (30 %), time-sliced by
 *            TSC cycle counts so the split holds whatever the CPU frequency does
 *   syscall  each thread loops getppid() + write(/dev/null): time spent mostly in the kernel
 *   work     each thread repeats a fixed unit of work; prints how many units were done
 * On start it prints one line "ready pid=N burn_a=0x.. burn_b=0x.. getppid=0x.." (runtime
 * addresses, so tests can check symbolization), at the end "units N cpu_ns N".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define SLICE_CYCLES 100000ULL	/* ~30 us at 3 GHz: far below the 5 ms+ sampling period */

static volatile uint64_t sink;
static double seconds;
static int mode;	/* 0 ratio, 1 syscall, 2 work */
static uint64_t units_done[256];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void burn_a(uint64_t cycles)
{
	uint64_t start = __rdtsc(), x = sink;
	while (__rdtsc() - start < cycles)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	sink = x;
}

__attribute__((noinline)) void burn_b(uint64_t cycles)
{
	uint64_t start = __rdtsc(), x = sink;
	while (__rdtsc() - start < cycles)
		x = x * 2862933555777941757ULL + 3037000493ULL;
	sink = x;
}

__attribute__((noinline)) void syscall_loop(int devnull)
{
	char byte = 0;
	for (int i = 0; i < 1000; i++) {
		getppid();
		if (write(devnull, &byte, 1) != 1)
			abort();
	}
}

__attribute__((noinline)) void work_unit(void)
{
	uint64_t x = sink;
	for (int i = 0; i < 100000; i++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	sink = x;
}

static void *run(void *arg)
{
	long id = (long)arg;
	double end = now() + seconds;
	int devnull = open("/dev/null", O_WRONLY);
	uint64_t units = 0, rng = 0x9E3779B97F4A7C15ULL ^ (uint64_t)(id + 1) * 0xBF58476D1CE4E5B9ULL;

	if (devnull < 0)
		abort();
	while (now() < end) {
		for (int i = 0; i < 100; i++) {
			if (mode == 0) {
				/* Slice length varies at random (0.5x..1.5x) so a fixed sampling period
				 * cannot alias with a fixed slice period and favour one function. */
				rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
				uint64_t slice = SLICE_CYCLES / 2 + rng % SLICE_CYCLES;

				burn_a(slice * 7 / 10);
				burn_b(slice * 3 / 10);
			} else if (mode == 1) {
				syscall_loop(devnull);
				units++;
				break;
			} else {
				work_unit();
			}
			units++;
		}
	}
	close(devnull);
	units_done[id] = units;
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t threads[256];
	struct timespec cpu;
	uint64_t total = 0;
	long n = 1;

	if (argc < 3) {
		fprintf(stderr, "usage: burn ratio|syscall|work SECONDS [THREADS]\n");
		return 2;
	}
	mode = !strcmp(argv[1], "syscall") ? 1 : !strcmp(argv[1], "work") ? 2 : 0;
	seconds = atof(argv[2]);
	if (argc > 3)
		n = atol(argv[3]);
	if (n < 1 || n > 256)
		return 2;
	printf("ready pid=%d burn_a=%p burn_b=%p getppid=%p\n", getpid(), (void *)burn_a,
	       (void *)burn_b, (void *)getppid);
	fflush(stdout);
	for (long i = 0; i < n; i++)
		pthread_create(&threads[i], NULL, run, (void *)i);
	for (long i = 0; i < n; i++) {
		pthread_join(threads[i], NULL);
		total += units_done[i];
	}
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
	printf("units %llu cpu_ns %llu\n", (unsigned long long)total,
	       (unsigned long long)cpu.tv_sec * 1000000000ULL + cpu.tv_nsec);
	return 0;
}
