/*
 * vtpmmgr status for dom0 tools (docs/vtpmmgr-tpm2.md of xen-vtpm): what this
 * manager is and whether it keeps its table, in XenStore under its home:
 *
 *   data/vtpmmgr/build          which manager build runs (VTPMMGR_BUILD, XEN_VTPM_SERIES)
 *   data/vtpmmgr/tpm            "1.2" or "2.0"
 *   data/vtpmmgr/persistent     "1" once group 0 has a seal configuration (the table is written
 *                               to disk and survives a restart), else "0"
 *   data/vtpmmgr/anti-rollback  "nv-counter 0x<index>" or "none"
 */
#ifndef VTPMMGR_VTPM_STATUS_H
#define VTPMMGR_VTPM_STATUS_H

/* Write every node; call once the table is loaded or created. */
void vtpm_status_publish(void);

/* Rewrite what changed since (a GROUP_UPDATE can provision group 0 at run time). */
void vtpm_status_refresh(void);

#endif
