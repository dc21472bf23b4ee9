/* State hashing: SHA-256 Merkle root over fixed leaves, and content-defined chunking with per-chunk
 * SHA-256, both spread over all cores, and on each core over several messages at once
 * (sha256_lanes.c).  Constructions: docs/formats.md, "State hashing". */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "hashing.h"
#include "cdc.h"
#include "sha256.h"

#define WINDOW (16u << 20)           /* bytes one tree worker maps at a time: bounds RSS */
#define SPACE_MAX ((size_t)1 << 20)  /* bytes a stream accepts per commit */
#define LEAF_MIN 64u
#define LEAF_MAX (64u << 20)

/* ---------------------------------------------------------------- digests */

/* SHA-256 of (prefix byte, if >= 0) || p[0..n): the small node and root messages.  Leaves and
 * chunks, the bulk of the bytes, go through xv_sha256_batch_ctx. */
static enum xv_status digest(EVP_MD_CTX *ctx, int prefix, const unsigned char *p, size_t n,
                             unsigned char *out)
{
    const EVP_MD *md;
    unsigned char b = (unsigned char)prefix;
    if (xv_sha256_md(&md) != XV_OK || EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
        (prefix >= 0 && EVP_DigestUpdate(ctx, &b, 1) != 1) || EVP_DigestUpdate(ctx, p, n) != 1 ||
        EVP_DigestFinal_ex(ctx, out, NULL) != 1)
        return XV_ECRYPTO;
    return XV_OK;
}

/* ---------------------------------------------------------------- gear table, derived once */

static uint64_t g_gear[256];
static enum xv_status g_gear_rc;
static pthread_once_t g_gear_once = PTHREAD_ONCE_INIT;

static void gear_init(void)
{
    static const char label[] = "xen-vtpm gear v1";
    unsigned char msg[sizeof label], dig[32];
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    g_gear_rc = ctx ? XV_OK : XV_ENOMEM;
    memcpy(msg, label, sizeof label - 1);
    for (int i = 0; i < 256 && g_gear_rc == XV_OK; i++) {
        msg[sizeof label - 1] = (unsigned char)i;
        g_gear_rc = digest(ctx, -1, msg, sizeof label, dig);
        uint64_t v = 0;
        for (int k = 7; k >= 0; k--)
            v = (v << 8) | dig[k];          /* little-endian */
        g_gear[i] = v;
    }
    EVP_MD_CTX_free(ctx);
}

static enum xv_status gear_ready(void)
{
    pthread_once(&g_gear_once, gear_init);
    return g_gear_rc;
}

static uint64_t top_bits(int n)
{
    return n >= 64 ? ~(uint64_t)0 : ~(~(uint64_t)0 >> n);
}

enum xv_status xv_cdc_init(struct xv_cdc *c, uint32_t min_size, uint32_t avg_size, uint32_t max_size)
{
    if (!(min_size >= 64 && avg_size >= 256 && (avg_size & (avg_size - 1)) == 0 && min_size < avg_size &&
          avg_size < max_size && max_size <= LEAF_MAX))
        return XV_EINVAL;
    enum xv_status rc = gear_ready();
    if (rc)
        return rc;
    int bits = __builtin_ctz(avg_size);
    c->min = min_size;
    c->avg = avg_size;
    c->max = max_size;
    c->mask_s = top_bits(bits + 2);   /* harder to match before the average: fewer tiny chunks */
    c->mask_l = top_bits(bits - 2);   /* easier after it: fewer huge ones */
    return XV_OK;
}

enum xv_status xv_gear_table(uint64_t out[256])
{
    if (!out)
        return XV_EINVAL;
    enum xv_status rc = gear_ready();
    if (rc == XV_OK)
        memcpy(out, g_gear, sizeof g_gear);
    return rc;
}

/* ---------------------------------------------------------------- Merkle stack */

/* Perfect subtrees of decreasing size; folding them right to left gives the RFC 6962 shape. */
typedef struct {
    unsigned char h[32];
    uint64_t n;
} mnode;

typedef struct {
    mnode e[66];
    int top;
} mstack;

static enum xv_status node_hash(EVP_MD_CTX *ctx, const unsigned char *l, const unsigned char *r,
                                unsigned char *out)
{
    unsigned char m[65];
    m[0] = 0x01;
    memcpy(m + 1, l, 32);
    memcpy(m + 33, r, 32);
    return digest(ctx, -1, m, sizeof m, out);
}

static enum xv_status ms_push(EVP_MD_CTX *ctx, mstack *s, const unsigned char *h, uint64_t n)
{
    memcpy(s->e[s->top].h, h, 32);
    s->e[s->top].n = n;
    s->top++;
    while (s->top >= 2 && s->e[s->top - 1].n == s->e[s->top - 2].n) {
        mnode *l = &s->e[s->top - 2], *r = &s->e[s->top - 1];
        enum xv_status rc = node_hash(ctx, l->h, r->h, l->h);
        if (rc)
            return rc;
        l->n *= 2;
        s->top--;
    }
    return XV_OK;
}

static enum xv_status ms_fold(EVP_MD_CTX *ctx, const mstack *s, unsigned char *out)
{
    unsigned char acc[32];
    memcpy(acc, s->e[s->top - 1].h, 32);
    for (int i = s->top - 2; i >= 0; i--) {
        enum xv_status rc = node_hash(ctx, s->e[i].h, acc, acc);
        if (rc)
            return rc;
    }
    memcpy(out, acc, 32);
    return XV_OK;
}

/* Binds the total length and the leaf size into the root. */
static enum xv_status finalize(EVP_MD_CTX *ctx, const unsigned char *top, uint64_t len, uint32_t leaf,
                               unsigned char *out)
{
    unsigned char m[1 + 8 + 4 + 32];
    m[0] = 0x02;
    for (int i = 0; i < 8; i++)
        m[1 + i] = (unsigned char)(len >> (56 - 8 * i));
    for (int i = 0; i < 4; i++)
        m[9 + i] = (unsigned char)(leaf >> (24 - 8 * i));
    memcpy(m + 13, top, 32);
    return digest(ctx, -1, m, sizeof m, out);
}

static int leaf_ok(uint32_t leaf)
{
    return leaf >= LEAF_MIN && leaf <= LEAF_MAX && (leaf & (leaf - 1)) == 0;
}

/* ---------------------------------------------------------------- SIGBUS guard */

/* A mapped file that shrinks raises SIGBUS on the next access.  While a guard is active, a fault in
 * a thread that armed tl_jmp jumps back to its worker, which reports XV_ECHANGED.  Faults anywhere
 * else go to whoever owned SIGBUS before us (e.g. Python's faulthandler). */
static __thread sigjmp_buf *tl_jmp;
static pthread_mutex_t g_guard_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_guard_users;
static struct sigaction g_guard_old;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *j = tl_jmp;
    if (j)
        siglongjmp(*j, 1);
    if ((g_guard_old.sa_flags & SA_SIGINFO) && g_guard_old.sa_sigaction) {
        g_guard_old.sa_sigaction(sig, si, uc);
    } else if (g_guard_old.sa_handler != SIG_DFL && g_guard_old.sa_handler != SIG_IGN) {
        g_guard_old.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);   /* returning re-runs the fault under the default action */
    }
}

static void guard_on(void)
{
    pthread_mutex_lock(&g_guard_mu);
    if (g_guard_users++ == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, &g_guard_old);
    }
    pthread_mutex_unlock(&g_guard_mu);
}

static void guard_off(void)
{
    pthread_mutex_lock(&g_guard_mu);
    if (--g_guard_users == 0)
        sigaction(SIGBUS, &g_guard_old, NULL);
    pthread_mutex_unlock(&g_guard_mu);
}

/* ---------------------------------------------------------------- tree hash over memory or a file */

/* The leaves split into blocks of per_block leaves, each a perfect subtree that one worker folds. */
struct tree_job {
    const unsigned char *base;   /* memory source, or NULL for fd */
    int fd;
    uint64_t len, nleaves, per_block, nblocks;
    uint32_t leaf;
    unsigned char (*roots)[32];
    atomic_uint_fast64_t next;
    atomic_int err;
    int map_errno;               /* written only by the worker whose failure won */
};

/* The first failure wins; returns 1 for the caller that set it. */
static int tree_fail(struct tree_job *t, enum xv_status rc)
{
    int zero = XV_OK;
    return atomic_compare_exchange_strong(&t->err, &zero, (int)rc);
}

enum { LEAF_BATCH = 64 };

static enum xv_status block_root(EVP_MD_CTX *ctx, const unsigned char *p, uint64_t bytes, uint32_t leaf,
                                 unsigned char *out)
{
    mstack st;
    const unsigned char *lp[LEAF_BATCH];
    size_t ll[LEAF_BATCH];
    unsigned char h[LEAF_BATCH][32];
    st.top = 0;
    for (uint64_t off = 0; off < bytes;) {
        size_t n = 0;
        for (; n < LEAF_BATCH && off < bytes; n++, off += leaf) {
            lp[n] = p + off;
            ll[n] = bytes - off < leaf ? (size_t)(bytes - off) : leaf;
        }
        enum xv_status rc = xv_sha256_batch_ctx(ctx, n, lp, ll, 0x00, h[0]);
        for (size_t i = 0; i < n && !rc; i++)
            rc = ms_push(ctx, &st, h[i], 1);
        if (rc)
            return rc;
    }
    return ms_fold(ctx, &st, out);
}

static void *tree_run(void *arg)
{
    struct tree_job *t = arg;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    sigjmp_buf jb;
    unsigned char *volatile map = NULL;
    volatile size_t maplen = 0;
    long pg = sysconf(_SC_PAGESIZE);

    if (!ctx) {
        tree_fail(t, XV_ENOMEM);
        return NULL;
    }
    if (sigsetjmp(jb, 1)) {      /* savemask: leave SIGBUS unblocked after the jump */
        tl_jmp = NULL;
        if (map)
            munmap(map, maplen);
        tree_fail(t, XV_ECHANGED);
        EVP_MD_CTX_free(ctx);
        return NULL;
    }
    tl_jmp = &jb;
    while (!atomic_load(&t->err)) {
        uint64_t b = atomic_fetch_add(&t->next, 1);
        if (b >= t->nblocks)
            break;
        uint64_t first = b * t->per_block;
        uint64_t off = first * t->leaf;
        uint64_t bytes = t->len - off;
        if (bytes > t->per_block * t->leaf)
            bytes = t->per_block * t->leaf;
        const unsigned char *p;
        if (t->base) {
            p = t->base + off;
        } else {
            uint64_t aoff = off & ~(uint64_t)(pg - 1);
            maplen = (size_t)(bytes + (off - aoff));
            void *mp = mmap(NULL, maplen, PROT_READ, MAP_SHARED | MAP_POPULATE, t->fd, (off_t)aoff);
            if (mp == MAP_FAILED) {
                int e = errno;
                if (tree_fail(t, XV_EIO))
                    t->map_errno = e;
                break;
            }
            map = mp;
            p = map + (off - aoff);
        }
        enum xv_status rc = block_root(ctx, p, bytes, t->leaf, t->roots[b]);
        if (map) {
            munmap(map, maplen);
            map = NULL;
        }
        if (rc) {
            tree_fail(t, rc);
            break;
        }
    }
    tl_jmp = NULL;
    EVP_MD_CTX_free(ctx);
    return NULL;
}

/* Hashes every block on up to nthreads threads (the caller's included), then folds the block roots. */
static enum xv_status tree_blocks(struct tree_job *t, int nthreads, EVP_MD_CTX *ctx, unsigned char *top)
{
    uint64_t want = t->len / (512u << 10) + 1;      /* threads cost ~30 us: not for tiny inputs */
    if (want > t->nblocks)
        want = t->nblocks;
    if (want > (uint64_t)nthreads)
        want = (uint64_t)nthreads;
    pthread_t *th = NULL;
    if (want > 1 && !(th = calloc((size_t)want - 1, sizeof *th)))
        return XV_ENOMEM;
    uint64_t started = 0;
    guard_on();
    for (uint64_t i = 1; i < want; i++)
        if (pthread_create(&th[started], NULL, tree_run, t) == 0)
            started++;            /* fewer threads only make it slower */
    tree_run(t);
    for (uint64_t i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    guard_off();
    free(th);

    enum xv_status rc = (enum xv_status)atomic_load(&t->err);
    mstack st;
    st.top = 0;
    for (uint64_t b = 0; b < t->nblocks && !rc; b++) {
        uint64_t m = t->nleaves - b * t->per_block;
        rc = ms_push(ctx, &st, t->roots[b], m < t->per_block ? m : t->per_block);
    }
    return rc ? rc : ms_fold(ctx, &st, top);
}

static enum xv_status tree_hash(const unsigned char *base, int fd, uint64_t len, uint32_t leaf,
                                int nthreads, unsigned char *out, int *err_errno)
{
    const EVP_MD *md;
    if (!leaf_ok(leaf) || nthreads < 1 || !out)
        return XV_EINVAL;
    if (xv_sha256_md(&md))
        return XV_ECRYPTO;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return XV_ENOMEM;
    unsigned char top[32];
    enum xv_status rc;

    if (len == 0) {
        rc = digest(ctx, 0x00, (const unsigned char *)"", 0, top);
    } else {
        struct tree_job t;
        memset(&t, 0, sizeof t);
        t.base = base;
        t.fd = fd;
        t.len = len;
        t.leaf = leaf;
        t.nleaves = (len + leaf - 1) / leaf;
        /* Blocks are perfect subtrees (a power of two of leaves), so each worker folds its own;
         * small inputs get smaller blocks so every core still has work. */
        t.per_block = WINDOW / leaf ? WINDOW / leaf : 1;
        while (t.per_block > 1 && t.nleaves < t.per_block * 4 * (uint64_t)nthreads)
            t.per_block >>= 1;
        t.nblocks = (t.nleaves + t.per_block - 1) / t.per_block;
        atomic_init(&t.next, 0);
        atomic_init(&t.err, XV_OK);
        t.roots = malloc(t.nblocks * 32);
        rc = t.roots ? tree_blocks(&t, nthreads, ctx, top) : XV_ENOMEM;
        if (rc == XV_EIO && err_errno)
            *err_errno = t.map_errno;
        free(t.roots);
    }
    if (!rc)
        rc = finalize(ctx, top, len, leaf, out);
    EVP_MD_CTX_free(ctx);
    return rc;
}

enum xv_status xv_tree_hash_buf(const unsigned char *data, uint64_t len, uint32_t leaf_size, int nthreads,
                                unsigned char out[32])
{
    static const unsigned char empty[1];
    if (!data && len)
        return XV_EINVAL;
    return tree_hash(data ? data : empty, -1, len, leaf_size, nthreads, out, NULL);
}

enum xv_status xv_tree_hash_fd(int fd, uint64_t len, uint32_t leaf_size, int nthreads, unsigned char out[32],
                               int *err_errno)
{
    if (fd < 0)
        return XV_EINVAL;
    return tree_hash(NULL, fd, len, leaf_size, nthreads, out, err_errno);
}

/* ---------------------------------------------------------------- streaming engine */

/* Data arrives into the current one of two buffers.  The calling thread finds chunk boundaries and
 * leaf ends and queues digest jobs; worker threads (and the caller, when the backlog grows) run them.
 * When the current buffer fills, the unfinished tail moves to the other buffer; the commit before
 * that hands out every job still on the other buffer, so job pointers stay valid and the workers
 * keep hashing the current buffer meanwhile. */

enum { JOB_CHUNK, JOB_LEAF };
enum { J_QUEUED, J_CLAIMED, J_DONE };

typedef struct {
    uint64_t soff;
    const unsigned char *p;
    uint32_t len;
    unsigned char kind, bufid, state;
    unsigned char digest[32];
} xjob;

typedef struct {
    xjob *j;
    size_t cap;
    uint64_t out, claim, add;   /* monotonic; slot = index % cap */
} xq;

struct worker {
    pthread_t th;
    EVP_MD_CTX *ctx;            /* the libcrypto engine reuses it for every job */
    xv_stream *s;
};

struct xv_stream {
    int chunking, tree;
    struct xv_cdc cdc;
    uint32_t leaf;
    unsigned char *buf[2];
    size_t bcap, tail, cstart, lstart;
    int cur;
    uint64_t base;              /* stream offset of buf[cur][0] */
    uint64_t total;
    xq cq, lq;
    size_t unclaimed, high;
    int sync_ready;             /* mu and both condition variables are initialized */
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    int stop, waiters, finished;
    enum xv_status err;         /* the first failed job's status, under mu */
    struct worker *w;
    int nw, nworkers;           /* worker slots, threads running */
    EVP_MD_CTX *ctx;            /* the feeding thread's */
    mstack ms;
    unsigned char root[32];
};

/* Kept out of line on a cache-line boundary: inlined, its two ~30-byte loops landed wherever the
 * surrounding code put them, and one straddling a 64-byte fetch line made the scan ~15% slower. */
__attribute__((noinline, aligned(64))) size_t xv_cdc_cut(const struct xv_cdc *c, const unsigned char *p, size_t n)
{
    if (n <= c->min)
        return n;
    size_t end = n < c->max ? n : c->max;
    size_t normal = c->avg < end ? c->avg : end;
    uint64_t h = 0;
    size_t i = c->min;
    for (; i < normal; i++) {
        h = (h << 1) + g_gear[p[i]];
        if (!(h & c->mask_s))
            return i + 1;
    }
    for (; i < end; i++) {
        h = (h << 1) + g_gear[p[i]];
        if (!(h & c->mask_l))
            return i + 1;
    }
    return end;
}

enum { CLAIM_MAX = 4 };   /* one batch fills the SHA-256 lanes */

/* Claims the oldest queued jobs of one kind (they share a prefix, so they hash as one batch). */
static int claim_locked(xv_stream *s, xjob **out)
{
    xq *q = NULL;
    int c = s->cq.claim < s->cq.add, l = s->lq.claim < s->lq.add;
    if (c && l)
        q = s->cq.j[s->cq.claim % s->cq.cap].soff <= s->lq.j[s->lq.claim % s->lq.cap].soff ? &s->cq : &s->lq;
    else if (c)
        q = &s->cq;
    else if (l)
        q = &s->lq;
    int n = 0;
    while (q && n < CLAIM_MAX && q->claim < q->add) {
        xjob *j = &q->j[q->claim++ % q->cap];
        j->state = J_CLAIMED;
        s->unclaimed -= j->len;
        out[n++] = j;
    }
    return n;
}

/* Run claimed jobs outside the lock (called and returning with s->mu held). */
static void run_claimed_locked(xv_stream *s, EVP_MD_CTX *ctx, xjob **jobs, int n)
{
    const unsigned char *p[CLAIM_MAX];
    size_t len[CLAIM_MAX];
    unsigned char dig[CLAIM_MAX][32];
    for (int i = 0; i < n; i++) {
        p[i] = jobs[i]->p;
        len[i] = jobs[i]->len;
    }
    int prefix = jobs[0]->kind == JOB_LEAF ? 0x00 : -1;
    pthread_mutex_unlock(&s->mu);
    enum xv_status rc = xv_sha256_batch_ctx(ctx, (size_t)n, p, len, prefix, dig[0]);
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < n; i++) {
        memcpy(jobs[i]->digest, dig[i], 32);
        jobs[i]->state = J_DONE;
    }
    if (rc && !s->err)
        s->err = rc;
    if (s->waiters)
        pthread_cond_broadcast(&s->done_cv);
}

static void *stream_worker(void *arg)
{
    struct worker *w = arg;
    xv_stream *s = w->s;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        xjob *j[CLAIM_MAX];
        int n = claim_locked(s, j);
        if (!n) {
            pthread_cond_wait(&s->work_cv, &s->mu);
            continue;
        }
        run_claimed_locked(s, w->ctx, j, n);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* With mu held: run queued jobs in the feeding thread, or wait for the workers', while pred holds. */
static void work_while_locked(xv_stream *s, int (*pred)(const xv_stream *, int), int arg)
{
    while (pred(s, arg)) {
        xjob *j[CLAIM_MAX];
        int n = claim_locked(s, j);
        if (n) {
            run_claimed_locked(s, s->ctx, j, n);
            continue;
        }
        s->waiters++;
        pthread_cond_wait(&s->done_cv, &s->mu);
        s->waiters--;
    }
}

static int pending_on_buf(const xv_stream *s, int bufid)
{
    const xq *qs[2] = {&s->cq, &s->lq};
    for (int k = 0; k < 2; k++)
        for (uint64_t i = qs[k]->out; i < qs[k]->add; i++) {
            const xjob *j = &qs[k]->j[i % qs[k]->cap];
            if (j->bufid != bufid)
                break;          /* jobs on the older buffer form a prefix */
            if (j->state != J_DONE)
                return 1;
        }
    return 0;
}

static int any_pending(const xv_stream *s, int unused)
{
    (void)unused;
    const xq *qs[2] = {&s->cq, &s->lq};
    for (int k = 0; k < 2; k++)
        for (uint64_t i = qs[k]->out; i < qs[k]->add; i++)
            if (qs[k]->j[i % qs[k]->cap].state != J_DONE)
                return 1;
    return 0;
}

static int backlog_high(const xv_stream *s, int unused)
{
    (void)unused;
    return s->unclaimed > s->high;
}

static void stop_workers(xv_stream *s)
{
    if (!s->nworkers)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < s->nworkers; i++)
        pthread_join(s->w[i].th, NULL);
    s->nworkers = 0;
}

void xv_stream_free(xv_stream *s)
{
    if (!s)
        return;
    stop_workers(s);
    if (s->sync_ready) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->work_cv);
        pthread_cond_destroy(&s->done_cv);
    }
    for (int i = 0; i < s->nw; i++)
        EVP_MD_CTX_free(s->w[i].ctx);
    free(s->w);
    EVP_MD_CTX_free(s->ctx);
    free(s->buf[0]);
    free(s->buf[1]);
    free(s->cq.j);
    free(s->lq.j);
    free(s);
}

static enum xv_status stream_args_ok(int chunking, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
                                     int tree, uint32_t leaf_size, int nworkers)
{
    if (!chunking && !tree)
        return XV_EINVAL;
    if (chunking && !(min_size >= 64 && avg_size >= 256 && (avg_size & (avg_size - 1)) == 0 &&
                      min_size < avg_size && avg_size < max_size && max_size <= LEAF_MAX))
        return XV_EINVAL;
    if (tree && !leaf_ok(leaf_size))
        return XV_EINVAL;
    return nworkers >= 0 ? XV_OK : XV_EINVAL;
}

static enum xv_status sync_init(xv_stream *s)
{
    if (pthread_mutex_init(&s->mu, NULL))
        return XV_ENOMEM;
    if (pthread_cond_init(&s->work_cv, NULL)) {
        pthread_mutex_destroy(&s->mu);
        return XV_ENOMEM;
    }
    if (pthread_cond_init(&s->done_cv, NULL)) {
        pthread_cond_destroy(&s->work_cv);
        pthread_mutex_destroy(&s->mu);
        return XV_ENOMEM;
    }
    s->sync_ready = 1;
    return XV_OK;
}

/* Buffers, queues and the feeding thread's context, sized from the parameters. */
static enum xv_status stream_alloc(xv_stream *s)
{
    size_t unit = s->chunking ? s->cdc.max : 0;
    if (s->tree && s->leaf > unit)
        unit = s->leaf;
    s->bcap = 2 * unit + 2 * SPACE_MAX;
    if (s->bcap < ((size_t)4 << 20))
        s->bcap = (size_t)4 << 20;
    /* Every uncollected job points into one of the two buffers, which bounds the queues. */
    s->cq.cap = s->chunking ? 2 * s->bcap / s->cdc.min + 8 : 1;
    s->lq.cap = s->tree ? 2 * s->bcap / s->leaf + 8 : 1;
    s->high = 2 * (unit > SPACE_MAX ? unit : SPACE_MAX);
    s->buf[0] = malloc(s->bcap);
    s->buf[1] = malloc(s->bcap);
    s->cq.j = calloc(s->cq.cap, sizeof(xjob));
    s->lq.j = calloc(s->lq.cap, sizeof(xjob));
    s->ctx = EVP_MD_CTX_new();
    if (!s->buf[0] || !s->buf[1] || !s->cq.j || !s->lq.j || !s->ctx)
        return XV_ENOMEM;
    return sync_init(s);
}

/* Starts up to n workers, each with its own digest context.  A thread that cannot start only costs
 * speed; with none, the feeding thread hashes everything itself. */
static enum xv_status start_workers(xv_stream *s, int n)
{
    if (n && !(s->w = calloc((size_t)n, sizeof *s->w)))
        return XV_ENOMEM;
    for (s->nw = 0; s->nw < n; s->nw++) {
        s->w[s->nw].s = s;
        if (!(s->w[s->nw].ctx = EVP_MD_CTX_new()))
            return XV_ENOMEM;
    }
    for (int i = 0; i < n; i++)
        if (pthread_create(&s->w[s->nworkers].th, NULL, stream_worker, &s->w[s->nworkers]) == 0)
            s->nworkers++;
    if (!s->nworkers)
        s->high = 0;
    return XV_OK;
}

enum xv_status xv_stream_new(int chunking, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
                             int tree, uint32_t leaf_size, int nworkers, xv_stream **out)
{
    if (!out)
        return XV_EINVAL;
    *out = NULL;
    enum xv_status rc = stream_args_ok(chunking, min_size, avg_size, max_size, tree, leaf_size, nworkers);
    const EVP_MD *md;
    if (!rc)
        rc = xv_sha256_md(&md);
    struct xv_cdc cdc;
    memset(&cdc, 0, sizeof cdc);
    if (!rc && chunking)
        rc = xv_cdc_init(&cdc, min_size, avg_size, max_size);
    if (rc)
        return rc;
    xv_stream *s = calloc(1, sizeof *s);
    if (!s)
        return XV_ENOMEM;
    s->chunking = chunking;
    s->tree = tree;
    s->cdc = cdc;
    s->leaf = leaf_size;
    rc = stream_alloc(s);
    if (!rc)
        rc = start_workers(s, nworkers);
    if (rc) {
        xv_stream_free(s);
        return rc;
    }
    *out = s;
    return XV_OK;
}

enum xv_status xv_stream_max_out(const xv_stream *s, size_t *max_out)
{
    if (!s || !max_out)
        return XV_EINVAL;
    *max_out = s->cq.cap;
    return XV_OK;
}

/* Free room needed before accepting `want` more bytes; below it the tail moves to the other buffer. */
static size_t swap_need(const xv_stream *s, size_t want)
{
    if (want > SPACE_MAX)
        want = SPACE_MAX;
    return want < s->bcap / 4 ? want : s->bcap / 4;
}

enum xv_status xv_stream_space(xv_stream *s, size_t want, unsigned char **buf, size_t *got)
{
    if (!s || !buf || !got)
        return XV_EINVAL;
    *buf = NULL;
    *got = 0;
    if (s->finished)
        return XV_ESTATE;
    if (want == 0)
        want = 1;
    if (want > SPACE_MAX)
        want = SPACE_MAX;
    if (s->bcap - s->tail < swap_need(s, want)) {
        /* The last commit saw this coming and handed out every job on the other buffer. */
        int other = 1 - s->cur;
        size_t keep = s->tail;
        if (s->chunking && s->cstart < keep)
            keep = s->cstart;
        if (s->tree && s->lstart < keep)
            keep = s->lstart;
        memcpy(s->buf[other], s->buf[s->cur] + keep, s->tail - keep);
        s->cur = other;
        s->base += keep;
        s->tail -= keep;
        s->cstart = s->cstart > keep ? s->cstart - keep : 0;
        s->lstart = s->lstart > keep ? s->lstart - keep : 0;
    }
    size_t room = s->bcap - s->tail;
    *got = room < want ? room : want;
    *buf = s->buf[s->cur] + s->tail;
    return XV_OK;
}

static void add_job(xv_stream *s, xq *q, int kind, size_t pos, size_t len)
{
    xjob *j = &q->j[q->add % q->cap];
    j->soff = s->base + pos;
    j->p = s->buf[s->cur] + pos;
    j->len = (uint32_t)len;
    j->kind = (unsigned char)kind;
    j->bufid = (unsigned char)s->cur;
    j->state = J_QUEUED;
    q->add++;
    s->unclaimed += len;
}

/* A commit runs in four steps: scan for chunk boundaries (no lock), queue their jobs and the
 * finished leaves, settle (help or wait until the backlog allows more input), collect the results
 * that are done, in stream order. */

enum { SCAN_BATCH = 64 };          /* small batches: workers start on the first chunks early */

struct cuts {
    size_t n, pos[SCAN_BATCH], len[SCAN_BATCH];
};

/* Without the lock: only the feeding thread reads the bytes past cstart.  A boundary is decided only
 * once max bytes are buffered (or at the end), so it never depends on how the stream was split. */
static size_t scan_chunks(xv_stream *s, int final, struct cuts *c)
{
    const unsigned char *b = s->buf[s->cur];
    c->n = 0;
    while (s->chunking && c->n < SCAN_BATCH && s->cstart < s->tail &&
           (s->tail - s->cstart >= s->cdc.max || final)) {
        size_t len = xv_cdc_cut(&s->cdc, b + s->cstart, s->tail - s->cstart);
        c->pos[c->n] = s->cstart;
        c->len[c->n++] = len;
        s->cstart += len;
    }
    return c->n;
}

static void queue_chunks(xv_stream *s, const struct cuts *c)
{
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < c->n; i++)
        add_job(s, &s->cq, JOB_CHUNK, c->pos[i], c->len[i]);
    pthread_cond_broadcast(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
}

static void queue_leaves_locked(xv_stream *s, int final)
{
    int added = 0;
    for (; s->tail - s->lstart >= s->leaf; s->lstart += s->leaf, added = 1)
        add_job(s, &s->lq, JOB_LEAF, s->lstart, s->leaf);
    if (final && (s->tail > s->lstart || s->total == 0)) {
        add_job(s, &s->lq, JOB_LEAF, s->lstart, s->tail - s->lstart);
        s->lstart = s->tail;
        added = 1;
    }
    if (added)
        pthread_cond_broadcast(&s->work_cv);
}

static void settle_locked(xv_stream *s, int final)
{
    if (final) {
        work_while_locked(s, any_pending, 0);
        return;
    }
    work_while_locked(s, backlog_high, 0);
    /* The next space() may overwrite the other buffer: its jobs (old, normally long done) must be
     * handed out now, while their data is still there. */
    if (s->bcap - s->tail < swap_need(s, SPACE_MAX))
        work_while_locked(s, pending_on_buf, 1 - s->cur);
}

static enum xv_status collect_locked(xv_stream *s, xv_chunk *out, size_t *n_out)
{
    while (s->cq.out < s->cq.add) {
        xjob *j = &s->cq.j[s->cq.out % s->cq.cap];
        if (j->state != J_DONE)
            break;
        xv_chunk *c = &out[(*n_out)++];
        c->offset = j->soff;
        c->data = j->p;
        c->length = j->len;
        memcpy(c->digest, j->digest, 32);
        s->cq.out++;
    }
    while (s->lq.out < s->lq.add) {
        xjob *j = &s->lq.j[s->lq.out % s->lq.cap];
        if (j->state != J_DONE)
            break;
        enum xv_status rc = ms_push(s->ctx, &s->ms, j->digest, 1);
        if (rc)
            return rc;
        s->lq.out++;
    }
    return XV_OK;
}

static enum xv_status finish(xv_stream *s)
{
    s->finished = 1;
    stop_workers(s);
    if (!s->tree)
        return XV_OK;
    unsigned char top[32];
    enum xv_status rc = ms_fold(s->ctx, &s->ms, top);
    return rc ? rc : finalize(s->ctx, top, s->total, s->leaf, s->root);
}

enum xv_status xv_stream_commit(xv_stream *s, size_t n, int final, xv_chunk *out, size_t *n_out)
{
    if (!s || !out || !n_out)
        return XV_EINVAL;
    *n_out = 0;
    if (s->finished)
        return XV_ESTATE;
    if (n > s->bcap - s->tail)
        return XV_EINVAL;
    s->tail += n;
    s->total += n;

    struct cuts cuts;
    size_t found;
    do {
        found = scan_chunks(s, final, &cuts);
        if (found)
            queue_chunks(s, &cuts);
    } while (found == SCAN_BATCH);

    pthread_mutex_lock(&s->mu);
    if (s->tree)
        queue_leaves_locked(s, final);
    settle_locked(s, final);
    enum xv_status rc = s->err ? s->err : collect_locked(s, out, n_out);
    pthread_mutex_unlock(&s->mu);
    return rc || !final ? rc : finish(s);
}

enum xv_status xv_stream_root(const xv_stream *s, unsigned char out[32])
{
    if (!s || !out)
        return XV_EINVAL;
    if (!s->tree || !s->finished)
        return XV_ESTATE;
    memcpy(out, s->root, 32);
    return XV_OK;
}
