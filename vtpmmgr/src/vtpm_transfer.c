/*
 * vtpmmgr transfer extension: the table operations of a move (see vtpm_transfer.h and
 * docs/protocol.md of xen-vtpm).  Each either changes the table and persists it, or changes nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <mini-os/console.h>
#include <mini-os/xenbus.h>

#include "log.h"
#include "vtpm_manager.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "ckpt_request.h"
#include "vtpm_checkpoint.h"
#include "xfer_envelope.h"
#include "xfer_tpm2.h"
#include "vtpm_transfer.h"

#define FEATURE_NODE "data/vtpmmgr/feature-transfer"
#define KEY_NODE "data/vtpmmgr/transfer-key"
#define PARKED (VTPM_FLAG_CHECKPOINT | XFER_FLAG_EXPORTED)
#define RSP_BAD_PARAMETER 3          /* TPM_BAD_PARAMETER, what an unknown or checkpoint UUID gets */

static int enabled;

void vtpm_xfer_start(int argc, char **argv)
{
	uint8_t q[XFER_POINT_SIZE];
	char hex[2 * XFER_POINT_SIZE + 1], err[CKPT_ERROR_MAX], *msg;
	int i, wanted = 0;

	for (i = 1; i < argc; i++)
		if (!strcmp(argv[i], "transfer=1"))
			wanted = 1;
	free(xenbus_rm(XBT_NIL, FEATURE_NODE));
	free(xenbus_rm(XBT_NIL, KEY_NODE));
	if (!wanted)
		return;
	vtpm_ckpt_lock();
	i = xfer_tpm_public(q, err, sizeof(err));
	vtpm_ckpt_unlock();
	if (i) {
		printk("vtpmmgr: transfer extension off: %s\n", err);
		return;
	}
	xfer_hex(q, sizeof(q), hex);
	msg = xenbus_write(XBT_NIL, KEY_NODE, hex);
	if (!msg)
		msg = xenbus_write(XBT_NIL, FEATURE_NODE, "1");
	if (msg) {
		printk("vtpmmgr: transfer extension off: cannot publish its key (%s)\n", msg);
		free(msg);
		return;
	}
	enabled = 1;
	printk("vtpmmgr: transfer extension on, transfer key %.16s...\n", hex);
}

int vtpm_xfer_intercept(struct tpm_opaque *opq, tpmcmd_t *tpmcmd)
{
	const uint8_t *r = tpmcmd->req;
	uint32_t ord;
	if (!opq || !opq->vtpm || !(opq->vtpm->flags & XFER_FLAG_EXPORTED) || tpmcmd->req_len < 10 ||
	    r[0] != (VTPM_TAG_REQ >> 8) || r[1] != (VTPM_TAG_REQ & 0xff))
		return 0;
	ord = (uint32_t)r[6] << 24 | (uint32_t)r[7] << 16 | (uint32_t)r[8] << 8 | r[9];
	if (ord != VTPM_ORD_SAVEHASHKEY && ord != VTPM_ORD_LOADHASHKEY)
		return 0;
	printk("vTPM UUID names an exported entry: refused\n");
	memcpy(tpmcmd->resp, "\x01\xc4\x00\x00\x00\x0a\x00\x00\x00", 9);
	tpmcmd->resp[9] = RSP_BAD_PARAMETER;
	tpmcmd->resp_len = 10;
	return 1;
}

static void hash_of(const struct mem_vtpm *v, char *out)
{
	xfer_hex(v->data, 20, out);
}

static void binding(struct xfer_binding *b, const struct xfer_request *req, const uint8_t recipient[XFER_POINT_SIZE])
{
	memset(b, 0, sizeof(*b));
	memcpy(b->recipient, recipient, XFER_POINT_SIZE);
	memcpy(b->transfer, req->transfer, 16);
	memcpy(b->uuid, req->uuid, 16);
	b->kind = req->has_entry ? 'c' : 'v';
	if (req->has_entry)
		memcpy(b->entry, req->entry, 16);
}

/* Persist one changed entry; on failure put the old flags back and say so. */
static int persist_flags(struct mem_group *group, struct mem_vtpm *v, uint32_t old, char *out, size_t outlen)
{
	if (!vtpm_sync(group, v))
		return 0;
	v->flags = old;
	snprintf(out, outlen, "cannot persist the table; table unchanged");
	return -1;
}

static int do_export(const struct xfer_request *req, struct mem_group *vgroup, struct mem_vtpm *vtpm,
		     char *out, size_t outlen, char *env, size_t envlen)
{
	struct mem_group *cgroup;
	struct mem_vtpm *src = vtpm;
	struct xfer_binding b;
	uint8_t eph[XFER_POINT_SIZE], z[32], sealed[XFER_ENVELOPE_SIZE];
	char name[37];

	if (envlen < 2 * sizeof(sealed) + 1) {
		snprintf(out, outlen, "envelope buffer too small");
		return -1;
	}
	if (req->has_entry && (find_vtpm(&cgroup, &src, req->entry) || (src->flags & PARKED) != VTPM_FLAG_CHECKPOINT)) {
		ckpt_format_uuid(req->entry, name);
		snprintf(out, outlen, "unknown checkpoint %s", name);
		return -1;
	}
	if (xfer_tpm_keygen(req->recipient, eph, z, out, outlen))
		return -1;
	binding(&b, req, req->recipient);
	xfer_envelope_seal(&b, eph, z, src->data, sealed);
	memset(z, 0, sizeof(z));
	/* Parked before the envelope is handed out: no vTPM on this host can run on from it. */
	if (!req->has_entry && !(vtpm->flags & XFER_FLAG_EXPORTED)) {
		uint32_t old = vtpm->flags;
		vtpm->flags |= PARKED;
		if (persist_flags(vgroup, vtpm, old, out, outlen))
			return -1;
	}
	xfer_hex(sealed, sizeof(sealed), env);
	hash_of(src, out);
	return 0;
}

static int do_import(const struct xfer_request *req, char *out, size_t outlen)
{
	struct mem_group *group = NULL, *vgroup = NULL;
	struct mem_vtpm *target = NULL, *vtpm = NULL;
	const uint8_t *id = req->has_entry ? req->entry : req->uuid;
	uint32_t flags = req->has_entry ? VTPM_FLAG_CHECKPOINT : XFER_FLAG_IMPORTED;
	struct xfer_binding b;
	uint8_t q[XFER_POINT_SIZE], z[32], data[64];
	char name[37];
	int exists, rc;

	if (req->has_entry && (find_vtpm(&vgroup, &vtpm, req->uuid) || (vtpm->flags & VTPM_FLAG_CHECKPOINT))) {
		ckpt_format_uuid(req->uuid, name);
		snprintf(out, outlen, "unknown vTPM uuid %s", name);
		return -1;
	}
	if (req->envelope[0] != XFER_VERSION) {
		snprintf(out, outlen, "not a version %d transfer envelope (altered, or from another version)",
			 XFER_VERSION);
		return -1;
	}
	if (xfer_tpm_zgen(xfer_envelope_point(req->envelope), q, z, out, outlen))
		return -1;
	binding(&b, req, q);
	rc = xfer_envelope_open(&b, z, req->envelope, data);
	memset(z, 0, sizeof(z));
	if (rc) {
		snprintf(out, outlen, "the envelope does not open with this manager's transfer key (made for another "
			 "manager, another vTPM or transfer, or altered)");
		return -1;
	}
	ckpt_format_uuid(id, name);
	exists = !find_vtpm(&group, &target, id);
	if (exists && (target->flags & XFER_FLAG_REMOVED) && !req->has_entry) {
		uint32_t old = target->flags;
		target->flags = flags;
		memcpy(target->data, data, 64);
		memset(data, 0, sizeof(data));
		if (vtpm_sync(group, target)) {
			target->flags = old;
			memset(target->data, 0, 64);
			snprintf(out, outlen, "cannot persist the table; table unchanged");
			return -1;
		}
		hash_of(target, out);
		return 0;
	}
	if (exists) {
		/* The same import again (dom0 lost the answer): done, nothing to change. */
		rc = (target->flags & VTPM_FLAG_DISK_MASK) == flags && !memcmp(target->data, data, 64) ? 0 : -1;
		if (rc)
			snprintf(out, outlen, "%s %s already exists", req->has_entry ? "checkpoint" : "vTPM", name);
		else
			hash_of(target, out);
		memset(data, 0, sizeof(data));
		return rc;
	}
	group = req->has_entry ? vgroup : g_mgr->groups[0].v;
	if (create_vtpm(group, &target, id)) {
		memset(data, 0, sizeof(data));
		snprintf(out, outlen, "cannot add %s to the table", name);
		return -1;
	}
	target->flags = flags;
	memcpy(target->data, data, 64);
	memset(data, 0, sizeof(data));
	if (vtpm_sync(group, target)) {
		delete_vtpm(group, target);
		snprintf(out, outlen, "cannot persist the table; table unchanged");
		return -1;
	}
	hash_of(target, out);
	return 0;
}

static int do_remove(struct mem_group *group, struct mem_vtpm *vtpm, const uint8_t uuid[16], const char *name,
		     char *out, size_t outlen)
{
	uint8_t saved[64];
	uint32_t flags = vtpm->flags & VTPM_FLAG_DISK_MASK;
	char hash[41];
	if (!(flags & (XFER_FLAG_EXPORTED | XFER_FLAG_IMPORTED))) {
		snprintf(out, outlen, "vTPM %s was neither exported nor imported; refusing to remove it", name);
		return -1;
	}
	if (vtpm_ckpt_is_open(vtpm)) {
		snprintf(out, outlen, "vTPM %s is open; destroy its stub domain first", name);
		return -1;
	}
	hash_of(vtpm, hash);
	memcpy(saved, vtpm->data, 64);
	if (group->nr_vtpms == 1) {
		vtpm->flags = PARKED | XFER_FLAG_REMOVED;
		memset(vtpm->data, 0, 64);
		if (vtpm_sync(group, vtpm)) {
			vtpm->flags = flags;
			memcpy(vtpm->data, saved, 64);
			snprintf(out, outlen, "cannot persist the table; table unchanged");
			return -1;
		}
	} else if (delete_vtpm(group, vtpm)) {
		snprintf(out, outlen, "cannot remove vTPM %s", name);
		return -1;
	} else if (vtpm_sync_group(group, SEQ_UPDATE)) {
		struct mem_vtpm *again;
		if (!create_vtpm(group, &again, uuid)) {
			again->flags = flags;
			memcpy(again->data, saved, 64);
		}
		snprintf(out, outlen, "cannot persist the table; table unchanged");
		return -1;
	}
	memset(saved, 0, sizeof(saved));
	snprintf(out, outlen, "%s", hash);
	return 0;
}

int vtpm_xfer_execute(const struct xfer_request *req, char *out, size_t outlen, char *env, size_t envlen)
{
	struct mem_group *group = NULL;
	struct mem_vtpm *vtpm = NULL;
	char name[37];
	uint32_t old;

	if (!enabled) {
		snprintf(out, outlen, "transfer not enabled: start the manager with transfer=1");
		return -1;
	}
	ckpt_format_uuid(req->uuid, name);
	if (req->op == XFER_OP_IMPORT)
		return do_import(req, out, outlen);
	/* A parked entry is still the vTPM's; a genuine checkpoint entry is not a vTPM, a removed one is gone. */
	if (find_vtpm(&group, &vtpm, req->uuid) || (vtpm->flags & PARKED) == VTPM_FLAG_CHECKPOINT ||
	    (vtpm->flags & XFER_FLAG_REMOVED)) {
		snprintf(out, outlen, "unknown vTPM uuid %s", name);
		return -1;
	}
	old = vtpm->flags;
	switch (req->op) {
	case XFER_OP_EXPORT:
		return do_export(req, group, vtpm, out, outlen, env, envlen);
	case XFER_OP_UNEXPORT:
		vtpm->flags &= ~PARKED;
		break;
	case XFER_OP_ADOPT:
		if (vtpm->flags & XFER_FLAG_EXPORTED) {
			snprintf(out, outlen, "vTPM %s is exported; unexport it first", name);
			return -1;
		}
		vtpm->flags &= ~XFER_FLAG_IMPORTED;
		break;
	case XFER_OP_REMOVE:
		return do_remove(group, vtpm, req->uuid, name, out, outlen);
	default:
		snprintf(out, outlen, "unknown transfer op");
		return -1;
	}
	if (vtpm->flags != old && persist_flags(group, vtpm, old, out, outlen))
		return -1;
	hash_of(vtpm, out);
	return 0;
}
