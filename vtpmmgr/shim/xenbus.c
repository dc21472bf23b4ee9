/* The mini-os xenbus API over Debian's libxenstore.
 *
 * XENSTORED_PATH names the manager's own connection (a domain's "ring"), so xenstored applies the
 * manager's permissions and resolves relative paths under its home, as for a mini-os domain.
 * One dispatcher thread reads watch events and queues them by token like mini-os's xenbus thread. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenstore.h>

#include <mini-os/console.h>
#include <mini-os/xenbus.h>

#include "shim.h"

static struct xs_handle *xsh;
static pthread_mutex_t watch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t watch_cond = PTHREAD_COND_INITIALIZER;

struct watch {
	char *token;
	xenbus_event_queue *events;
	int woken;
	struct watch *next;
};
static struct watch *watches;

static char *errname(int err)
{
	static const struct { int no; const char *name; } names[] = {
		{ EINVAL, "EINVAL" }, { EACCES, "EACCES" }, { EEXIST, "EEXIST" }, { EISDIR, "EISDIR" },
		{ ENOENT, "ENOENT" }, { ENOMEM, "ENOMEM" }, { ENOSPC, "ENOSPC" }, { EIO, "EIO" },
		{ ENOTEMPTY, "ENOTEMPTY" }, { ENOSYS, "ENOSYS" }, { EROFS, "EROFS" }, { EBUSY, "EBUSY" },
		{ EAGAIN, "EAGAIN" }, { EISCONN, "EISCONN" }, { E2BIG, "E2BIG" }, { EPERM, "EPERM" },
	};
	size_t i;
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i].no == err)
			return strdup(names[i].name);
	return strdup("EIO");
}

char *xenbus_read(xenbus_transaction_t xbt, const char *path, char **value)
{
	unsigned int len;
	char *v = xs_read(xsh, (xs_transaction_t)xbt, path, &len);
	if (!v) {
		*value = NULL;
		return errname(errno);
	}
	*value = v;   /* libxenstore NUL-terminates */
	return NULL;
}

char *xenbus_write(xenbus_transaction_t xbt, const char *path, const char *value)
{
	if (!xs_write(xsh, (xs_transaction_t)xbt, path, value, strlen(value)))
		return errname(errno);
	return NULL;
}

char *xenbus_rm(xenbus_transaction_t xbt, const char *path)
{
	if (!xs_rm(xsh, (xs_transaction_t)xbt, path))
		return errname(errno);
	return NULL;
}

char *xenbus_ls(xenbus_transaction_t xbt, const char *prefix, char ***contents)
{
	unsigned int num, i;
	char **dir = xs_directory(xsh, (xs_transaction_t)xbt, prefix, &num);
	char **res;
	if (!dir) {
		*contents = NULL;
		return errname(errno);
	}
	/* mini-os hands out separately malloc'd strings in a NULL-terminated array. */
	res = calloc(num + 1, sizeof(res[0]));
	if (!res)
		abort();
	for (i = 0; i < num; i++)
		if (!(res[i] = strdup(dir[i])))
			abort();
	free(dir);
	*contents = res;
	return NULL;
}

char *xenbus_get_perms(xenbus_transaction_t xbt, const char *path, char **value)
{
	static const char letters[] = { 'n', 'r', 'w', 'b' };
	unsigned int num;
	struct xs_permissions *perms = xs_get_permissions(xsh, (xs_transaction_t)xbt, path, &num);
	char *out;
	if (!perms) {
		*value = NULL;
		return errname(errno);
	}
	/* mini-os returns the raw reply as a C string, i.e. its first entry: the owner. */
	out = malloc(16);
	if (!out)
		abort();
	snprintf(out, 16, "%c%u", letters[perms[0].perms & 3], perms[0].id);
	free(perms);
	*value = out;
	return NULL;
}

char *xenbus_transaction_start(xenbus_transaction_t *xbt)
{
	xs_transaction_t t = xs_transaction_start(xsh);
	if (t == XBT_NULL)
		return errname(errno);
	*xbt = (xenbus_transaction_t)t;
	return NULL;
}

char *xenbus_transaction_end(xenbus_transaction_t xbt, int abort_tx, int *retry)
{
	*retry = 0;
	if (!xs_transaction_end(xsh, (xs_transaction_t)xbt, abort_tx)) {
		if (errno == EAGAIN) {
			*retry = 1;
			return NULL;
		}
		return errname(errno);
	}
	return NULL;
}

char *xenbus_watch_path_token(xenbus_transaction_t xbt, const char *path, const char *token,
			      xenbus_event_queue *events)
{
	struct watch *w = calloc(1, sizeof(*w));
	(void)xbt;
	if (!w || !(w->token = strdup(token)))
		abort();
	w->events = events;
	pthread_mutex_lock(&watch_lock);
	w->next = watches;
	watches = w;
	pthread_mutex_unlock(&watch_lock);
	if (!xs_watch(xsh, path, token))
		return errname(errno);
	return NULL;
}

char *xenbus_unwatch_path_token(xenbus_transaction_t xbt, const char *path, const char *token)
{
	(void)xbt;
	if (!xs_unwatch(xsh, path, token))
		return errname(errno);
	return NULL;
}

char **xenbus_wait_for_watch_return(xenbus_event_queue *queue)
{
	struct xenbus_event *event;
	struct watch *w;
	pthread_mutex_lock(&watch_lock);
	for (;;) {
		if ((event = *queue)) {
			*queue = event->next;
			break;
		}
		for (w = watches; w; w = w->next)
			if (w->events == queue && w->woken) {
				w->woken = 0;
				pthread_mutex_unlock(&watch_lock);
				return NULL;
			}
		pthread_cond_wait(&watch_cond, &watch_lock);
	}
	pthread_mutex_unlock(&watch_lock);
	return &event->path;
}

void shim_xenbus_wake(xenbus_event_queue *queue)
{
	struct watch *w;
	pthread_mutex_lock(&watch_lock);
	for (w = watches; w; w = w->next)
		if (w->events == queue)
			w->woken = 1;
	pthread_cond_broadcast(&watch_cond);
	pthread_mutex_unlock(&watch_lock);
}

static void queue_event(const char *path, const char *token)
{
	struct watch *w;
	pthread_mutex_lock(&watch_lock);
	for (w = watches; w; w = w->next) {
		size_t plen = strlen(path) + 1, tlen = strlen(token) + 1;
		struct xenbus_event *ev, **tail;
		if (strcmp(w->token, token))
			continue;
		/* One block, path first, as mini-os allocates it: the caller frees the returned pointer. */
		ev = malloc(sizeof(*ev) + plen + tlen);
		if (!ev)
			abort();
		ev->path = (char *)(ev + 1);
		ev->token = ev->path + plen;
		memcpy(ev->path, path, plen);
		memcpy(ev->token, token, tlen);
		ev->next = NULL;
		for (tail = w->events; *tail; tail = &(*tail)->next)
			;
		*tail = ev;
	}
	pthread_cond_broadcast(&watch_cond);
	pthread_mutex_unlock(&watch_lock);
}

static void *dispatch_watches(void *arg)
{
	(void)arg;
	for (;;) {
		unsigned int num;
		char **vec = xs_read_watch(xsh, &num);
		if (!vec) {
			printk("xenbus: lost the connection to xenstored\n");
			exit(3);
		}
		queue_event(vec[XS_WATCH_PATH], vec[XS_WATCH_TOKEN]);
		free(vec);
	}
	return NULL;
}

domid_t xenbus_get_self_id(void)
{
	return shim_config.domid;
}

int shim_xenbus_init(void)
{
	pthread_t tid;
	xsh = xs_open(0);
	if (!xsh)
		return -1;
	if (pthread_create(&tid, NULL, dispatch_watches, NULL))
		return -1;
	pthread_detach(tid);
	return 0;
}
