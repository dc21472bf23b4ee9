/* Internal to the extension: the delta encoder of delta.c as the ingest pipeline's workers use it. */
#ifndef XEN_VTPM_DELTA_H
#define XEN_VTPM_DELTA_H

#include <stddef.h>
#include <stdint.h>

#include "seal.h"
#include "store.h"

/* Whether the parent's chunks or its deltas' bases include id: the store has it (once ready). */
XV_HIDDEN int xv_parent_has(const xv_parent *p, const unsigned char *id);

/* One worker's opened parent chunks (a few, least recently used go) and buffers. */
struct xv_dctx;

XV_HIDDEN enum xv_status xv_dctx_new(struct xv_sealer *sl, struct xv_dctx **out);
XV_HIDDEN void xv_dctx_free(struct xv_dctx *c);

/* The delta of data (len bytes at stream offset start) against the parent: *plen = 0 when it is not
 * worth it or cannot be made (the chunk is then stored whole); else *payload (malloc'd, the caller
 * frees it) and the ids of its *nbases bases (at most 16). */
XV_HIDDEN enum xv_status xv_delta_encode(struct xv_dctx *c, const xv_parent *P, const unsigned char *data,
                                         uint32_t len, uint64_t start, unsigned char **payload, size_t *plen,
                                         unsigned char base_ids[][32], int *nbases);

#endif /* XEN_VTPM_DELTA_H */
