/*
 * vtpmmgr transfer extension: move a vTPM's entry (and its checkpoint entries) to another host's
 * manager without it ever leaving a manager in clear (docs/protocol.md of xen-vtpm, "Moving a vTPM").
 *
 * export wraps an entry for the other manager's transfer key (xfer_envelope.h) and parks a vTPM
 * entry: flagged CHECKPOINT | EXPORTED, no vTPM stub domain may load or save it any more, not even
 * over a connection that bound it before.  The receiving manager imports it flagged IMPORTED, so
 * that an undone move can remove it; adopt makes it an ordinary entry.  On the sender, unexport
 * undoes the parking and remove deletes the parked entry once the move has committed (or scrubs it,
 * see XFER_FLAG_REMOVED).
 *
 * The ops are served only with "transfer=1" on the manager's command line: without it, dom0 cannot
 * have any entry wrapped for a key of its choosing (docs/threat-model.md of xen-vtpm).
 */
#ifndef VTPMMGR_VTPM_TRANSFER_H
#define VTPMMGR_VTPM_TRANSFER_H

#include <stddef.h>
#include <mini-os/tpmback.h>

#include "vtpmmgr.h"
#include "xfer_request.h"

/* Persisted flag bits (VTPM_FLAG_DISK_MASK), next to VTPM_FLAG_ADMIN 1 and VTPM_FLAG_CHECKPOINT 2. */
#define XFER_FLAG_EXPORTED 0x0004
#define XFER_FLAG_IMPORTED 0x0008
/* A removed entry that was the last of its group, kept parked with its secret zeroed: Xen 4.17's
 * disk writer does not handle an empty group (disk_write_vtpm_itree copies into a NULL inuse list).
 * Every op treats it as absent; an import of the same UUID reuses it. */
#define XFER_FLAG_REMOVED 0x0010

/* With "transfer=1": publish data/vtpmmgr/transfer-key and feature-transfer (vtpm_ckpt_start). */
void vtpm_xfer_start(int argc, char **argv);

/* One transfer request, under the extension's lock, after the table checks: 0 with the entry's
 * hash in out (and, for export, the envelope's hex in env), or -1 with the error in out. */
int vtpm_xfer_execute(const struct xfer_request *req, char *out, size_t outlen, char *env, size_t envlen);

/* A LOADHASHKEY or SAVEHASHKEY over a connection bound to a parked entry: answered here with
 * TPM_BAD_PARAMETER (returns 1); anything else is left to the manager (0).  Lock held. */
int vtpm_xfer_intercept(struct tpm_opaque *opq, tpmcmd_t *tpmcmd);

#endif
