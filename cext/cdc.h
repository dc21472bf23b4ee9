/* Internal to the extension: the content-defined cut of hashing.c (docs/formats.md, "Content-defined
 * chunks"), shared by the streaming engine and the store's ingest pipeline (ingest.c). */
#ifndef XEN_VTPM_CDC_H
#define XEN_VTPM_CDC_H

#include <stddef.h>
#include <stdint.h>

#include "hashing.h"
#include "sha256.h"

struct xv_cdc {
    uint32_t min, avg, max;
    uint64_t mask_s, mask_l;
};

/* Checks the sizes as the Python face does (XV_EINVAL otherwise) and derives the gear table once. */
XV_HIDDEN enum xv_status xv_cdc_init(struct xv_cdc *c, uint32_t min_size, uint32_t avg_size, uint32_t max_size);

/* Length of the chunk that starts at p, of the n bytes available (n >= max, or the stream's end). */
XV_HIDDEN size_t xv_cdc_cut(const struct xv_cdc *c, const unsigned char *p, size_t n);

#endif /* XEN_VTPM_CDC_H */
