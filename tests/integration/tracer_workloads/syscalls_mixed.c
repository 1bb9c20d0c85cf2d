/* A mixed workload for the comparison with `strace -c -f`: a forked child and the parent
 * each run loops of ordinary calls (some failing), then exit. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void work(int rounds)
{
	char buf[256];
	struct stat st;

	for (int i = 0; i < rounds; i++) {
		int fd = open("/dev/zero", O_RDONLY);

		if (fd >= 0) {
			read(fd, buf, sizeof(buf));
			fstat(fd, &st);
			lseek(fd, 0, SEEK_SET);
			close(fd);
		}
		stat("/nonexistent/mixed", &st);	/* ENOENT */
		getppid();
		getuid();
		access("/etc/hostname", R_OK);
	}
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3000;
	char c;
	pid_t child;

	/* "waiting": the test attaches its tracer, then sends the byte */
	if (write(1, "w\n", 2) != 2 || read(0, &c, 1) != 1)
		return 1;
	child = fork();
	if (child == 0) {
		work(rounds);
		_exit(0);
	}
	work(rounds);
	waitpid(child, NULL, 0);
	return 0;
}
