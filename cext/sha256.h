/* Internal to the extension: the SHA-256 engine of sha256_lanes.c as hashing.c uses it. */
#ifndef XEN_VTPM_SHA256_H
#define XEN_VTPM_SHA256_H

#include <stddef.h>

#include <openssl/evp.h>

#include "hashing.h"

#define XV_HIDDEN __attribute__((visibility("hidden")))

/* SHA-256 fetched once per process (OpenSSL 3 otherwise fetches it again on every EVP_DigestInit). */
XV_HIDDEN enum xv_status xv_sha256_md(const EVP_MD **md);

/* xv_sha256_batch with the caller's context, which the libcrypto engine reuses for every message. */
XV_HIDDEN enum xv_status xv_sha256_batch_ctx(EVP_MD_CTX *ctx, size_t n, const unsigned char *const *p,
                                             const size_t *len, int prefix, unsigned char *out);

#endif /* XEN_VTPM_SHA256_H */
