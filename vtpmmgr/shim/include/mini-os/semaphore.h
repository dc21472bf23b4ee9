/* mini-os semaphores as pthread mutexes.  mini-os threads are cooperative and a holder may yield
 * (disk, TPM and XenStore I/O); native threads are preemptive: a mutex covers both. */
#ifndef SHIM_MINIOS_SEMAPHORE_H
#define SHIM_MINIOS_SEMAPHORE_H
#include <pthread.h>

struct semaphore {
	pthread_mutex_t lock;
};

#define DECLARE_MUTEX(name) struct semaphore name = { PTHREAD_MUTEX_INITIALIZER }

static inline void down(struct semaphore *sem) { pthread_mutex_lock(&sem->lock); }
static inline void up(struct semaphore *sem) { pthread_mutex_unlock(&sem->lock); }
#endif
