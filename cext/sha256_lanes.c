/* SHA-256 of several independent messages at once, interleaved on one core.
 *
 * Why: one SHA-256 stream is a serial chain of sha256rnds2 instructions, so a core with SHA-NI sits
 * mostly idle waiting for each round's result (libcrypto: ~2.1 GB/s here).  Interleaving the rounds of
 * four messages fills that wait: ~3.7 GB/s per core on the same machine (docs/performance.md).  The
 * tree's leaves and the chunker's chunks are independent messages, so they hash four at a time.
 *
 * Lanes are refilled as messages end, so messages of different lengths keep four lanes busy until the
 * queue runs dry.  Without SHA-NI, or with XEN_VTPM_SHA256=libcrypto in the environment (which lets the
 * tests run that engine on a CPU with SHA-NI), every message goes through libcrypto one by one. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "hashing.h"
#include "sha256.h"

#define LANES 4

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static EVP_MD *g_md;
static enum xv_engine g_engine;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_once(void);

enum xv_status xv_sha256_md(const EVP_MD **md)
{
    pthread_once(&g_once, init_once);
    *md = g_md;
    return g_md ? XV_OK : XV_ECRYPTO;
}

/* ---------------------------------------------------------------- fallback: libcrypto */

static enum xv_status one_libcrypto(EVP_MD_CTX *ctx, const EVP_MD *md, int prefix, const unsigned char *p,
                                    size_t n, unsigned char *out)
{
    unsigned char b = (unsigned char)prefix;
    int ok = EVP_DigestInit_ex(ctx, md, NULL) == 1 && (prefix < 0 || EVP_DigestUpdate(ctx, &b, 1) == 1) &&
             EVP_DigestUpdate(ctx, p, n) == 1 && EVP_DigestFinal_ex(ctx, out, NULL) == 1;
    return ok ? XV_OK : XV_ECRYPTO;
}

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>

#define NI __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static int cpu_has_sha_ni(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSSE3) || !(c & bit_SSE4_1))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1;
}

/* The SHA-NI instructions keep the state as two registers, ABEF and CDGH. */
NI static inline void state_in(const uint32_t *h, __m128i *abef, __m128i *cdgh)
{
    __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0xB1);
    __m128i hgfe = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h + 4)), 0x1B);
    *abef = _mm_alignr_epi8(dcba, hgfe, 8);
    *cdgh = _mm_blend_epi16(hgfe, dcba, 0xF0);
}

NI static inline void state_out(uint32_t *h, __m128i abef, __m128i cdgh)
{
    __m128i x = _mm_shuffle_epi32(abef, 0x1B);
    __m128i y = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(x, y, 0xF0));
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(y, x, 8));
}

/* nb 64-byte blocks from each of n messages; with n a constant the loops unroll and the four chains
 * interleave instruction by instruction. */
NI static inline __attribute__((always_inline)) void
compress_n(int n, uint32_t *const *h, const unsigned char *const *p, size_t nb)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i abef[LANES], cdgh[LANES], abef0[LANES], cdgh0[LANES], w[LANES][4];
    for (int l = 0; l < n; l++)
        state_in(h[l], &abef[l], &cdgh[l]);
    for (size_t b = 0; b < nb; b++) {
        for (int l = 0; l < n; l++) {
            abef0[l] = abef[l];
            cdgh0[l] = cdgh[l];
        }
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            __m128i k = _mm_loadu_si128((const __m128i *)(K + 4 * j));
#pragma GCC unroll 4
            for (int l = 0; l < n; l++) {
                __m128i m;
                if (j < 4) {
                    m = _mm_loadu_si128((const __m128i *)(p[l] + 64 * b + 16 * j));
                    m = _mm_shuffle_epi8(m, bswap);
                } else {
                    /* W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four words at a time. */
                    __m128i x = _mm_sha256msg1_epu32(w[l][j & 3], w[l][(j + 1) & 3]);
                    x = _mm_add_epi32(x, _mm_alignr_epi8(w[l][(j + 3) & 3], w[l][(j + 2) & 3], 4));
                    m = _mm_sha256msg2_epu32(x, w[l][(j + 3) & 3]);
                }
                w[l][j & 3] = m;
                __m128i mk = _mm_add_epi32(m, k);
                cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], mk);
                abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(mk, 0x0E));
            }
        }
        for (int l = 0; l < n; l++) {
            abef[l] = _mm_add_epi32(abef[l], abef0[l]);
            cdgh[l] = _mm_add_epi32(cdgh[l], cdgh0[l]);
        }
    }
    for (int l = 0; l < n; l++)
        state_out(h[l], abef[l], cdgh[l]);
}

NI static void compress1(uint32_t *h, const unsigned char *p, size_t nb)
{
    compress_n(1, &h, &p, nb);
}

NI static void compress_lanes(int n, uint32_t *const *h, const unsigned char *const *p, size_t nb)
{
    switch (n) {
    case 1: compress_n(1, h, p, nb); break;
    case 2: compress_n(2, h, p, nb); break;
    case 3: compress_n(3, h, p, nb); break;
    default: compress_n(4, h, p, nb); break;
    }
}

/* One message in flight: the prefix byte (if any) and the data's first 63 bytes are hashed as a
 * separate first block, so the rest is read in place. */
struct lane {
    uint32_t h[8];
    const unsigned char *p;     /* next unhashed byte */
    size_t blocks;              /* whole blocks left at p */
    size_t rest;                /* bytes after them, < 64 */
    uint64_t total;             /* message length, prefix included */
    int head;                   /* prefix byte still to go in front of p's bytes in the tail, or -1 */
    size_t idx;
};

static void lane_start(struct lane *ln, size_t idx, int prefix, const unsigned char *p, size_t n)
{
    memcpy(ln->h, H0, sizeof H0);
    ln->idx = idx;
    ln->total = n + (prefix >= 0);
    ln->head = -1;
    if (prefix >= 0 && n >= 63) {
        unsigned char first[64];
        first[0] = (unsigned char)prefix;
        memcpy(first + 1, p, 63);
        compress1(ln->h, first, 1);
        p += 63;
        n -= 63;
    } else if (prefix >= 0) {
        ln->head = prefix;
    }
    ln->p = p;
    ln->blocks = n / 64;
    ln->rest = n % 64;
}

static void lane_finish(struct lane *ln, unsigned char *out)
{
    unsigned char tail[128];
    size_t r = 0;
    memset(tail, 0, sizeof tail);
    if (ln->head >= 0)
        tail[r++] = (unsigned char)ln->head;
    if (ln->rest)               /* p may be NULL for an empty message */
        memcpy(tail + r, ln->p, ln->rest);
    r += ln->rest;
    tail[r] = 0x80;
    size_t nb = r + 9 > 64 ? 2 : 1;
    uint64_t bits = ln->total * 8;
    for (int i = 0; i < 8; i++)
        tail[nb * 64 - 1 - i] = (unsigned char)(bits >> (8 * i));
    compress1(ln->h, tail, nb);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(ln->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(ln->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(ln->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)ln->h[i];
    }
}

static void batch_ni(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                     unsigned char *out)
{
    struct lane lanes[LANES];
    int active = 0;
    size_t next = 0;
    for (;;) {
        while (active < LANES && next < n) {
            lane_start(&lanes[active], next, prefix, p[next], len[next]);
            next++;
            active++;
        }
        if (!active)
            return;
        size_t nb = SIZE_MAX;
        for (int l = 0; l < active; l++)
            if (lanes[l].blocks < nb)
                nb = lanes[l].blocks;
        if (nb) {
            uint32_t *hs[LANES];
            const unsigned char *ps[LANES];
            for (int l = 0; l < active; l++) {
                hs[l] = lanes[l].h;
                ps[l] = lanes[l].p;
            }
            compress_lanes(active, hs, ps, nb);
            for (int l = 0; l < active; l++) {
                lanes[l].p += 64 * nb;
                lanes[l].blocks -= nb;
            }
        }
        for (int l = 0; l < active;) {
            if (lanes[l].blocks) {
                l++;
                continue;
            }
            lane_finish(&lanes[l], out + 32 * lanes[l].idx);
            lanes[l] = lanes[--active];
        }
    }
}
#else
static int cpu_has_sha_ni(void)
{
    return 0;
}

static void batch_ni(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                     unsigned char *out)
{
    (void)n, (void)p, (void)len, (void)prefix, (void)out;
}
#endif

/* Chosen once per process, so the engine it reports is the one that did all its work. */
static void init_once(void)
{
    const char *forced = getenv("XEN_VTPM_SHA256");
    int libcrypto = forced && strcmp(forced, "libcrypto") == 0;
    g_engine = cpu_has_sha_ni() && !libcrypto ? XV_ENGINE_SHA_NI_LANES : XV_ENGINE_LIBCRYPTO;
    g_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

enum xv_status xv_sha256_engine(enum xv_engine *engine)
{
    if (!engine)
        return XV_EINVAL;
    pthread_once(&g_once, init_once);
    *engine = g_engine;
    return XV_OK;
}

enum xv_status xv_sha256_batch_ctx(EVP_MD_CTX *ctx, size_t n, const unsigned char *const *p,
                                   const size_t *len, int prefix, unsigned char *out)
{
    if (prefix < -1 || prefix > 255 || (n && (!p || !len || !out)))
        return XV_EINVAL;
    const EVP_MD *md;
    enum xv_status rc = xv_sha256_md(&md);
    if (rc)
        return rc;
    if (g_engine == XV_ENGINE_SHA_NI_LANES) {
        batch_ni(n, p, len, prefix, out);
        return XV_OK;
    }
    if (n && !ctx)
        return XV_EINVAL;
    for (size_t i = 0; i < n && !rc; i++)
        rc = one_libcrypto(ctx, md, prefix, p[i], len[i], out + 32 * i);
    return rc;
}

enum xv_status xv_sha256_batch(size_t n, const unsigned char *const *p, const size_t *len, int prefix,
                               unsigned char *out)
{
    EVP_MD_CTX *ctx = NULL;
    enum xv_engine engine;
    xv_sha256_engine(&engine);
    if (engine == XV_ENGINE_LIBCRYPTO && n && !(ctx = EVP_MD_CTX_new()))
        return XV_ENOMEM;
    enum xv_status rc = xv_sha256_batch_ctx(ctx, n, p, len, prefix, out);
    EVP_MD_CTX_free(ctx);
    return rc;
}
