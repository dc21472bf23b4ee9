/* mini-os services for a native build: the console, threads, sleeping. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <mini-os/console.h>
#include <mini-os/sched.h>

static pthread_mutex_t console_lock = PTHREAD_MUTEX_INITIALIZER;

/* One printk is one write: lines of concurrent threads never interleave in the console log. */
void printk(const char *fmt, ...)
{
	va_list ap;
	pthread_mutex_lock(&console_lock);
	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fflush(stdout);
	pthread_mutex_unlock(&console_lock);
}

struct thread_start {
	void (*function)(void *);
	void *data;
};

static void *thread_trampoline(void *arg)
{
	struct thread_start start = *(struct thread_start *)arg;
	free(arg);
	start.function(start.data);
	return NULL;
}

struct thread *create_thread(char *name, void (*function)(void *), void *data)
{
	pthread_t tid;
	struct thread_start *start = malloc(sizeof(*start));
	if (!start)
		abort();
	start->function = function;
	start->data = data;
	if (pthread_create(&tid, NULL, thread_trampoline, start)) {
		printk("create_thread %s failed\n", name);
		abort();
	}
	pthread_detach(tid);
	return (struct thread *)start;   /* non-NULL; callers only test it */
}

void msleep(uint32_t millisecs)
{
	struct timespec ts = { millisecs / 1000, (long)(millisecs % 1000) * 1000000L };
	while (nanosleep(&ts, &ts))
		;
}

/* vtpmmgr.c's main() sleeps 2 s first so that a mini-os console is up before it prints; a native
 * process's stdout is, and every manager start of the simulator would pay the 2 s. */
unsigned int sleep(unsigned int seconds)
{
	(void)seconds;
	return 0;
}
