/* The backend of bench/held_connections.py: holds many idle TCP connections cheaply.
 *
 *   held_backend PORT HELLO_BYTES MAX_SECONDS   (PORT 0: any free port; prints "port N" once listening)
 *
 * Per connection: once HELLO_BYTES bytes (the replayed ClientHello) have arrived it answers
 * one byte 'A' (the client's proof that the connection reaches the backend through the
 * proxy); every byte after the hello is answered with one 'P' (the final both-ways check).
 * EOF or an error closes the connection. One process, one epoll, no per-connection
 * allocation beyond a counter indexed by fd. It exits on SIGTERM, or after MAX_SECONDS
 * (alarm) so that a crashed driver can never leave it running.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PORT HELLO_BYTES MAX_SECONDS\n", argv[0]);
		return 2;
	}
	int port = atoi(argv[1]);
	long hello = atol(argv[2]);
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	long maxfd = (long)rl.rlim_cur;
	long *got = calloc(maxfd, sizeof(long));
	if (!got)
		return 1;
	signal(SIGTERM, on_term);
	signal(SIGPIPE, SIG_IGN);
	alarm(atoi(argv[3]));

	int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 65535)) {
		perror("bind/listen");
		return 1;
	}
	socklen_t alen = sizeof(a);
	getsockname(ls, (struct sockaddr *)&a, &alen);
	printf("port %d\n", ntohs(a.sin_port));
	fflush(stdout);

	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
	struct epoll_event evs[512];
	char buf[4096], reply[4096];
	memset(reply, 'P', sizeof(reply));
	while (!stop) {
		int n = epoll_wait(ep, evs, 512, 1000);
		if (n < 0 && errno == EINTR)
			continue;
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				for (int k = 0; k < 512; k++) {   /* bounded accept burst */
					int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
					if (c < 0)
						break;
					if (c >= maxfd) {
						close(c);
						continue;
					}
					got[c] = 0;
					struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				close(fd);      /* also leaves the epoll set */
				continue;
			}
			long before = got[fd];
			got[fd] += r;
			if (before < hello && got[fd] >= hello)
				(void)!write(fd, "A", 1);
			long extra = got[fd] - (before > hello ? before : hello);
			if (extra > 0)
				(void)!write(fd, reply, extra > (long)sizeof(reply) ? (long)sizeof(reply) : extra);
		}
	}
	return 0;
}
