/* Busy neighbour for the -p filter test: getppid in a loop until killed. */
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	for (;;)
		syscall(SYS_getppid);
}
