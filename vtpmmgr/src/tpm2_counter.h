/*
 * vtpmmgr on TPM 2.0 hosts: anti-rollback of the manager's disk with an NV
 * counter (docs/vtpmmgr-tpm2.md of xen-vtpm).
 *
 * Xen 4.17 keeps a counter index and value in the sealed root and the root
 * sector, but its TPM counter calls are stubs.  Here the counter is a TPM 2.0
 * NV counter index defined when group 0 is provisioned, incremented with an
 * authValue only the manager knows (counter_auth, sealed in the root), and
 * advanced after every write of the table.  A table whose root carries a value
 * behind the TPM's is an older copy of the disk: it is refused.
 */
#ifndef VTPMMGR_TPM2_COUNTER_H
#define VTPMMGR_TPM2_COUNTER_H

#include "vtpm_disk.h"

/* NV index of the counter when none is given with tpm2_nv_index= (owner range). */
#define TPM2_COUNTER_DEFAULT_INDEX 0x0100A100u

/* The tpm2_nv_index= word; -1 if malformed. */
int tpm2_counter_parse_args(int argc, char **argv);

/* A reader of the disk (not the manager): report a stale root, never refuse it nor advance. */
void tpm2_counter_read_only(void);

/* TPM_disk_alloc_counter, TPM_disk_check_counter and TPM_disk_incr_counter on TPM 2.0.
 * Index 0 means "no counter" (group 0 unprovisioned: the table is never written). */
int tpm2_counter_alloc(be32_t *index, const struct tpm_authdata *auth, be32_t *value);
int tpm2_counter_check(be32_t index, const struct tpm_authdata *auth, be32_t value);
int tpm2_counter_incr(be32_t index, const struct tpm_authdata *auth);

#endif
