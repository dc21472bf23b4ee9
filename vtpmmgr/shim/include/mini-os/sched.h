#ifndef SHIM_MINIOS_SCHED_H
#define SHIM_MINIOS_SCHED_H
#include <stdint.h>
struct thread;
/* Starts fn(data) in its own (native) thread; mini-os's threads are cooperative, these are not. */
struct thread *create_thread(char *name, void (*function)(void *), void *data);
void msleep(uint32_t millisecs);
#endif
