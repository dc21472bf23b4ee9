/* What cffi exposes of store.h to Python (cdef syntax: no preprocessor), checked by the compiler
 * against store.h as hashing_cdef.h is against hashing.h. */

typedef struct xv_idset xv_idset;
enum xv_status xv_idset_new(xv_idset **out);
enum xv_status xv_idset_add(xv_idset *set, const unsigned char *ids, size_t n, size_t *added);
void xv_idset_free(xv_idset *set);

typedef struct {
    int fd;
    uint64_t entry_offset;
    uint32_t sealed_len;
    uint32_t plain_len;
    unsigned char id[32];
    ...;
} xv_rplace;

typedef struct xv_parent xv_parent;
enum xv_status xv_parent_new(const unsigned char *entries, size_t n, xv_parent **out);
enum xv_status xv_parent_places(xv_parent *p, const xv_rplace *places, const unsigned char *is_delta, size_t n);
enum xv_status xv_parent_ready(xv_parent *p);
void xv_parent_free(xv_parent *p);

enum { XV_CHUNK_KNOWN, ... };
typedef struct {
    uint64_t offset;
    const unsigned char *data;
    uint32_t length;
    uint32_t flags;
    unsigned char id[32];
    ...;
} xv_ichunk;

enum { XV_STAGE_CHUNK, XV_STAGE_HASH, XV_STAGE_SEAL, XV_STAGE_WRITE, XV_STAGE_READ, XV_STAGE_OPEN,
       XV_STAGE_DELTA, XV_STAGE_COUNT, ... };

typedef struct xv_ingest xv_ingest;
enum xv_status xv_ingest_new(uint32_t min_size, uint32_t avg_size, uint32_t max_size, const unsigned char id_key[32],
                             const unsigned char enc_key[32], xv_idset *known, const xv_parent *parent, int nworkers,
                             size_t ring_bytes, size_t batch_bytes, xv_ingest **out);
enum xv_status xv_ingest_source(xv_ingest *g, int fd, int punch);
enum xv_status xv_ingest_space(xv_ingest *g, size_t want, unsigned char **buf, size_t *got);
enum xv_status xv_ingest_commit(xv_ingest *g, size_t n, int final);
enum xv_status xv_ingest_take(xv_ingest *g, xv_ichunk *out, size_t max, unsigned char *entries, size_t *n);
enum xv_status xv_ingest_seal(xv_ingest *g, size_t n, const unsigned char *seal, int fd,
                              uint64_t offset, uint64_t limit, uint64_t *entry_offset, uint32_t *sealed_len,
                              unsigned char *nbases, unsigned char (*base_ids)[32], uint64_t *written,
                              size_t *done, int *err_errno);
enum xv_status xv_ingest_flush(xv_ingest *g, int *err_errno);
enum xv_status xv_ingest_result(const xv_ingest *g, unsigned char root[32], uint64_t *length, uint64_t *chunks);
enum xv_status xv_ingest_cancel(xv_ingest *g);
enum xv_status xv_ingest_stats(const xv_ingest *g, uint64_t ns[]);
void xv_ingest_free(xv_ingest *g);

typedef struct {
    xv_rplace place;
    uint64_t offset;
    uint32_t length;
    uint32_t first_base, nbases;
    ...;
} xv_rchunk;
typedef struct xv_restore xv_restore;
enum xv_status xv_restore_new(const unsigned char id_key[32], const unsigned char enc_key[32], int nworkers,
                              int out_fd, const unsigned char *ctr_key, const unsigned char *ctr_iv,
                              xv_restore **out);
enum xv_status xv_restore_submit(xv_restore *r, const xv_rchunk *chunks, size_t n, const xv_rplace *bases,
                                 size_t nbases);
enum xv_status xv_restore_wait(xv_restore *r, uint64_t *chunk, int64_t *base, int *err_errno);
enum xv_status xv_restore_root(xv_restore *r, unsigned char root[32]);
enum xv_status xv_restore_stats(const xv_restore *r, uint64_t ns[]);
void xv_restore_free(xv_restore *r);
