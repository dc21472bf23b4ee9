/* What cffi exposes of hashing.h to Python (cdef syntax: no preprocessor).  Kept honest by the
 * compiler: cffi's API mode compiles every declaration below against hashing.h, and the "..." let
 * it take enum values and the struct layout from there instead of repeating them. */

enum xv_status { XV_OK, XV_EINVAL, XV_ENOMEM, XV_ECRYPTO, XV_EIO, XV_ECHANGED, XV_ESTATE, XV_ECANCELLED,
                 XV_EAUTH, XV_EBADID, XV_EFORMAT, ... };
enum xv_engine { XV_ENGINE_LIBCRYPTO, XV_ENGINE_SHA_NI_LANES, ... };

typedef struct {
    uint64_t offset;
    const unsigned char *data;
    uint32_t length;
    unsigned char digest[32];
    ...;
} xv_chunk;

typedef struct xv_stream xv_stream;

enum xv_status xv_tree_hash_buf(const unsigned char *data, uint64_t len, uint32_t leaf_size,
                                int nthreads, unsigned char out[32]);
enum xv_status xv_tree_hash_fd(int fd, uint64_t len, uint32_t leaf_size, int nthreads,
                               unsigned char out[32], int *err_errno);
enum xv_status xv_sha256_batch(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                               unsigned char *out);
enum xv_status xv_sha256_engine(enum xv_engine *engine);
enum xv_status xv_gear_table(uint64_t out[256]);

enum xv_status xv_stream_new(int chunking, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
                             int tree, uint32_t leaf_size, int nworkers, xv_stream **out);
enum xv_status xv_stream_max_out(const xv_stream *s, size_t *max_out);
enum xv_status xv_stream_space(xv_stream *s, size_t want, unsigned char **buf, size_t *got);
enum xv_status xv_stream_commit(xv_stream *s, size_t n, int final, xv_chunk *out, size_t *n_out);
enum xv_status xv_stream_root(const xv_stream *s, unsigned char out[32]);
void xv_stream_free(xv_stream *s);
