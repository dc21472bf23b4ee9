/*
 * vtpmmgr checkpoint extension (docs/protocol.md of xen-vtpm).
 *
 * dom0 asks the manager, over XenStore, to copy a vTPM's 64-byte entry to a
 * checkpoint entry (checkpoint), back (restore), or to drop a checkpoint
 * (discard).  Checkpoint entries live in the vTPM's group, flagged
 * VTPM_FLAG_CHECKPOINT in the persisted flags, encrypted under the group key
 * like every entry; no vTPM can load or overwrite one.
 *
 * One lock serializes the request thread with vtpmmgr_handle_cmd and with the
 * tpmback callbacks: mini-os threads are cooperative, but disk, TPM and
 * XenStore I/O yield, so each of them can run while another is mid-way.
 */
#ifndef VTPMMGR_VTPM_CHECKPOINT_H
#define VTPMMGR_VTPM_CHECKPOINT_H

#include <mini-os/tpmback.h>
#include "uuid.h"
#include "vtpmmgr.h"

/* Parse "checkpoint=0" (stock behaviour), publish feature-checkpoint and start
 * the request thread.  Call once, after the table is loaded. */
void vtpm_ckpt_start(int argc, char **argv);

/* vtpmmgr_handle_cmd under the extension's lock. */
TPM_RESULT vtpm_ckpt_handle_cmd(struct tpm_opaque *opq, tpmcmd_t *tpmcmd);

void vtpm_ckpt_lock(void);
void vtpm_ckpt_unlock(void);

/* tpmback open/close callbacks: track the live connections ("restore while
 * open" is refused).  conn_opened takes the lock; conn_closed expects it held. */
void vtpm_ckpt_conn_opened(struct tpm_opaque *opq);
void vtpm_ckpt_conn_closed(struct tpm_opaque *opq);

/* 1 if uuid names a checkpoint entry (caller holds the lock). */
int vtpm_ckpt_is_checkpoint(const uuid_t uuid);

struct mem_vtpm;

/* 1 if a vTPM stub domain may still use vtpm: a live connection holds it or presents its UUID and
 * that frontend still exists (caller holds the lock). */
int vtpm_ckpt_is_open(const struct mem_vtpm *vtpm);

#endif
