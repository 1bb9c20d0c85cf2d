/* Workloads for bench/tracers_overhead.py; prints one line: "<ops> <seconds>".
 *   syscalls N     N getppid calls (syscall-heavy)
 *   connect N      N loopback TCP connections: connect, 100 bytes each way, close
 *                  (a forked child serves; connection-heavy)
 *   malloc N       N malloc(64)+free pairs (allocation-heavy) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(int lfd, long n)
{
	char buf[100];

	for (long i = 0; i < n; i++) {
		int c = accept(lfd, NULL, NULL);

		if (c < 0)
			return 1;
		if (read(c, buf, sizeof(buf)) <= 0 || write(c, buf, sizeof(buf)) != sizeof(buf))
			return 1;
		close(c);
	}
	return 0;
}

int main(int argc, char **argv)
{
	long n = argc > 2 ? atol(argv[2]) : 100000;
	double t0;

	char go;

	/* "w": loaded; then wait for the bench to attach its tracer and send one byte */
	if (argc < 2 || write(1, "w\n", 2) != 2 || read(0, &go, 1) != 1)
		return 2;
	if (!strcmp(argv[1], "syscalls")) {
		t0 = now();
		for (long i = 0; i < n; i++)
			syscall(SYS_getppid);
	} else if (!strcmp(argv[1], "malloc")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			void *volatile p = malloc(64);
			free(p);
		}
	} else if (!strcmp(argv[1], "connect")) {
		struct sockaddr_in addr = { .sin_family = AF_INET };
		socklen_t len = sizeof(addr);
		int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		char buf[100] = {0};
		pid_t child;

		addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(lfd, (void *)&addr, sizeof(addr)) || listen(lfd, 1024) ||
		    getsockname(lfd, (void *)&addr, &len))
			return 1;
		child = fork();
		if (child == 0)
			_exit(serve(lfd, n));
		close(lfd);
		t0 = now();
		for (long i = 0; i < n; i++) {
			int s = socket(AF_INET, SOCK_STREAM, 0);

			if (connect(s, (void *)&addr, sizeof(addr)) ||
			    write(s, buf, sizeof(buf)) != sizeof(buf) || read(s, buf, sizeof(buf)) <= 0)
				return 1;
			close(s);
		}
		waitpid(child, NULL, 0);
	} else {
		return 2;
	}
	printf("%ld %.6f\n", n, now() - t0);
	return 0;
}
