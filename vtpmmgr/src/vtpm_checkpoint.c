/*
 * vtpmmgr checkpoint extension: the request thread and the table operations.
 * See vtpm_checkpoint.h and docs/protocol.md of xen-vtpm.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <mini-os/console.h>
#include <mini-os/sched.h>
#include <mini-os/semaphore.h>
#include <mini-os/xenbus.h>

#include "log.h"
#include "vtpm_manager.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_io.h"
#include "disk_crypto.h"
#include "disk_format.h"
#include "ckpt_request.h"
#include "vtpm_checkpoint.h"
#include "xfer_request.h"
#include "vtpm_transfer.h"

/* Relative to the manager's home, /local/domain/<M>. */
#define REQUEST_DIR "control/vtpmmgr/request"
#define RESPONSE_DIR "data/vtpmmgr/response"
#define FEATURE_NODE "data/vtpmmgr/feature-checkpoint"
#define PROVISIONED_NODE "data/vtpmmgr/provisioned"
#define WATCH_TOKEN "vtpmmgr-checkpoint"

static DECLARE_MUTEX(ckpt_mutex);

static struct tpm_opaque **conns;
static int nr_conns;

/* Request ids answered in this boot; forgotten once dom0 removes the request. */
static char **answered;
static int nr_answered;

/* Executed, but the answer could not be written yet: written again, never re-executed. */
struct pending {
	char *id;
	int ok;
	char text[CKPT_ERROR_MAX];   /* the hash (ok) or the error */
	char envelope[2 * XFER_ENVELOPE_SIZE + 1];   /* export's answer, empty for every other op */
};
static struct pending *pendings;
static int nr_pendings;

static xenbus_event_queue events;

void vtpm_ckpt_lock(void)
{
	down(&ckpt_mutex);
}

void vtpm_ckpt_unlock(void)
{
	up(&ckpt_mutex);
}

TPM_RESULT vtpm_ckpt_handle_cmd(struct tpm_opaque *opq, tpmcmd_t *tpmcmd)
{
	TPM_RESULT rc;
	vtpm_ckpt_lock();
	rc = vtpm_xfer_intercept(opq, tpmcmd) ? TPM_BAD_PARAMETER : vtpmmgr_handle_cmd(opq, tpmcmd);
	vtpm_ckpt_unlock();
	return rc;
}

void vtpm_ckpt_conn_opened(struct tpm_opaque *opq)
{
	struct tpm_opaque **grown;
	vtpm_ckpt_lock();
	grown = realloc(conns, (nr_conns + 1) * sizeof(conns[0]));
	if (!grown)
		abort();
	conns = grown;
	conns[nr_conns++] = opq;
	vtpm_ckpt_unlock();
}

void vtpm_ckpt_conn_closed(struct tpm_opaque *opq)
{
	int i;
	for (i = 0; i < nr_conns; i++)
		if (conns[i] == opq) {
			conns[i] = conns[--nr_conns];
			break;
		}
}

int vtpm_ckpt_is_checkpoint(const uuid_t uuid)
{
	struct mem_group *group;
	struct mem_vtpm *vtpm;
	return !find_vtpm(&group, &vtpm, uuid) && (vtpm->flags & VTPM_FLAG_CHECKPOINT);
}

/* --- the table operations ---------------------------------------------------------------- */

/* vtpm_sync_disk writes nothing without a seal for group 0: a checkpoint would then only live in RAM. */
static int provisioned(void)
{
	struct mem_group *group0 = g_mgr->groups[0].v;
	return group0 && group0->nr_seals;
}

/* Whether a restarted vTPM can get its state back: the manager writes its disk (group 0 has a seal) and
 * can verify a reconnecting vTPM (group 0 has a kernel hash).  Published for dom0, which refuses to
 * restart a vTPM the manager would only hand a fresh identity (docs/protocol.md §2). */
static void publish_provisioned(void)
{
	struct mem_group *group0 = g_mgr->groups[0].v;
	int ok = provisioned() && be32_native(group0->seal_bits.nr_kerns) > 0;
	char *msg = xenbus_write(XBT_NIL, PROVISIONED_NODE, ok ? "1" : "0");

	if (msg) {
		printk("vtpmmgr: cannot write " PROVISIONED_NODE " (%s)\n", msg);
		free(msg);
	}
}

/* The active slot must still hold what this manager last wrote: a seal list and the root sector
 * authenticated under tm_key with our sequence number.  Otherwise someone changed the disk
 * under us, and a write now would build on a table nobody can load. */
static int check_disk(char *err, size_t errlen)
{
	struct disk_seal_list *seal;
	struct disk_crypt_sector_plain *sector;
	struct disk_root_sector root;
	int slot = g_mgr->active_root;

	if (g_mgr->sequence == 0)
		return 0;                 /* nothing written yet */
	seal = disk_read_sector(seal_loc(g_mgr));
	if (memcmp(seal->hdr.magic, TPM_MGR_MAGIC, sizeof(TPM_MGR_MAGIC))) {
		snprintf(err, errlen, "manager disk corrupted: seal list of slot %d has no manager header; "
			 "table unchanged, restart the manager", slot);
		return -1;
	}
	sector = disk_read_sector(root_loc(g_mgr));
	if (aes_cmac_verify(&sector->mac, sector->data, sizeof(sector->data), &g_mgr->tm_key_e)) {
		snprintf(err, errlen, "manager disk corrupted: root sector of slot %d does not authenticate; "
			 "table unchanged, restart the manager", slot);
		return -1;
	}
	aes_decrypt_ctr(&root, sizeof(root), sector->iv_data, sizeof(sector->iv_data), &g_mgr->tm_key_e);
	if (be64_native(root.v.sequence) != g_mgr->sequence) {
		snprintf(err, errlen, "manager disk corrupted: slot %d holds sequence %" PRIu64 ", expected %" PRIu64
			 "; table unchanged, restart the manager", slot, be64_native(root.v.sequence), g_mgr->sequence);
		return -1;
	}
	return 0;
}

/* Whether a vTPM stub domain may still use vtpm: a live connection holds it (OPEN, or it
 * auto-created it) or presents its UUID, and that frontend's state node still exists.  A frontend
 * whose node is gone is a destroyed domain whose release is still in flight in tpmback. */
int vtpm_ckpt_is_open(const struct mem_vtpm *vtpm)
{
	int i;
	for (i = 0; i < nr_conns; i++) {
		struct tpm_opaque *opq = conns[i];
		char path[64], *state = NULL, *msg;
		if (opq->vtpm != vtpm && memcmp(*opq->uuid, vtpm->uuid, 16))
			continue;
		/* libxl's frontend layout (libxl_device.c): /local/domain/<F>/device/vtpm/<N> */
		snprintf(path, sizeof(path), "/local/domain/%u/device/vtpm/%u/state", opq->domid, opq->handle);
		msg = xenbus_read(XBT_NIL, path, &state);
		free(state);
		if (!msg)
			return 1;
		free(msg);
	}
	return 0;
}

static void hex20(const uint8_t *data, char out[41])
{
	int i;
	for (i = 0; i < 20; i++)
		snprintf(out + 2 * i, 3, "%02x", data[i]);
}

/* What every request needs before it may change the table. */
static int check_table(char *out, size_t outlen)
{
	if (check_disk(out, outlen))
		return -1;
	if (!provisioned()) {
		snprintf(out, outlen, "manager not provisioned (group 0 has no seal): it keeps nothing across a "
			 "restart; provision it with manage-vtpmmgr.pl group-update");
		return -1;
	}
	return 0;
}

/* A checkpoint entry proper: not a vTPM entry parked by an export (vtpm_transfer.h). */
static int is_checkpoint_entry(const struct mem_vtpm *v)
{
	return (v->flags & (VTPM_FLAG_CHECKPOINT | XFER_FLAG_EXPORTED)) == VTPM_FLAG_CHECKPOINT;
}

/* One request, under the lock.  Either the table changes and is persisted, or nothing changes. */
static int execute(const struct ckpt_request *req, char *out, size_t outlen)
{
	struct mem_group *vgroup = NULL, *cgroup = NULL;
	struct mem_vtpm *vtpm = NULL, *ckpt = NULL;
	char vname[37], cname[37];
	uint8_t saved[64];
	int exists;

	ckpt_format_uuid(req->uuid, vname);
	ckpt_format_uuid(req->checkpoint, cname);
	if (check_table(out, outlen))
		return -1;
	if (req->has_uuid && (find_vtpm(&vgroup, &vtpm, req->uuid) || (vtpm->flags & VTPM_FLAG_CHECKPOINT))) {
		snprintf(out, outlen, "unknown vTPM uuid %s", vname);
		return -1;
	}
	exists = !find_vtpm(&cgroup, &ckpt, req->checkpoint);

	switch (req->op) {
	case CKPT_OP_CHECKPOINT:
		if (exists) {
			snprintf(out, outlen, "checkpoint %s already exists", cname);
			return -1;
		}
		if (create_vtpm(vgroup, &ckpt, req->checkpoint)) {
			snprintf(out, outlen, "cannot add checkpoint %s to the table", cname);
			return -1;
		}
		ckpt->flags = VTPM_FLAG_CHECKPOINT;
		memcpy(ckpt->data, vtpm->data, 64);
		if (vtpm_sync(vgroup, ckpt)) {
			delete_vtpm(vgroup, ckpt);
			snprintf(out, outlen, "cannot persist the table; table unchanged");
			return -1;
		}
		hex20(vtpm->data, out);
		return 0;

	case CKPT_OP_RESTORE:
		if (!exists || !is_checkpoint_entry(ckpt)) {
			snprintf(out, outlen, "unknown checkpoint %s", cname);
			return -1;
		}
		if (vtpm_ckpt_is_open(vtpm)) {
			snprintf(out, outlen, "vTPM %s is open; destroy its stub domain first", vname);
			return -1;
		}
		memcpy(saved, vtpm->data, 64);
		memcpy(vtpm->data, ckpt->data, 64);
		if (vtpm_sync(vgroup, vtpm)) {
			memcpy(vtpm->data, saved, 64);
			snprintf(out, outlen, "cannot persist the table; table unchanged");
			return -1;
		}
		hex20(vtpm->data, out);
		return 0;

	case CKPT_OP_DISCARD:
		if (!exists || !is_checkpoint_entry(ckpt)) {
			snprintf(out, outlen, "unknown checkpoint %s", cname);
			return -1;
		}
		memcpy(saved, ckpt->data, 64);
		if (delete_vtpm(cgroup, ckpt)) {
			snprintf(out, outlen, "cannot remove checkpoint %s", cname);
			return -1;
		}
		if (vtpm_sync_group(cgroup, SEQ_UPDATE)) {
			if (!create_vtpm(cgroup, &ckpt, req->checkpoint)) {
				ckpt->flags = VTPM_FLAG_CHECKPOINT;
				memcpy(ckpt->data, saved, 64);
			}
			snprintf(out, outlen, "cannot persist the table; table unchanged");
			return -1;
		}
		hex20(saved, out);
		return 0;
	}
	return -1;
}

/* --- requests over XenStore --------------------------------------------------------------- */

static char *read_opt(xenbus_transaction_t xbt, const char *path)
{
	char *value = NULL, *msg = xenbus_read(xbt, path, &value);
	if (msg) {
		free(msg);
		return NULL;
	}
	return value;
}

struct request_nodes {
	char *state, *op, *uuid, *checkpoint, *owner, *answered;
	char *transfer, *recipient, *envelope;      /* transfer ops (xfer_request.h) */
};

static void free_nodes(struct request_nodes *n)
{
	free(n->state);
	free(n->op);
	free(n->uuid);
	free(n->checkpoint);
	free(n->owner);
	free(n->answered);
	free(n->transfer);
	free(n->recipient);
	free(n->envelope);
	memset(n, 0, sizeof(*n));
}

/* All nodes of one request in one transaction: a consistent view even while dom0 withdraws it. */
static int read_request(const char *id, struct request_nodes *n)
{
	char base[128], path[160];
	int retry;
	snprintf(base, sizeof(base), REQUEST_DIR "/%s", id);
	do {
		xenbus_transaction_t xbt;
		char *msg = xenbus_transaction_start(&xbt);
		if (msg) {
			free(msg);
			return -1;
		}
		memset(n, 0, sizeof(*n));
		snprintf(path, sizeof(path), "%s/state", base);
		n->state = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/op", base);
		n->op = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/uuid", base);
		n->uuid = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/checkpoint", base);
		n->checkpoint = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/transfer", base);
		n->transfer = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/recipient", base);
		n->recipient = read_opt(xbt, path);
		snprintf(path, sizeof(path), "%s/envelope", base);
		n->envelope = read_opt(xbt, path);
		msg = xenbus_get_perms(xbt, base, &n->owner);
		free(msg);
		snprintf(path, sizeof(path), RESPONSE_DIR "/%s/status", id);
		n->answered = read_opt(xbt, path);
		msg = xenbus_transaction_end(xbt, 0, &retry);
		if (msg) {
			free(msg);
			free_nodes(n);
			return -1;
		}
		if (retry)
			free_nodes(n);
	} while (retry);
	return 0;
}

/* hash or error, then status, in one transaction. */
static int write_answer(const struct pending *p)
{
	char path[160];
	int retry;
	do {
		xenbus_transaction_t xbt;
		char *msg = xenbus_transaction_start(&xbt);
		if (msg) {
			free(msg);
			return -1;
		}
		snprintf(path, sizeof(path), RESPONSE_DIR "/%s/%s", p->id, p->ok ? "hash" : "error");
		msg = xenbus_write(xbt, path, p->text);
		if (!msg && p->ok && p->envelope[0]) {
			snprintf(path, sizeof(path), RESPONSE_DIR "/%s/envelope", p->id);
			msg = xenbus_write(xbt, path, p->envelope);
		}
		if (!msg) {
			snprintf(path, sizeof(path), RESPONSE_DIR "/%s/status", p->id);
			msg = xenbus_write(xbt, path, p->ok ? "ok" : "error");
		}
		if (msg) {
			free(msg);
			free(xenbus_transaction_end(xbt, 1, &retry));
			return -1;
		}
		msg = xenbus_transaction_end(xbt, 0, &retry);
		if (msg) {
			free(msg);
			return -1;
		}
	} while (retry);
	return 0;
}

static int index_of(char **ids, int nr, const char *id)
{
	int i;
	for (i = 0; i < nr; i++)
		if (!strcmp(ids[i], id))
			return i;
	return -1;
}

static void remember_answered(const char *id)
{
	char **grown = realloc(answered, (nr_answered + 1) * sizeof(answered[0]));
	if (!grown || !(grown[nr_answered] = strdup(id)))
		abort();
	answered = grown;
	nr_answered++;
}

static void answer(struct pending *p)
{
	if (write_answer(p)) {
		printk("vtpmmgr: request %s: answer not written yet, retried on the next event\n", p->id);
		return;
	}
	remember_answered(p->id);
	free(p->id);
	*p = pendings[--nr_pendings];
}

static void process(const char *id)
{
	struct request_nodes n;
	struct ckpt_request req;
	struct xfer_request xreq;
	struct pending *p;
	char reason[CKPT_ERROR_MAX];
	int i;

	for (i = 0; i < nr_pendings; i++)
		if (!strcmp(pendings[i].id, id)) {
			answer(&pendings[i]);
			return;
		}
	if (read_request(id, &n))
		return;                       /* XenStore trouble: the next event retries */
	if (!n.state || strcmp(n.state, "submitted")) {
		free_nodes(&n);                 /* not complete yet, or withdrawn */
		return;
	}
	if (n.answered) {
		free_nodes(&n);                 /* answered in an earlier boot */
		remember_answered(id);
		return;
	}

	p = realloc(pendings, (nr_pendings + 1) * sizeof(pendings[0]));
	if (!p || !(p[nr_pendings].id = strdup(id)))
		abort();
	pendings = p;
	p = &pendings[nr_pendings++];
	p->envelope[0] = '\0';
	if (!n.owner || strcmp(n.owner + 1, "0")) {
		p->ok = 0;
		snprintf(p->text, sizeof(p->text), "request %s is not owned by dom0 (perms %.20s)", id,
			 n.owner ? n.owner : "unreadable");
	} else if (xfer_is_op(n.op)) {
		if (xfer_parse_request(n.state, n.op, n.uuid, n.checkpoint, n.transfer, n.recipient, n.envelope, &xreq,
				       reason, sizeof(reason))) {
			p->ok = 0;
			snprintf(p->text, sizeof(p->text), "%s", reason);
		} else {
			vtpm_ckpt_lock();
			p->ok = !check_table(p->text, sizeof(p->text)) &&
				!vtpm_xfer_execute(&xreq, p->text, sizeof(p->text), p->envelope, sizeof(p->envelope));
			vtpm_ckpt_unlock();
		}
		memset(&xreq, 0, sizeof(xreq));
	} else if (ckpt_parse_request(n.state, n.op, n.uuid, n.checkpoint, &req, reason, sizeof(reason))) {
		p->ok = 0;
		snprintf(p->text, sizeof(p->text), "%s", reason);
	} else {
		vtpm_ckpt_lock();
		p->ok = !execute(&req, p->text, sizeof(p->text));
		vtpm_ckpt_unlock();
	}
	printk("vtpmmgr: request %s: %s %s %s\n", id, n.op ? n.op : "?", p->ok ? "ok hash=" : "error:", p->text);
	free_nodes(&n);
	answer(p);
}

/* Watch events are hints: every event rescans the whole request directory. */
static void scan(void)
{
	char **ids = NULL, *msg = xenbus_ls(XBT_NIL, REQUEST_DIR, &ids);
	int i, nr = 0;
	if (msg) {
		free(msg);
		ids = NULL;
	}
	while (ids && ids[nr])
		nr++;
	/* dom0 removed them: forget, so the lists stay as small as the directory */
	for (i = 0; i < nr_answered; )
		if (index_of(ids, nr, answered[i]) < 0) {
			free(answered[i]);
			answered[i] = answered[--nr_answered];
		} else {
			i++;
		}
	for (i = 0; i < nr_pendings; )
		if (index_of(ids, nr, pendings[i].id) < 0) {
			free(pendings[i].id);
			pendings[i] = pendings[--nr_pendings];
		} else {
			i++;
		}
	for (i = 0; i < nr; i++) {
		if (ckpt_valid_request_id(ids[i]) && index_of(answered, nr_answered, ids[i]) < 0)
			process(ids[i]);
		free(ids[i]);
	}
	free(ids);
}

static void request_thread(void *unused)
{
	(void)unused;
	for (;;) {
		char **event;
		/* Group 0 changes only by a GROUP_UPDATE: seen here at the next request (or manager start). */
		down(&ckpt_mutex);
		publish_provisioned();
		up(&ckpt_mutex);
		scan();
		event = xenbus_wait_for_watch_return(&events);
		free(event);
	}
}

void vtpm_ckpt_start(int argc, char **argv)
{
	char *msg;
	int i;

	for (i = 1; i < argc; i++)
		if (!strcmp(argv[i], "checkpoint=0")) {
			free(xenbus_rm(XBT_NIL, FEATURE_NODE));
			printk("vtpmmgr: checkpoint extension off (checkpoint=0)\n");
			return;
		}
	msg = xenbus_watch_path_token(XBT_NIL, REQUEST_DIR, WATCH_TOKEN, &events);
	if (msg) {
		printk("vtpmmgr: cannot watch " REQUEST_DIR " (%s): checkpoint extension off\n", msg);
		free(msg);
		return;
	}
	publish_provisioned();
	/* Advertised once the watch stands: a request written from now on is seen. */
	msg = xenbus_write(XBT_NIL, FEATURE_NODE, "1");
	if (msg) {
		printk("vtpmmgr: cannot write " FEATURE_NODE " (%s)\n", msg);
		free(msg);
	}
	vtpm_xfer_start(argc, argv);
	create_thread("vtpmmgr-checkpoint", request_thread, NULL);
	printk("vtpmmgr: checkpoint extension serving " REQUEST_DIR "\n");
}
