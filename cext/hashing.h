/* Public interface of the state-hashing engine: the Merkle root of an image and its content-defined
 * chunks, each SHA-256 spread over all cores.  The constructions are specified in docs/formats.md,
 * "State hashing".
 *
 * Conventions: every function that can fail returns an enum xv_status (XV_OK on success) and hands
 * its results back through out-parameters, which it leaves untouched or zeroed on failure.  Only
 * xv_stream_free, which cannot fail, returns nothing.  cffi reads cext/hashing_cdef.h, not this file. */
#ifndef XEN_VTPM_HASHING_H
#define XEN_VTPM_HASHING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum xv_status {
    XV_OK = 0,
    XV_EINVAL,      /* a bad parameter (the Python face validates first: reaching this is a bug) */
    XV_ENOMEM,      /* out of memory, or no resources for a mutex / condition variable */
    XV_ECRYPTO,     /* libcrypto cannot fetch SHA-256 or refused a digest operation */
    XV_EIO,         /* mapping the source failed (its errno in *err_errno) */
    XV_ECHANGED,    /* the mapped source shrank while it was hashed (SIGBUS caught) */
    XV_ESTATE,      /* a stream used after its final commit, or its root asked before it */
    XV_ECANCELLED,  /* a pipeline was cancelled (store.h) */
    XV_EAUTH,       /* a sealed chunk fails authentication under its id (store.h) */
    XV_EBADID,      /* a chunk's plaintext does not give its id, or its length is not the expected one */
    XV_EFORMAT      /* a pack entry header or a delta payload is malformed (store.h) */
};

enum xv_engine {
    XV_ENGINE_LIBCRYPTO = 1,    /* one message at a time through OpenSSL */
    XV_ENGINE_SHA_NI_LANES = 2  /* four messages interleaved per core with SHA-NI (sha256_lanes.c) */
};

typedef struct {
    uint64_t offset;               /* stream offset of the chunk's first byte */
    const unsigned char *data;     /* valid until the next call on the stream */
    uint32_t length;
    unsigned char digest[32];      /* SHA-256 of the chunk */
} xv_chunk;

typedef struct xv_stream xv_stream;

/* Merkle root of a memory buffer / of the first `len` bytes of a regular file (mapped in windows),
 * on up to `nthreads` threads. */
enum xv_status xv_tree_hash_buf(const unsigned char *data, uint64_t len, uint32_t leaf_size,
                                int nthreads, unsigned char out[32]);
enum xv_status xv_tree_hash_fd(int fd, uint64_t len, uint32_t leaf_size, int nthreads,
                               unsigned char out[32], int *err_errno);

/* SHA-256 of n messages, each the byte `prefix` (if prefix >= 0; -1 for none) then p[i][0..len[i]),
 * into out[32*i .. 32*i+32): several at once on one core where the CPU allows. */
enum xv_status xv_sha256_batch(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                               unsigned char *out);

/* Which SHA-256 engine this process uses: the lanes where the CPU has SHA-NI, unless the environment
 * says XEN_VTPM_SHA256=libcrypto.  Chosen once, on first use. */
enum xv_status xv_sha256_engine(enum xv_engine *engine);

/* The 256-entry gear table of the content-defined chunker. */
enum xv_status xv_gear_table(uint64_t out[256]);

/* Streaming engine: content-defined chunks with per-chunk SHA-256 and/or the Merkle root.  One
 * thread at a time feeds a stream: space() lends a buffer, commit() takes the bytes written into it
 * and returns the chunks completed so far (at most max_out of them), final=1 ends the stream. */
enum xv_status xv_stream_new(int chunking, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
                             int tree, uint32_t leaf_size, int nworkers, xv_stream **out);
enum xv_status xv_stream_max_out(const xv_stream *s, size_t *max_out);
enum xv_status xv_stream_space(xv_stream *s, size_t want, unsigned char **buf, size_t *got);
enum xv_status xv_stream_commit(xv_stream *s, size_t n, int final, xv_chunk *out, size_t *n_out);
enum xv_status xv_stream_root(const xv_stream *s, unsigned char out[32]);
void xv_stream_free(xv_stream *s);

#ifdef __cplusplus
}
#endif

#endif /* XEN_VTPM_HASHING_H */
