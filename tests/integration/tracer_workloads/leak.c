/* Known leaks from two known stacks: leak_small keeps `small_n` of its 2*small_n blocks of
 * SMALL bytes (malloc), leak_big keeps 2/3 of its blocks of BIG bytes (calloc). Everything
 * else (realloc chains, posix_memalign) is freed. Prints "ready\n" when done, then waits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SMALL 96
#define BIG 5000

__attribute__((noinline)) void *leak_small(void)
{
	void *p = malloc(SMALL);

	memset(p, 1, SMALL);
	return p;
}

__attribute__((noinline)) void *leak_big(void)
{
	return calloc(1, BIG);
}

int main(int argc, char **argv)
{
	int small_n = argc > 1 ? atoi(argv[1]) : 50;
	int big_n = argc > 2 ? atoi(argv[2]) : 30;	/* multiple of 3 */
	char c;

	/* "waiting": the test attaches its tracer, then sends the byte */
	if (write(1, "w\n", 2) != 2 || read(0, &c, 1) != 1)
		return 1;
	for (int i = 0; i < 2 * small_n; i++) {
		void *p = leak_small();

		if (i % 2)
			free(p);
	}
	for (int i = 0; i < big_n; i++) {
		void *p = leak_big();

		if (i % 3 == 0)
			free(p);
	}
	void *q = realloc(NULL, 200);
	q = realloc(q, 100000);
	free(q);
	void *r = NULL;
	if (posix_memalign(&r, 64, 4096) == 0)
		free(r);
	if (write(1, "ready\n", 6) != 6)
		return 2;
	read(0, &c, 1);
	return 0;
}
