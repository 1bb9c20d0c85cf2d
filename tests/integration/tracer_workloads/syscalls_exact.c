/* Exact syscall workload: waits for one byte on stdin (the tracer attaches meanwhile), then
 * makes argv-given numbers of getppid, write(/dev/null) and failing openat calls, and exits.
 * Raw syscall(2) so glibc can neither cache nor batch anything. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n_getppid = argc > 1 ? atol(argv[1]) : 100000;
	long n_write = argc > 2 ? atol(argv[2]) : 20000;
	long n_enoent = argc > 3 ? atol(argv[3]) : 5000;
	char c = 'x';
	int devnull;

	/* "waiting": the test attaches its tracer, then sends the byte */
	if (write(1, "w\n", 2) != 2 || read(0, &c, 1) != 1)
		return 1;
	devnull = syscall(SYS_openat, AT_FDCWD, "/dev/null", O_WRONLY);
	if (devnull < 0)
		return 2;
	for (long i = 0; i < n_getppid; i++)
		syscall(SYS_getppid);
	for (long i = 0; i < n_write; i++)
		syscall(SYS_write, devnull, &c, 1);
	for (long i = 0; i < n_enoent; i++)
		syscall(SYS_openat, AT_FDCWD, "/nonexistent/sni-proxy-tracer-test", O_RDONLY);
	syscall(SYS_exit_group, 0);
	return 0;
}
