/* The mini-os xenbus API (include/xenbus.h) over libxenstore: same calls, same error strings
 * (a malloc'd "ENOENT" etc.), same relative paths (resolved by xenstored for a domain's connection). */
#ifndef SHIM_MINIOS_XENBUS_H
#define SHIM_MINIOS_XENBUS_H
#include <xen/xen.h>

typedef unsigned long xenbus_transaction_t;
#define XBT_NIL ((xenbus_transaction_t)0)

struct xenbus_event {
	char *path;          /* first member: xenbus_wait_for_watch_return() returns &event->path */
	char *token;
	struct xenbus_event *next;
};
typedef struct xenbus_event *xenbus_event_queue;

char *xenbus_read(xenbus_transaction_t xbt, const char *path, char **value);
char *xenbus_write(xenbus_transaction_t xbt, const char *path, const char *value);
char *xenbus_rm(xenbus_transaction_t xbt, const char *path);
char *xenbus_ls(xenbus_transaction_t xbt, const char *prefix, char ***contents);
char *xenbus_get_perms(xenbus_transaction_t xbt, const char *path, char **value);
char *xenbus_transaction_start(xenbus_transaction_t *xbt);
char *xenbus_transaction_end(xenbus_transaction_t xbt, int abort, int *retry);
char *xenbus_watch_path_token(xenbus_transaction_t xbt, const char *path, const char *token,
			      xenbus_event_queue *events);
char *xenbus_unwatch_path_token(xenbus_transaction_t xbt, const char *path, const char *token);
char **xenbus_wait_for_watch_return(xenbus_event_queue *queue);
domid_t xenbus_get_self_id(void);

/* Native only: connect (XENSTORED_PATH names this domain's socket); 0 or -1. */
int shim_xenbus_init(void);
/* Native only: wake every waiter of `queue` with no event (xenbus_wait_for_watch_return -> NULL). */
void shim_xenbus_wake(xenbus_event_queue *queue);
#endif
