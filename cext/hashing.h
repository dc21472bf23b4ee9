/* Public surface of the state-hashing extension (also parsed by cffi's cdef: no macros, no includes).
 * The constructions are specified in docs/formats.md, "State hashing". */

enum {
    XV_OK = 0,
    XV_ECHANGED = -1,   /* the mapped source shrank under us (SIGBUS caught) */
    XV_ENOMEM = -2,
    XV_ECRYPTO = -3,    /* libcrypto refused a digest operation */
    XV_EMMAP = -4,      /* mmap of the source failed (errno left in *err_errno) */
    XV_EARG = -5,       /* bad parameter (validated in Python first; defence in depth) */
    XV_ESTATE = -6      /* stream: used after finish */
};

typedef struct {
    uint64_t offset;               /* stream offset of the chunk's first byte */
    const unsigned char *data;     /* valid until the next call on the stream */
    uint32_t length;
    unsigned char digest[32];      /* SHA-256 of the chunk */
} xv_chunk;

typedef struct xv_stream xv_stream;

/* Merkle root of a memory buffer / of the first `len` bytes of a regular file (mapped in windows). */
int xv_tree_hash_buf(const unsigned char *data, uint64_t len, uint32_t leaf_size, int nthreads,
                     unsigned char *out);
int xv_tree_hash_fd(int fd, uint64_t len, uint32_t leaf_size, int nthreads, unsigned char *out,
                    int *err_errno);

/* SHA-256 of n messages, each the prefix byte (if prefix >= 0) then p[i][0..len[i]), into out[32*i]:
 * several at once on one core where the CPU allows (sha256_lanes.c). */
int xv_sha256_batch(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                    unsigned char *out);
const char *xv_sha256_engine(void);

/* The 256-entry gear table of the content-defined chunker. */
void xv_gear_table(uint64_t *out);

/* Streaming engine: content-defined chunks with per-chunk SHA-256 and/or the Merkle root. */
xv_stream *xv_stream_new(int chunking, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
                         int tree, uint32_t leaf_size, int nworkers);
size_t xv_stream_max_out(const xv_stream *s);
unsigned char *xv_stream_space(xv_stream *s, size_t want, size_t *got, int *rc);
int xv_stream_commit(xv_stream *s, size_t n, int final, xv_chunk *out, size_t *n_out);
int xv_stream_root(const xv_stream *s, unsigned char *out);
void xv_stream_free(xv_stream *s);
