/* The store's restore pipeline: every chunk of a stream read from its pack, authenticated, its id and
 * length checked, delta chunks assembled from their bases, and its plaintext written at its stream
 * offset, on every core without the GIL.  A rollback verifies the checkpoint this way into a spool once
 * and restores from that copy, instead of verifying it and then reading it a second time.
 *
 * Checks and their order are those of xen_vtpm/store/reader.py (docs/formats.md, "Checkpoint store"
 * §0); on a failure the Python reader reopens the chunk at fault to name what is wrong. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "seal.h"
#include "store.h"

static const unsigned char ROOT_LABEL[24] = "xen-vtpm stream root v2";
enum { CLAIM = 4 };                 /* chunks one worker opens together: their SHA-256 run in lanes */
enum { DELTA_VERSION = 1, MAX_BASES = 16 };

struct rbatch {
    xv_rchunk *c;
    size_t n;
    xv_rplace *b;
    size_t nb;
    uint64_t first;                 /* index of c[0] among all chunks submitted */
    unsigned char **base_plain;     /* phase 1 opens the bases ... */
    size_t *alias;                  /* ... once each: a base named again reads the first one's */
    unsigned char (*sha)[32];       /* ... phase 2 the chunks */
    size_t bclaim, bdone, cclaim, cdone;
};

struct rworker {
    pthread_t th;
    xv_restore *r;
    struct xv_sealer sl;
    EVP_MD_CTX *md;
    EVP_CIPHER_CTX *ctr;
    unsigned char *rd[CLAIM], *pt[CLAIM], *tmp;   /* entry read, plaintext, delta payload / CTR output */
    size_t rdcap[CLAIM], ptcap[CLAIM], tmpcap;
};

struct xv_restore {
    int out_fd, use_ctr;
    unsigned char ctr_key[32], ctr_iv[16];
    struct rbatch q[2];             /* FIFO: q[head] is the oldest batch in flight */
    int head, count;
    uint64_t submitted;
    EVP_MD_CTX *root;

    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    int sync_ready, stop;
    enum xv_status err;
    uint64_t err_chunk;
    int64_t err_base;
    int err_errno;
    struct rworker *w, self;
    int nw, nrunning;
    uint64_t ns[XV_STAGE_COUNT];
};

static EVP_CIPHER *g_ctr;
static pthread_once_t g_ctr_once = PTHREAD_ONCE_INIT;

static void fetch_ctr(void)
{
    g_ctr = EVP_CIPHER_fetch(NULL, "AES-256-CTR", NULL);
}

/* Fetched once per process, as the other ciphers (seal.c). */
static const EVP_CIPHER *ctr_cipher(void)
{
    pthread_once(&g_ctr_once, fetch_ctr);
    return g_ctr;
}

/* ---------------------------------------------------------------- errors: the first one is kept */

static void fail_locked(xv_restore *r, enum xv_status rc, uint64_t chunk, int64_t base, int e)
{
    if (!r->err) {
        r->err = rc;
        r->err_chunk = chunk;
        r->err_base = base;
        r->err_errno = e;
    }
    pthread_cond_broadcast(&r->done_cv);
    pthread_cond_broadcast(&r->work_cv);
}

/* ---------------------------------------------------------------- reading and opening */

static int grow(unsigned char **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 1;
    unsigned char *q = realloc(*p, need);
    if (!q)
        return 0;
    *p = q;
    *cap = need;
    return 1;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Reads a whole entry and checks its header against the catalog: XV_EIO (*e) or XV_EFORMAT. */
static enum xv_status read_entry(const xv_rplace *pl, unsigned char *buf, int *e)
{
    size_t want = XV_ENTRY_HEAD + (size_t)pl->sealed_len, got = 0;
    while (got < want) {
        ssize_t n = pread(pl->fd, buf + got, want - got, (off_t)(pl->entry_offset + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            *e = errno;
            return XV_EIO;
        }
        if (n == 0)
            return XV_EFORMAT;      /* the pack is truncated */
        got += (size_t)n;
    }
    if (memcmp(buf, pl->id, XV_ID_SIZE) != 0 || le32(buf + XV_ID_SIZE + XV_NONCE_SIZE) != pl->sealed_len)
        return XV_EFORMAT;
    return XV_OK;
}

/* Opens a read entry into out (sealed_len - 16 bytes). */
static enum xv_status open_entry(struct rworker *w, const xv_rplace *pl, int delta, const unsigned char *buf,
                                 unsigned char *out)
{
    return xv_open_sealed(&w->sl, pl->id, delta, buf + XV_ID_SIZE, buf + XV_ENTRY_HEAD, pl->sealed_len, out);
}

/* ---------------------------------------------------------------- delta chunks */

/* Assembles a delta's plaintext (plain_len bytes) from its payload and its batch's opened bases,
 * checking every bound as store/delta.py's decode and apply do.  The payload's bases must be exactly
 * the chunk's bases[] (the catalog's deps rows). */
static enum xv_status assemble(const struct rbatch *B, const xv_rchunk *c, const unsigned char *p, size_t n,
                               unsigned char *out)
{
    if (n < 3 || p[0] != DELTA_VERSION)
        return XV_EFORMAT;
    size_t nb = (size_t)p[1] | (size_t)p[2] << 8, pos = 3;
    if (nb < 1 || nb > MAX_BASES || pos + 32 * nb + 4 > n || nb != c->nbases)
        return XV_EFORMAT;
    size_t map[MAX_BASES];
    for (size_t i = 0; i < nb; i++) {
        const unsigned char *id = p + pos + 32 * i;
        for (size_t k = 0; k < i; k++)
            if (memcmp(id, p + pos + 32 * k, 32) == 0)
                return XV_EFORMAT;
        size_t k = 0;
        while (k < nb && memcmp(id, B->b[c->first_base + k].id, 32) != 0)
            k++;
        if (k == nb)
            return XV_EFORMAT;
        map[i] = c->first_base + k;
    }
    pos += 32 * nb;
    uint32_t count = le32(p + pos), plain = c->place.plain_len;
    pos += 4;
    if (count > plain)
        return XV_EFORMAT;
    uint64_t total = 0;
    for (uint32_t s = 0; s < count; s++) {
        if (pos + 5 > n)
            return XV_EFORMAT;
        unsigned kind = p[pos];
        uint32_t len = le32(p + pos + 1);
        pos += 5;
        if (kind > 1 || len == 0 || (total += len) > plain)
            return XV_EFORMAT;
        if (kind == 0) {
            if (pos + 6 > n)
                return XV_EFORMAT;
            size_t index = (size_t)p[pos] | (size_t)p[pos + 1] << 8;
            uint32_t off = le32(p + pos + 2);
            pos += 6;
            if (index >= nb)
                return XV_EFORMAT;
            const xv_rplace *base = &B->b[map[index]];
            if ((uint64_t)off + len > base->plain_len)
                return XV_EFORMAT;
            memcpy(out + total - len, B->base_plain[B->alias[map[index]]] + off, len);
        } else {
            if (pos + len > n)
                return XV_EFORMAT;
            memcpy(out + total - len, p + pos, len);
            pos += len;
        }
    }
    return pos == n && total == plain ? XV_OK : XV_EFORMAT;
}

/* ---------------------------------------------------------------- output */

static int write_at(int fd, const unsigned char *p, size_t n, uint64_t off)
{
    while (n) {
        ssize_t k = pwrite(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? errno : EIO;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

/* AES-256-CTR at stream offset off: the counter block is ctr_iv + off / 16 (128-bit big-endian, as
 * OpenSSL and the spool's reader count), and off % 16 keystream bytes are skipped. */
static enum xv_status encrypt_at(xv_restore *r, struct rworker *w, const unsigned char *in, size_t n, uint64_t off,
                                 unsigned char *out)
{
    unsigned char iv[16], skip[16];
    memcpy(iv, r->ctr_iv, 16);
    uint64_t add = off / 16;
    unsigned carry = 0;
    for (int i = 15; i >= 0; i--) {
        unsigned v = iv[i] + (unsigned)(i >= 8 ? (add >> (8 * (15 - i))) & 0xff : 0) + carry;
        iv[i] = (unsigned char)v;
        carry = v >> 8;
    }
    int outl;
    size_t k = (size_t)(off % 16);
    if (EVP_EncryptInit_ex2(w->ctr, ctr_cipher(), r->ctr_key, iv, NULL) != 1 ||
        (k && EVP_EncryptUpdate(w->ctr, skip, &outl, skip, (int)k) != 1) ||
        EVP_EncryptUpdate(w->ctr, out, &outl, in, (int)n) != 1)
        return XV_ECRYPTO;
    return XV_OK;
}

/* ---------------------------------------------------------------- the work */

static enum xv_status open_base(xv_restore *r, struct rworker *w, struct rbatch *B, size_t j, int *e)
{
    (void)r;
    const xv_rplace *pl = &B->b[j];
    if (pl->sealed_len < XV_TAG_SIZE || pl->sealed_len - XV_TAG_SIZE != pl->plain_len)
        return XV_EFORMAT;
    if (!grow(&w->rd[0], &w->rdcap[0], XV_ENTRY_HEAD + (size_t)pl->sealed_len))
        return XV_ENOMEM;
    unsigned char *plain = malloc(pl->plain_len ? pl->plain_len : 1);
    if (!plain)
        return XV_ENOMEM;
    enum xv_status rc = read_entry(pl, w->rd[0], e);
    if (!rc)
        rc = open_entry(w, pl, 0, w->rd[0], plain);
    if (rc) {
        free(plain);
        return rc;
    }
    B->base_plain[j] = plain;
    return XV_OK;
}

/* Opens one chunk into w->pt[slot]: read, authenticate, assemble a delta, check the lengths. */
static enum xv_status open_chunk(struct rworker *w, const struct rbatch *B, const xv_rchunk *c, int slot, int *e)
{
    const xv_rplace *pl = &c->place;
    if (pl->sealed_len < XV_TAG_SIZE || pl->plain_len != c->length)
        return XV_EBADID;
    size_t body = pl->sealed_len - XV_TAG_SIZE;
    if (!grow(&w->rd[slot], &w->rdcap[slot], XV_ENTRY_HEAD + (size_t)pl->sealed_len) ||
        !grow(&w->pt[slot], &w->ptcap[slot], c->length ? c->length : 1))
        return XV_ENOMEM;
    enum xv_status rc = read_entry(pl, w->rd[slot], e);
    if (rc)
        return rc;
    if (!c->nbases) {
        if (body != c->length)
            return XV_EBADID;
        return open_entry(w, pl, 0, w->rd[slot], w->pt[slot]);
    }
    if (!grow(&w->tmp, &w->tmpcap, body ? body : 1))
        return XV_ENOMEM;
    rc = open_entry(w, pl, 1, w->rd[slot], w->tmp);
    return rc ? rc : assemble(B, c, w->tmp, body, w->pt[slot]);
}

/* Opens, checks and writes chunks [i, i + k) of batch B (claimed), outside the lock. */
static enum xv_status run_chunks(xv_restore *r, struct rworker *w, struct rbatch *B, size_t i, size_t k,
                                 size_t *bad, int *e, int *writing)
{
    const unsigned char *p[CLAIM];
    size_t len[CLAIM];
    unsigned char id[32];
    uint64_t t0 = xv_thread_ns();
    for (size_t s = 0; s < k; s++) {
        enum xv_status rc = open_chunk(w, B, &B->c[i + s], (int)s, e);
        if (rc) {
            *bad = i + s;
            return rc;
        }
        p[s] = w->pt[s];
        len[s] = B->c[i + s].length;
    }
    uint64_t t1 = xv_thread_ns();
    enum xv_status rc = xv_sha256_batch_ctx(w->md, k, p, len, -1, B->sha[i]);
    for (size_t s = 0; s < k && !rc; s++) {
        rc = xv_chunk_id(&w->sl, B->sha[i + s], id);
        if (!rc && memcmp(id, B->c[i + s].place.id, 32) != 0) {
            *bad = i + s;
            return XV_EBADID;
        }
    }
    uint64_t t2 = xv_thread_ns();
    for (size_t s = 0; s < k && !rc && r->out_fd >= 0; s++) {
        const unsigned char *out = p[s];
        if (r->use_ctr) {
            if (!grow(&w->tmp, &w->tmpcap, len[s] ? len[s] : 1))
                return XV_ENOMEM;
            if ((rc = encrypt_at(r, w, p[s], len[s], B->c[i + s].offset, w->tmp)))
                break;
            out = w->tmp;
        }
        int err = write_at(r->out_fd, out, len[s], B->c[i + s].offset);
        if (err) {
            *e = err;
            *bad = i + s;
            *writing = 1;
            rc = XV_EIO;
        }
    }
    uint64_t t3 = xv_thread_ns();
    pthread_mutex_lock(&r->mu);
    r->ns[XV_STAGE_OPEN] += t1 - t0;
    r->ns[XV_STAGE_HASH] += t2 - t1;
    r->ns[XV_STAGE_WRITE] += t3 - t2;
    pthread_mutex_unlock(&r->mu);
    if (rc && *bad == (size_t)-1)
        *bad = i;
    return rc;
}

/* One unit of work from the oldest batch that has some (mu held on entry and exit); 0 if none. */
static int work_one_locked(xv_restore *r, struct rworker *w)
{
    for (int q = 0; q < r->count; q++) {
        struct rbatch *B = &r->q[(r->head + q) % 2];
        if (r->err)
            return 0;
        while (B->bclaim < B->nb && B->alias[B->bclaim] != B->bclaim) {   /* opened as another index */
            B->bclaim++;
            B->bdone++;
        }
        if (B->bclaim < B->nb) {
            size_t j = B->bclaim++;
            int e = 0;
            pthread_mutex_unlock(&r->mu);
            uint64_t t0 = xv_thread_ns();
            enum xv_status rc = open_base(r, w, B, j, &e);
            uint64_t dt = xv_thread_ns() - t0;
            pthread_mutex_lock(&r->mu);
            r->ns[XV_STAGE_OPEN] += dt;
            if (rc)
                fail_locked(r, rc, B->first, (int64_t)j, e);
            B->bdone++;
            pthread_cond_broadcast(&r->done_cv);
            pthread_cond_broadcast(&r->work_cv);
            return 1;
        }
        if (B->bdone < B->nb)
            continue;           /* its chunks wait for its bases; a later batch may have work */
        if (B->cclaim < B->n) {
            size_t i = B->cclaim, k = B->n - i < CLAIM ? B->n - i : CLAIM;
            B->cclaim += k;
            size_t bad = (size_t)-1;
            int e = 0, writing = 0;
            pthread_mutex_unlock(&r->mu);
            enum xv_status rc = run_chunks(r, w, B, i, k, &bad, &e, &writing);
            pthread_mutex_lock(&r->mu);
            if (rc)
                fail_locked(r, rc, B->first + bad, writing ? -2 : -1, e);
            B->cdone += k;
            pthread_cond_broadcast(&r->done_cv);
            return 1;
        }
    }
    return 0;
}

static void *worker_main(void *arg)
{
    struct rworker *w = arg;
    xv_restore *r = w->r;
    pthread_mutex_lock(&r->mu);
    while (!r->stop)
        if (!work_one_locked(r, w))
            pthread_cond_wait(&r->work_cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ---------------------------------------------------------------- batches */

static void batch_free(struct rbatch *B)
{
    for (size_t j = 0; B->base_plain && j < B->nb; j++)
        free(B->base_plain[j]);
    free(B->base_plain);
    free(B->alias);
    free(B->c);
    free(B->b);
    free(B->sha);
    memset(B, 0, sizeof *B);
}

static int batch_done(const struct rbatch *B)
{
    return B->bdone == B->nb && B->cdone == B->n;
}

/* Retires the oldest batch (done): its digests go into the root in order. */
static enum xv_status retire_locked(xv_restore *r)
{
    struct rbatch *B = &r->q[r->head];
    enum xv_status rc = XV_OK;
    for (size_t i = 0; i < B->n && !r->err && !rc; i++) {
        unsigned char le[4];
        for (int b = 0; b < 4; b++)
            le[b] = (unsigned char)(B->c[i].length >> (8 * b));
        if (EVP_DigestUpdate(r->root, B->sha[i], 32) != 1 || EVP_DigestUpdate(r->root, le, 4) != 1)
            rc = XV_ECRYPTO;
    }
    batch_free(B);
    r->head = (r->head + 1) % 2;
    r->count--;
    return rc;
}

/* Helps with, or waits for, the oldest batch until it is done, then retires it. */
static enum xv_status finish_oldest_locked(xv_restore *r)
{
    struct rbatch *B = &r->q[r->head];
    while (!batch_done(B) && !(r->err && B->bclaim == B->bdone && B->cclaim == B->cdone))
        if (!work_one_locked(r, &r->self))
            pthread_cond_wait(&r->done_cv, &r->mu);
    if (r->err) {
        /* Claimed work may still run on a worker: wait for it before freeing the batch. */
        while (B->bclaim != B->bdone || B->cclaim != B->cdone)
            pthread_cond_wait(&r->done_cv, &r->mu);
    }
    enum xv_status rc = retire_locked(r);
    if (rc)
        fail_locked(r, rc, 0, -1, 0);
    return r->err;
}

enum xv_status xv_restore_submit(xv_restore *r, const xv_rchunk *chunks, size_t n, const xv_rplace *bases,
                                 size_t nbases)
{
    if (!r || (n && !chunks) || (nbases && !bases))
        return XV_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (chunks[i].nbases > MAX_BASES || chunks[i].first_base > nbases ||
            chunks[i].nbases > nbases - chunks[i].first_base)
            return XV_EINVAL;
    pthread_mutex_lock(&r->mu);
    enum xv_status rc = r->err;
    if (!rc && r->count == 2)
        rc = finish_oldest_locked(r);
    if (rc) {
        pthread_mutex_unlock(&r->mu);
        return rc;
    }
    struct rbatch *B = &r->q[(r->head + r->count) % 2];
    memset(B, 0, sizeof *B);
    B->c = malloc((n ? n : 1) * sizeof *B->c);
    B->b = malloc((nbases ? nbases : 1) * sizeof *B->b);
    B->base_plain = calloc(nbases ? nbases : 1, sizeof *B->base_plain);
    B->alias = malloc((nbases ? nbases : 1) * sizeof *B->alias);
    B->sha = malloc((n ? n : 1) * sizeof *B->sha);
    if (!B->c || !B->b || !B->base_plain || !B->alias || !B->sha) {
        batch_free(B);
        pthread_mutex_unlock(&r->mu);
        return XV_ENOMEM;
    }
    if (n)
        memcpy(B->c, chunks, n * sizeof *chunks);
    if (nbases)
        memcpy(B->b, bases, nbases * sizeof *bases);
    B->n = n;
    B->nb = nbases;
    /* Neighbouring deltas often share a base: each distinct one is read and opened once per batch. */
    for (size_t j = 0; j < nbases; j++) {
        size_t k = 0;
        while (k < j && !(B->alias[k] == k && memcmp(B->b[k].id, B->b[j].id, 32) == 0 &&
                          B->b[k].fd == B->b[j].fd && B->b[k].entry_offset == B->b[j].entry_offset &&
                          B->b[k].sealed_len == B->b[j].sealed_len && B->b[k].plain_len == B->b[j].plain_len))
            k++;
        B->alias[j] = k;
    }
    B->first = r->submitted;
    r->submitted += n;
    r->count++;
    pthread_cond_broadcast(&r->work_cv);
    pthread_mutex_unlock(&r->mu);
    return XV_OK;
}

enum xv_status xv_restore_wait(xv_restore *r, uint64_t *chunk, int64_t *base, int *err_errno)
{
    if (!r || !chunk || !base || !err_errno)
        return XV_EINVAL;
    pthread_mutex_lock(&r->mu);
    while (r->count)
        finish_oldest_locked(r);
    enum xv_status rc = r->err;
    *chunk = r->err_chunk;
    *base = r->err_base;
    *err_errno = r->err_errno;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

enum xv_status xv_restore_root(xv_restore *r, unsigned char root[32])
{
    if (!r || !root)
        return XV_EINVAL;
    pthread_mutex_lock(&r->mu);
    enum xv_status rc = r->count || r->err ? XV_ESTATE : XV_OK;
    EVP_MD_CTX *c = rc ? NULL : EVP_MD_CTX_new();
    if (!rc && !c)
        rc = XV_ENOMEM;
    if (!rc && (EVP_MD_CTX_copy_ex(c, r->root) != 1 || EVP_DigestFinal_ex(c, root, NULL) != 1))
        rc = XV_ECRYPTO;
    EVP_MD_CTX_free(c);
    pthread_mutex_unlock(&r->mu);
    return rc;
}

enum xv_status xv_restore_stats(const xv_restore *r, uint64_t ns[XV_STAGE_COUNT])
{
    if (!r || !ns)
        return XV_EINVAL;
    pthread_mutex_lock((pthread_mutex_t *)&r->mu);
    memcpy(ns, r->ns, sizeof r->ns);
    pthread_mutex_unlock((pthread_mutex_t *)&r->mu);
    return XV_OK;
}

/* ---------------------------------------------------------------- life cycle */

static enum xv_status rworker_init(struct rworker *w, xv_restore *r, const unsigned char *id_key,
                                   const unsigned char *enc_key)
{
    w->r = r;
    if (!(w->md = EVP_MD_CTX_new()) || !(w->ctr = EVP_CIPHER_CTX_new()))
        return XV_ENOMEM;
    return xv_sealer_init(&w->sl, id_key, enc_key);
}

static void rworker_free(struct rworker *w)
{
    xv_sealer_free(&w->sl);
    EVP_MD_CTX_free(w->md);
    EVP_CIPHER_CTX_free(w->ctr);
    for (int s = 0; s < CLAIM; s++) {
        free(w->rd[s]);
        free(w->pt[s]);
    }
    free(w->tmp);
    memset(w, 0, sizeof *w);
}

void xv_restore_free(xv_restore *r)
{
    if (!r)
        return;
    if (r->sync_ready) {
        pthread_mutex_lock(&r->mu);
        if (r->count && !r->err)
            fail_locked(r, XV_ECANCELLED, 0, -1, 0);
        while (r->count)
            finish_oldest_locked(r);
        r->stop = 1;
        pthread_cond_broadcast(&r->work_cv);
        pthread_mutex_unlock(&r->mu);
        for (int i = 0; i < r->nrunning; i++)
            pthread_join(r->w[i].th, NULL);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->work_cv);
        pthread_cond_destroy(&r->done_cv);
    }
    for (int i = 0; i < r->nw; i++)
        rworker_free(&r->w[i]);
    rworker_free(&r->self);
    free(r->w);
    EVP_MD_CTX_free(r->root);
    OPENSSL_cleanse(r->ctr_key, sizeof r->ctr_key);
    free(r);
}

enum xv_status xv_restore_new(const unsigned char id_key[32], const unsigned char enc_key[32], int nworkers,
                              int out_fd, const unsigned char *ctr_key, const unsigned char *ctr_iv,
                              xv_restore **out)
{
    if (!out || !id_key || !enc_key || nworkers < 0 || nworkers > 1024 || (ctr_key && (!ctr_iv || out_fd < 0)))
        return XV_EINVAL;
    *out = NULL;
    const EVP_MD *md;
    enum xv_status rc = xv_sha256_md(&md);
    if (rc)
        return rc;
    if (ctr_key && !ctr_cipher())
        return XV_ECRYPTO;
    xv_restore *r = calloc(1, sizeof *r);
    if (!r)
        return XV_ENOMEM;
    r->out_fd = out_fd;
    r->err_base = -1;
    if (ctr_key) {
        r->use_ctr = 1;
        memcpy(r->ctr_key, ctr_key, 32);
        memcpy(r->ctr_iv, ctr_iv, 16);
    }
    r->root = EVP_MD_CTX_new();
    rc = r->root ? XV_OK : XV_ENOMEM;
    if (!rc && (EVP_DigestInit_ex(r->root, md, NULL) != 1 || EVP_DigestUpdate(r->root, ROOT_LABEL, 24) != 1))
        rc = XV_ECRYPTO;
    if (!rc)
        rc = rworker_init(&r->self, r, id_key, enc_key);
    if (!rc && nworkers && !(r->w = calloc((size_t)nworkers, sizeof *r->w)))
        rc = XV_ENOMEM;
    for (; !rc && r->nw < nworkers; r->nw++)
        rc = rworker_init(&r->w[r->nw], r, id_key, enc_key);
    if (!rc) {
        if (pthread_mutex_init(&r->mu, NULL))
            rc = XV_ENOMEM;
        else if (pthread_cond_init(&r->work_cv, NULL)) {
            pthread_mutex_destroy(&r->mu);
            rc = XV_ENOMEM;
        } else if (pthread_cond_init(&r->done_cv, NULL)) {
            pthread_cond_destroy(&r->work_cv);
            pthread_mutex_destroy(&r->mu);
            rc = XV_ENOMEM;
        } else {
            r->sync_ready = 1;
        }
    }
    /* A worker that cannot start only costs speed: the submitting thread does its share. */
    for (int i = 0; !rc && i < r->nw; i++)
        if (pthread_create(&r->w[r->nrunning].th, NULL, worker_main, &r->w[r->nrunning]) == 0)
            r->nrunning++;
    if (rc) {
        xv_restore_free(r);
        return rc;
    }
    *out = r;
    return XV_OK;
}
