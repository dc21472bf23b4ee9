/* mini-os tpmback for a native build.
 *
 * The XenStore side follows mini-os tpmback.c: it watches backend/vtpm (relative to the manager's
 * home), reads the toolstack's uuid, goes to InitWait (2), Connected (4) when the frontend is
 * Initialised/Connected, and frees the tpmif -- close callback, state 5 then 6, backend dir
 * removed -- once the frontend's state node is gone.  The shared page is the simulator's ring: a
 * Unix socket <run>/tpmif/<B>-<F>-<N>.sock created before the backend says Connected, carrying
 * packets framed by their paramSize.
 *
 * Threads: the tpmback thread runs the state machine; the manager's main thread waits in
 * tpmback_req_any().  Descriptors are closed only by the main thread (a freed tpmif goes to a
 * graveyard first), so a descriptor it polls is never reused under it; a tpmif with a command in
 * flight is freed only after its response, so free_opaque never runs under vtpmmgr_handle_cmd. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <mini-os/console.h>
#include <mini-os/sched.h>
#include <mini-os/tpmback.h>
#include <mini-os/xenbus.h>

#include "shim.h"

#define HEADER_SIZE 10
#define MAX_PACKET (4096 - 8)       /* one tpmif v2 page minus its header */

struct tpmif {
	domid_t domid;
	unsigned int handle;
	char be_path[64];            /* relative: backend/vtpm/<F>/<N> */
	char *fe_path;
	unsigned char uuid[16];
	int state;
	int connected;
	void *opaque;
	char sock_path[108];
	int listen_fd;
	int conn_fd;
	int busy;                    /* a command of this tpmif is being handled */
	int closing;                 /* being freed: no new command is taken from it */
	tpmcmd_t cmd;
	uint8_t req[MAX_PACKET];
	struct tpmif *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER;
static struct tpmif *tpmifs, *graveyard;
static int wake_pipe[2] = { -1, -1 };
static int stopping;
static void (*open_callback)(domid_t, unsigned int);
static void (*close_callback)(domid_t, unsigned int);
static xenbus_event_queue events;

struct bad { domid_t domid; unsigned int handle; };
static struct bad *bads;
static size_t nr_bads;

static void wake_main(void)
{
	char c = 0;
	if (write(wake_pipe[1], &c, 1) < 0 && errno != EAGAIN)
		abort();
}

static struct tpmif *find(domid_t domid, unsigned int handle)
{
	struct tpmif *t;
	for (t = tpmifs; t; t = t->next)
		if (t->domid == domid && t->handle == handle)
			return t;
	return NULL;
}

static char *read_node(const char *dir, const char *node)
{
	char path[256], *value = NULL, *err;
	snprintf(path, sizeof(path), "%s/%s", dir, node);
	err = xenbus_read(XBT_NIL, path, &value);
	free(err);
	return err ? NULL : value;
}

static void write_node(const char *dir, const char *node, const char *value)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", dir, node);
	free(xenbus_write(XBT_NIL, path, value));
}

static void set_state(struct tpmif *t, int state)
{
	char v[4];
	snprintf(v, sizeof(v), "%d", state);
	t->state = state;
	write_node(t->be_path, "state", v);
}

static int parse_uuid(const char *s, unsigned char out[16])
{
	int i, n = 0;
	if (!s || strlen(s) != 36)
		return -1;
	for (i = 0; i < 36; i++) {
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (s[i] != '-')
				return -1;
			continue;
		}
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F')))
			return -1;
		if (sscanf(s + i, "%2hhx", &out[n]) != 1)
			return -1;
		n++;
		i++;
	}
	return n == 16 ? 0 : -1;
}

static int open_ring(struct tpmif *t)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	snprintf(t->sock_path, sizeof(t->sock_path), "%s/tpmif/%u-%u-%u.sock", shim_config.run_dir,
		 shim_config.domid, t->domid, t->handle);
	unlink(t->sock_path);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", t->sock_path);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 1)) {
		close(fd);
		return -1;
	}
	t->listen_fd = fd;
	return 0;
}

static void new_tpmif(domid_t domid, unsigned int handle)
{
	struct tpmif *t = calloc(1, sizeof(*t));
	char *uuid;
	if (!t)
		abort();
	t->domid = domid;
	t->handle = handle;
	t->listen_fd = t->conn_fd = -1;
	snprintf(t->be_path, sizeof(t->be_path), "backend/vtpm/%u/%u", domid, handle);
	uuid = read_node(t->be_path, "uuid");
	t->fe_path = read_node(t->be_path, "frontend");
	if (parse_uuid(uuid, t->uuid) || !t->fe_path) {
		printk("tpmback.c:285: Error: %s: bad uuid or frontend\n", t->be_path);
		free(uuid);
		free(t->fe_path);
		free(t);
		bads = realloc(bads, (nr_bads + 1) * sizeof(*bads));
		if (!bads)
			abort();
		bads[nr_bads].domid = domid;
		bads[nr_bads++].handle = handle;
		return;
	}
	free(uuid);
	write_node(t->be_path, "feature-protocol-v2", "1");
	set_state(t, 2);
	{
		char path[300];
		snprintf(path, sizeof(path), "%s/state", t->fe_path);
		free(xenbus_watch_path_token(XBT_NIL, path, "tpmback", &events));
	}
	pthread_mutex_lock(&lock);
	t->next = tpmifs;
	tpmifs = t;
	pthread_mutex_unlock(&lock);
	open_callback(domid, handle);
}

static void release(struct tpmif *t, int remove);

struct late_release {
	struct tpmif *t;
	int remove;
};

static void release_later(void *arg)
{
	struct late_release *late = arg;
	msleep(shim_config.release_delay_ms);
	release(late->t, late->remove);
	free(late);
}

static void free_tpmif(struct tpmif *t, int remove)
{
	if (remove) {
		set_state(t, 5);
		set_state(t, 6);
	}
	pthread_mutex_lock(&lock);
	t->closing = 1;
	pthread_mutex_unlock(&lock);
	if (shim_config.release_delay_ms) {
		/* --release-delay: the toolstack saw the frontend go (and may remove the backend) before
		 * the close callback clears OPEN; meanwhile new frontends are served. */
		struct late_release *late = malloc(sizeof(*late));
		if (!late)
			abort();
		late->t = t;
		late->remove = remove;
		create_thread("tpmback-release", release_later, late);
		return;
	}
	release(t, remove);
}

static void release(struct tpmif *t, int remove)
{
	struct tpmif **pp;
	char path[300];
	pthread_mutex_lock(&lock);
	while (t->busy)
		pthread_cond_wait(&idle, &lock);
	pthread_mutex_unlock(&lock);
	close_callback(t->domid, t->handle);
	pthread_mutex_lock(&lock);
	for (pp = &tpmifs; *pp; pp = &(*pp)->next)
		if (*pp == t) {
			*pp = t->next;
			break;
		}
	pthread_mutex_unlock(&lock);
	snprintf(path, sizeof(path), "%s/state", t->fe_path);
	free(xenbus_unwatch_path_token(XBT_NIL, path, "tpmback"));
	if (remove)
		free(xenbus_rm(XBT_NIL, t->be_path));
	if (t->sock_path[0])
		unlink(t->sock_path);
	pthread_mutex_lock(&lock);
	if (t->conn_fd >= 0)
		shutdown(t->conn_fd, SHUT_RDWR);
	t->next = graveyard;
	graveyard = t;
	pthread_mutex_unlock(&lock);
	wake_main();
}

static int is_bad(domid_t domid, unsigned int handle)
{
	size_t i;
	for (i = 0; i < nr_bads; i++)
		if (bads[i].domid == domid && bads[i].handle == handle)
			return 1;
	return 0;
}

static void scan(void)
{
	struct tpmif *t, *next;
	char **fes = NULL, *err;
	size_t i, j, keep = 0;
	struct bad *present = NULL;
	size_t nr_present = 0;

	/* Frees first: a frontend that went away releases its OPEN flag before a new connection with
	 * the same UUID is looked at, as the ordered watch events of the real tpmback do. */
	pthread_mutex_lock(&lock);
	t = tpmifs;
	pthread_mutex_unlock(&lock);
	for (; t; t = next) {
		char *be_state, *fe_state;
		int closing;
		pthread_mutex_lock(&lock);
		next = t->next;
		closing = t->closing;
		pthread_mutex_unlock(&lock);
		if (closing)
			continue;                /* being released (--release-race) */
		be_state = read_node(t->be_path, "state");
		if (!be_state) {
			free_tpmif(t, 0);
			continue;
		}
		free(be_state);
		fe_state = read_node(t->fe_path, "state");
		if (!fe_state) {
			free_tpmif(t, 1);
		} else if ((!strcmp(fe_state, "3") || !strcmp(fe_state, "4")) && !t->connected) {
			if (t->listen_fd < 0 && open_ring(t))
				printk("tpmback.c: Error: cannot open the ring of %s\n", t->be_path);
			t->connected = 1;
			wake_main();
			write_node(t->be_path, "ready", "1");
			set_state(t, 4);
		} else if (!strcmp(fe_state, "5") && t->state != 5) {
			set_state(t, 5);
		} else if (!strcmp(fe_state, "6") && t->connected) {
			t->connected = 0;
			set_state(t, 2);
		}
		free(fe_state);
	}

	err = xenbus_ls(XBT_NIL, "backend/vtpm", &fes);
	free(err);
	for (i = 0; fes && fes[i]; i++) {
		char dir[64], **devs = NULL;
		unsigned int fe = (unsigned int)strtoul(fes[i], NULL, 10);
		snprintf(dir, sizeof(dir), "backend/vtpm/%s", fes[i]);
		free(xenbus_ls(XBT_NIL, dir, &devs));
		for (j = 0; devs && devs[j]; j++) {
			unsigned int dev = (unsigned int)strtoul(devs[j], NULL, 10);
			present = realloc(present, (nr_present + 1) * sizeof(*present));
			if (!present)
				abort();
			present[nr_present].domid = (domid_t)fe;
			present[nr_present++].handle = dev;
			free(devs[j]);
		}
		free(devs);
		free(fes[i]);
	}
	free(fes);
	/* A removed bad entry may come back repaired. */
	for (i = 0; i < nr_bads; i++)
		for (j = 0; j < nr_present; j++)
			if (bads[i].domid == present[j].domid && bads[i].handle == present[j].handle) {
				bads[keep++] = bads[i];
				break;
			}
	nr_bads = keep;
	for (j = 0; j < nr_present; j++) {
		int known;
		pthread_mutex_lock(&lock);
		known = find(present[j].domid, present[j].handle) != NULL;
		pthread_mutex_unlock(&lock);
		if (!known && !is_bad(present[j].domid, present[j].handle))
			new_tpmif(present[j].domid, present[j].handle);
	}
	free(present);
}

static void tpmback_thread(void *arg)
{
	(void)arg;
	free(xenbus_watch_path_token(XBT_NIL, "backend/vtpm", "tpmback", &events));
	while (!stopping) {
		char **ev;
		scan();
		ev = xenbus_wait_for_watch_return(&events);
		free(ev);
	}
}

void init_tpmback(void (*open_cb)(domid_t, unsigned int), void (*close_cb)(domid_t, unsigned int))
{
	open_callback = open_cb;
	close_callback = close_cb;
	if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK))
		abort();
	create_thread("tpmback", tpmback_thread, NULL);
}

void shutdown_tpmback(void)
{
	stopping = 1;
	shim_xenbus_wake(&events);
	wake_main();
}

/* One framed packet from a connected ring: 0 ok, -1 closed or malformed (the frontend reconnects). */
static int read_packet(struct tpmif *t)
{
	size_t have = 0, want = HEADER_SIZE;
	while (have < want) {
		ssize_t n = read(t->conn_fd, t->req + have, want - have);
		if (n <= 0)
			return -1;
		have += (size_t)n;
		if (have == HEADER_SIZE && want == HEADER_SIZE) {
			uint32_t size = ((uint32_t)t->req[2] << 24) | ((uint32_t)t->req[3] << 16) |
					((uint32_t)t->req[4] << 8) | t->req[5];
			if (size < HEADER_SIZE || size > MAX_PACKET)
				return -1;
			want = size;
		}
	}
	t->cmd.domid = t->domid;
	t->cmd.handle = t->handle;
	t->cmd.locality = 0;
	t->cmd.opaque = t->opaque;
	t->cmd.req = t->req;
	t->cmd.req_len = (unsigned int)want;
	t->cmd.resp_len = 0;
	return 0;
}

tpmcmd_t *tpmback_req_any(void)
{
	for (;;) {
		struct pollfd fds[256];
		struct tpmif *owners[256], *t;
		nfds_t n = 1;
		nfds_t i;

		pthread_mutex_lock(&lock);
		while ((t = graveyard)) {
			graveyard = t->next;
			if (t->listen_fd >= 0)
				close(t->listen_fd);
			if (t->conn_fd >= 0)
				close(t->conn_fd);
			free(t->fe_path);
			free(t);
		}
		if (stopping) {
			pthread_mutex_unlock(&lock);
			return NULL;
		}
		fds[0].fd = wake_pipe[0];
		fds[0].events = POLLIN;
		owners[0] = NULL;
		for (t = tpmifs; t && n < 255; t = t->next) {
			int fd = t->conn_fd >= 0 ? t->conn_fd : t->listen_fd;
			if (fd < 0 || t->closing)
				continue;
			fds[n].fd = fd;
			fds[n].events = POLLIN;
			owners[n++] = t;
		}
		pthread_mutex_unlock(&lock);

		if (poll(fds, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			abort();
		}
		if (fds[0].revents) {
			char buf[64];
			while (read(wake_pipe[0], buf, sizeof(buf)) > 0)
				;
			continue;
		}
		for (i = 1; i < n; i++) {
			if (!fds[i].revents)
				continue;
			pthread_mutex_lock(&lock);
			t = owners[i];
			for (struct tpmif *g = graveyard; g; g = g->next)
				if (g == t)
					t = NULL;
			if (t && t->closing)
				t = NULL;
			if (t)
				t->busy = 1;
			pthread_mutex_unlock(&lock);
			if (!t)
				break;
			if (fds[i].fd == t->listen_fd && t->conn_fd < 0) {
				t->conn_fd = accept4(t->listen_fd, NULL, NULL, SOCK_CLOEXEC);
			} else if (read_packet(t) == 0) {
				return &t->cmd;          /* stays busy until tpmback_resp */
			} else {
				close(t->conn_fd);
				t->conn_fd = -1;
			}
			pthread_mutex_lock(&lock);
			t->busy = 0;
			pthread_cond_broadcast(&idle);
			pthread_mutex_unlock(&lock);
			break;
		}
	}
}

void tpmback_resp(tpmcmd_t *tpmcmd)
{
	struct tpmif *t = (struct tpmif *)((char *)tpmcmd - offsetof(struct tpmif, cmd));
	size_t done = 0;
	if (tpmcmd->resp_len > MAX_PACKET) {
		printk("Command size too long for shared page!\n");
	} else {
		while (done < tpmcmd->resp_len) {
			ssize_t n = send(t->conn_fd, tpmcmd->resp + done, tpmcmd->resp_len - done, MSG_NOSIGNAL);
			if (n <= 0)
				break;
			done += (size_t)n;
		}
	}
	pthread_mutex_lock(&lock);
	t->busy = 0;
	pthread_cond_broadcast(&idle);
	pthread_mutex_unlock(&lock);
}

unsigned char *tpmback_get_uuid(domid_t domid, unsigned int handle)
{
	struct tpmif *t;
	pthread_mutex_lock(&lock);
	t = find(domid, handle);
	pthread_mutex_unlock(&lock);
	return t ? t->uuid : NULL;
}

void *tpmback_get_opaque(domid_t domid, unsigned int handle)
{
	struct tpmif *t;
	void *opq = NULL;
	pthread_mutex_lock(&lock);
	for (t = tpmifs; t; t = t->next)
		if (t->domid == domid && t->handle == handle)
			opq = t->opaque;
	pthread_mutex_unlock(&lock);
	return opq;
}

int tpmback_set_opaque(domid_t domid, unsigned int handle, void *opaque)
{
	struct tpmif *t;
	pthread_mutex_lock(&lock);
	t = find(domid, handle);
	if (t)
		t->opaque = opaque;
	pthread_mutex_unlock(&lock);
	return t ? 0 : -1;
}

/* evtchn_get_peercontext: two xsm_ops.  Without FLASK, Xen's dummy XSM module answers them with
 * -ENOSYS (docs/xen-internals.md §3.5), and so does this without --xsm flask. */
int tpmback_get_peercontext(domid_t domid, unsigned int handle, void *buffer, int buflen)
{
	(void)domid;
	(void)handle;
	if (!shim_config.xsm)
		return -ENOSYS;
	if (buflen <= (int)strlen(shim_config.xsm_label))
		return -1;
	strcpy(buffer, shim_config.xsm_label);
	return 0;
}
