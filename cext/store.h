/* Public interface of the checkpoint store's per-chunk pipelines (formats: docs/formats.md,
 * "Checkpoint store"): ingest (chunk -> SHA-256 -> id -> seal -> pack entries) and restore (pack entry ->
 * open -> id check -> plaintext at its stream offset), on all cores with the caller's GIL released.
 *
 * Conventions are hashing.h's: every function that can fail returns an enum xv_status and hands its
 * results back through out-parameters; the free functions return nothing.  cffi reads
 * cext/store_cdef.h, not this file. */
#ifndef XEN_VTPM_STORE_H
#define XEN_VTPM_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "hashing.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- the ids a write already has */

/* A set of 32-byte chunk ids: what the store holds for certain (the parent checkpoint's chunks) and
 * what the write has taken so far, so each id is looked up in the catalog and sealed at most once. */
typedef struct xv_idset xv_idset;

enum xv_status xv_idset_new(xv_idset **out);
/* Adds n ids (32 bytes each, back to back); *added counts those that were new. */
enum xv_status xv_idset_add(xv_idset *set, const unsigned char *ids, size_t n, size_t *added);
void xv_idset_free(xv_idset *set);

/* Where a sealed chunk is, as the catalog says: pack descriptor, entry offset, sealed length (the
 * entry's n), plaintext length. */
typedef struct {
    int fd;
    uint64_t entry_offset;
    uint32_t sealed_len;
    uint32_t plain_len;
    unsigned char id[32];
} xv_rplace;

/* ---------------------------------------------------------------- the parent of a delta */

/* The stream a new memory stream is delta-encoded against (docs/formats.md, "Checkpoint store" §0):
 * its manifest entries (36 bytes each, stream order) and the places of its chunks and of its delta
 * chunks' bases (is_delta[i]: places[i] is a delta), added in any number of calls, then ready. */
typedef struct xv_parent xv_parent;

enum xv_status xv_parent_new(const unsigned char *entries, size_t n, xv_parent **out);
enum xv_status xv_parent_places(xv_parent *p, const xv_rplace *places, const unsigned char *is_delta, size_t n);
enum xv_status xv_parent_ready(xv_parent *p);
void xv_parent_free(xv_parent *p);

/* ---------------------------------------------------------------- ingest */

enum { XV_CHUNK_KNOWN = 1 };   /* xv_ichunk.flags: the id was in the set (the store or this write has it) */

typedef struct {
    uint64_t offset;               /* stream offset */
    const unsigned char *data;     /* the plaintext: valid until the batch is sealed */
    uint32_t length;
    uint32_t flags;
    unsigned char id[32];
} xv_ichunk;

/* Stages whose thread CPU time an ingest or restore adds up (nanoseconds), indexes of xv_*_stats. */
enum { XV_STAGE_CHUNK, XV_STAGE_HASH, XV_STAGE_SEAL, XV_STAGE_WRITE, XV_STAGE_READ, XV_STAGE_OPEN,
       XV_STAGE_DELTA, XV_STAGE_COUNT };

typedef struct xv_ingest xv_ingest;

/* One stream: the feeding thread lends ring space (space) and hands over what it wrote (commit, final=1
 * at the end); the deciding thread takes the chunks in stream order, their ids computed, in batches of
 * about batch_bytes (take: 0 chunks at the end), then seals those it chose into pack entries written
 * back to back at fd:offset (seal), which also frees their ring space.  Ids are added to `known` as they
 * are taken, unless `parent` (NULL for none: the stream new chunks may be deltas against) has them.
 * nworkers threads hash and seal; the deciding thread helps while it waits. */
enum xv_status xv_ingest_new(uint32_t min_size, uint32_t avg_size, uint32_t max_size, const unsigned char id_key[32],
                             const unsigned char enc_key[32], xv_idset *known, const xv_parent *parent, int nworkers,
                             size_t ring_bytes, size_t batch_bytes, xv_ingest **out);
/* Instead of space and commit(n) copying into the ring: the stream is the file fd (a memory file that
 * grows, whose size can never shrink: F_SEAL_SHRINK), mapped and read in place; commit(n) says n more
 * bytes of it are written.  punch = 1 gives back (FALLOC_FL_PUNCH_HOLE) what every chunk before is
 * done with.  Before the first commit. */
enum xv_status xv_ingest_source(xv_ingest *g, int fd, int punch);
enum xv_status xv_ingest_space(xv_ingest *g, size_t want, unsigned char **buf, size_t *got);
enum xv_status xv_ingest_commit(xv_ingest *g, size_t n, int final);
/* entries: 36 bytes per chunk taken, the manifest's (id | length u32 LE). */
enum xv_status xv_ingest_take(xv_ingest *g, xv_ichunk *out, size_t max, unsigned char *entries, size_t *n);
/* For the first n chunks of the last take not sealed yet (several calls may share out one take), chunk
 * i: seal[i] = 0 skips it, 1 seals it whole, 2 seals it as a delta against the parent when that is
 * worth it (else whole).  Sealed chunks get entry_offset[i], sealed_len[i] and nbases[i] (0: whole; else
 * the delta's base ids at base_ids[16 * i ...]); *written is the bytes written at fd:offset.  A seal
 * that may take the entries past `limit` bytes from offset stops after the chunk that does: *done
 * says how many of the n it handled. */
enum xv_status xv_ingest_seal(xv_ingest *g, size_t n, const unsigned char *seal, int fd,
                              uint64_t offset, uint64_t limit, uint64_t *entry_offset, uint32_t *sealed_len,
                              unsigned char *nbases, unsigned char (*base_ids)[32], uint64_t *written,
                              size_t *done, int *err_errno);
/* The entries are written by a thread of the pipeline: wait until every one handed over so far is
 * (before the pack is finished).  XV_EIO with *err_errno if a write failed (seal reports it too). */
enum xv_status xv_ingest_flush(xv_ingest *g, int *err_errno);
/* After the take that returned 0: the stream root (docs/formats.md, "Checkpoint store" §2), its length
 * and chunk count. */
enum xv_status xv_ingest_result(const xv_ingest *g, unsigned char root[32], uint64_t *length, uint64_t *chunks);
/* Wakes every thread blocked in space or take; later calls return XV_ECANCELLED. */
enum xv_status xv_ingest_cancel(xv_ingest *g);
enum xv_status xv_ingest_stats(const xv_ingest *g, uint64_t ns[XV_STAGE_COUNT]);
void xv_ingest_free(xv_ingest *g);

/* ---------------------------------------------------------------- restore */

/* One chunk of a stream, in stream order: its place, the length the manifest gives it, its stream
 * offset; a delta (docs/formats.md, "Checkpoint store" §0) names its bases as bases[first_base ..
 * first_base + nbases) of its batch (the catalog's deps rows), nbases = 0 for a full chunk. */
typedef struct {
    xv_rplace place;
    uint64_t offset;
    uint32_t length;
    uint32_t first_base, nbases;
} xv_rchunk;

typedef struct xv_restore xv_restore;

/* Opens every chunk submitted, checks it (entry header, GCM tag under its id, for a delta its
 * payload and bases, its length, the id of its plaintext) and writes the plaintext at its stream
 * offset of out_fd, AES-256-CTR-encrypted at that offset if ctr_key is given (ctr_iv: the counter
 * block of offset 0); out_fd = -1 only checks.  Batches are opened on nworkers threads, the
 * submitting one helping while it waits; the stream root covers the chunks in submission order. */
enum xv_status xv_restore_new(const unsigned char id_key[32], const unsigned char enc_key[32], int nworkers,
                              int out_fd, const unsigned char *ctr_key, const unsigned char *ctr_iv,
                              xv_restore **out);
/* Queues a batch (copied: the arrays may go once it returns) and returns; up to two batches are in
 * flight, a third submit waits for the oldest. */
enum xv_status xv_restore_submit(xv_restore *r, const xv_rchunk *chunks, size_t n, const xv_rplace *bases,
                                 size_t nbases);
/* Waits for every batch submitted.  On a failed check: its status (XV_EFORMAT, XV_EAUTH, XV_EBADID),
 * *chunk = the chunk's index among all submitted, *base = the index of the base at fault in its batch
 * or -1; XV_EIO with *err_errno for a failed read (*base >= -1) or write of the output (*base = -2). */
enum xv_status xv_restore_wait(xv_restore *r, uint64_t *chunk, int64_t *base, int *err_errno);
/* The stream root of every chunk submitted, once wait returned XV_OK. */
enum xv_status xv_restore_root(xv_restore *r, unsigned char root[32]);
enum xv_status xv_restore_stats(const xv_restore *r, uint64_t ns[XV_STAGE_COUNT]);
void xv_restore_free(xv_restore *r);

#ifdef __cplusplus
}
#endif

#endif /* XEN_VTPM_STORE_H */
