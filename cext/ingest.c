/* The store's ingest pipeline: content-defined chunks -> SHA-256 (four lanes per core) -> keyed id ->
 * AES-256-GCM -> pack entries, on every core, without the GIL (docs/performance.md, "Snapshot and
 * rollback").  The Python writer only decides, once per batch of chunks, which ids are new to the store
 * (one catalog query) and whether a new memory chunk is stored as a delta.
 *
 * Data lives in a ring mapped twice back to back, so every chunk (at most max_size bytes) is one
 * contiguous range whatever its offset: no copy between reading and sealing.  A chunk's bytes stay in
 * the ring from the commit that brought them until the seal of the batch that took them. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cdc.h"
#include "delta.h"
#include "seal.h"
#include "store.h"

static const unsigned char ROOT_LABEL[24] = "xen-vtpm stream root v2";   /* its NUL is the 24th byte */

/* ---------------------------------------------------------------- id set */

struct xv_idset {
    unsigned char *ids;    /* 32 bytes per member, in insertion order */
    size_t n, cap;
    uint32_t *slot;        /* open addressing: 0 = empty, else member index + 1 */
    size_t nslots;         /* a power of two, kept at least twice n */
};

enum xv_status xv_idset_new(xv_idset **out)
{
    if (!out)
        return XV_EINVAL;
    xv_idset *s = calloc(1, sizeof *s);
    if (!s)
        return XV_ENOMEM;
    s->nslots = 1024;
    s->slot = calloc(s->nslots, sizeof *s->slot);
    if (!s->slot) {
        free(s);
        return XV_ENOMEM;
    }
    *out = s;
    return XV_OK;
}

void xv_idset_free(xv_idset *s)
{
    if (!s)
        return;
    free(s->ids);
    free(s->slot);
    free(s);
}

/* Ids are HMAC outputs: their first bytes are already uniform. */
static size_t id_hash(const unsigned char *id)
{
    uint64_t h;
    memcpy(&h, id, sizeof h);
    return (size_t)h;
}

/* The slot holding id, or the empty slot where it would go. */
static size_t probe(const xv_idset *s, const unsigned char *id)
{
    size_t mask = s->nslots - 1;
    for (size_t pos = id_hash(id) & mask;; pos = (pos + 1) & mask) {
        uint32_t v = s->slot[pos];
        if (!v || memcmp(s->ids + 32 * (size_t)(v - 1), id, 32) == 0)
            return pos;
    }
}

static enum xv_status grow(xv_idset *s)
{
    if (s->n + 1 > s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 1024;
        unsigned char *ids = realloc(s->ids, 32 * cap);
        if (!ids)
            return XV_ENOMEM;
        s->ids = ids;
        s->cap = cap;
    }
    if (2 * (s->n + 1) <= s->nslots)
        return XV_OK;
    if (s->n + 1 >= UINT32_MAX / 2)
        return XV_ENOMEM;
    size_t nslots = 2 * s->nslots;
    uint32_t *slot = calloc(nslots, sizeof *slot);
    if (!slot)
        return XV_ENOMEM;
    free(s->slot);
    s->slot = slot;
    s->nslots = nslots;
    for (size_t i = 0; i < s->n; i++)
        s->slot[probe(s, s->ids + 32 * i)] = (uint32_t)(i + 1);
    return XV_OK;
}

/* 1 if id was a member already, 0 if it was added, -1 without memory. */
static int idset_put(xv_idset *s, const unsigned char *id)
{
    if (s->slot[probe(s, id)])
        return 1;
    if (grow(s) != XV_OK)
        return -1;
    size_t pos = probe(s, id);      /* the table may have been rebuilt */
    memcpy(s->ids + 32 * s->n, id, 32);
    s->slot[pos] = (uint32_t)(++s->n);
    return 0;
}

enum xv_status xv_idset_add(xv_idset *s, const unsigned char *ids, size_t n, size_t *added)
{
    if (!s || (n && !ids) || !added)
        return XV_EINVAL;
    *added = 0;
    for (size_t i = 0; i < n; i++) {
        int r = idset_put(s, ids + 32 * i);
        if (r < 0)
            return XV_ENOMEM;
        *added += r == 0;
    }
    return XV_OK;
}

/* ---------------------------------------------------------------- the pipeline */

enum { J_CUT, J_HASHING, J_HASHED };
enum { HASH_CLAIM = 4 };   /* consecutive chunks one worker hashes together: one per SHA-256 lane */

struct job {
    uint64_t off;
    uint32_t len;
    unsigned char state;
    unsigned char sha[32], id[32];
};

struct task {               /* one chunk of the taken batch: what sealing it gave */
    const unsigned char *in;
    uint32_t len;
    uint64_t offset;        /* stream offset: where a delta looks in the parent */
    int plan;               /* 0: not stored, 1: whole, 2: a delta if worth it */
    const unsigned char *id;
    size_t out;             /* its entry's slot in the arena (room for a whole entry) */
    uint32_t entry;         /* the entry's bytes once sealed */
    int nbases;
    unsigned char bases[16][32];
};

struct worker {
    pthread_t th;
    xv_ingest *g;
    struct xv_sealer sl;
    EVP_MD_CTX *md;
    struct xv_dctx *dctx;
};

enum { MAX_IOV = 1024 };

struct wjob {               /* entries the writer thread writes back to back at fd:off */
    int fd, arena;
    uint64_t off, len;
    struct iovec *iov;
    int niov;
};

struct xv_ingest {
    struct xv_cdc cdc;
    xv_idset *known;
    size_t batch_bytes;

    unsigned char *ring;    /* 2 * rcap bytes of address space, the same pages twice */
    size_t rcap;
    uint64_t head, cut, released;   /* stream offsets: written, cut into chunks, reusable before */
    /* Or the source itself, mapped (xv_ingest_source): no copy, and what is sealed is punched out. */
    const unsigned char *src;
    int src_fd, punch;
    uint64_t punched;
    uint64_t commits;               /* commits so far: a take sees whether input still arrives */
    int final, feeder_waiting;

    struct job *jobs;       /* job seq lives at jobs[seq % jcap] */
    size_t jcap;
    uint64_t jadd, jclaim, jtake;
    size_t outstanding;     /* chunks of the last take not sealed yet: jobs jtake - outstanding ... */

    /* The taken batch's tasks, sealed all at once (on the workers) into the current arena, then
     * written in order, in as many pieces as packs need, by the writer thread. */
    struct task *tasks;
    size_t ntasks, tcap, tclaim, tdone, tnext;   /* tnext: the first task not yet handed to a write */
    int sealed;                                  /* every task of the taken batch is sealed */
    const xv_parent *parent;
    unsigned char *obuf;    /* arena[cur].p while a batch is sealed */

    /* Two arenas: the writer thread writes one's entries to their pack while the next batch is
     * sealed into the other, so the page-cache copy of the write overlaps hashing and sealing. */
    struct arena {
        unsigned char *p;
        size_t cap;
        int pending;        /* write jobs still reading it */
    } arena[2];
    int cur;
    struct wjob wq[4];      /* FIFO of write jobs */
    int wq_head, wq_n, write_errno, writer_running;
    pthread_t writer;
    pthread_cond_t write_cv, wrote_cv;

    EVP_MD_CTX *root;
    uint64_t length, nchunks;
    int ended;

    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv, space_cv;
    int sync_ready, stop, cancelled;
    enum xv_status err;
    struct worker *w, self;  /* self: the deciding thread's contexts */
    int nw, nrunning;
    uint64_t ns[XV_STAGE_COUNT];
};

static void fail_locked(xv_ingest *g, enum xv_status rc)
{
    if (!g->err)
        g->err = rc;
    pthread_cond_broadcast(&g->done_cv);
    pthread_cond_broadcast(&g->space_cv);
    pthread_cond_broadcast(&g->work_cv);
}

static enum xv_status status_locked(const xv_ingest *g)
{
    return g->cancelled ? XV_ECANCELLED : g->err;
}

/* The source is mapped over this much address space (it is only ever read below what was committed,
 * so its size can grow into it): a terabyte of addresses costs nothing until touched. */
#define SRC_MAP ((size_t)1 << 40)

/* Where stream offset off is: in the ring, or in the mapped source. */
static inline const unsigned char *at(const xv_ingest *g, uint64_t off)
{
    return g->src ? g->src + off : g->ring + off % g->rcap;
}

/* A mapped source's pages that everything before `released` is done with go back to the system. */
static void punch_released_locked(xv_ingest *g)
{
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t upto = g->released & ~(uint64_t)(pg - 1);
    if (!g->src || !g->punch || upto <= g->punched)
        return;
    if (fallocate(g->src_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)g->punched,
                  (off_t)(upto - g->punched)) != 0)
        g->punch = 0;       /* a file system without holes keeps its pages: it costs memory, not data */
    g->punched = upto;
}

/* Hashes claimed jobs [first, first + n) outside the lock: SHA-256 in lanes, then each id. */
static enum xv_status hash_jobs(xv_ingest *g, struct worker *w, uint64_t first, size_t n)
{
    const unsigned char *p[HASH_CLAIM];
    size_t len[HASH_CLAIM];
    unsigned char dig[HASH_CLAIM][32];
    struct job *j[HASH_CLAIM];
    for (size_t i = 0; i < n; i++) {
        j[i] = &g->jobs[(first + i) % g->jcap];
        p[i] = at(g, j[i]->off);
        len[i] = j[i]->len;
    }
    enum xv_status rc = xv_sha256_batch_ctx(w->md, n, p, len, -1, dig[0]);
    for (size_t i = 0; i < n && !rc; i++) {
        memcpy(j[i]->sha, dig[i], 32);
        rc = xv_chunk_id(&w->sl, dig[i], j[i]->id);
    }
    return rc;
}

/* Seals one task into its slot: as a delta against the parent when asked and worth it, else whole. */
static enum xv_status seal_task(xv_ingest *g, struct worker *w, struct task *t, uint64_t *delta_ns)
{
    t->nbases = 0;
    if (t->plan == 2 && g->parent) {
        uint64_t t0 = xv_thread_ns();
        unsigned char *payload = NULL;
        size_t plen = 0;
        enum xv_status rc = xv_delta_encode(w->dctx, g->parent, t->in, t->len, t->offset, &payload, &plen,
                                            t->bases, &t->nbases);
        *delta_ns += xv_thread_ns() - t0;
        if (rc)
            return rc;
        if (plen) {
            rc = xv_seal_entry(&w->sl, t->id, 1, payload, (uint32_t)plen, g->obuf + t->out);
            free(payload);
            t->entry = XV_ENTRY_HEAD + (uint32_t)plen + XV_TAG_SIZE;
            return rc;
        }
        t->nbases = 0;
    }
    t->entry = XV_ENTRY_HEAD + t->len + XV_TAG_SIZE;
    return xv_seal_entry(&w->sl, t->id, 0, t->in, t->len, g->obuf + t->out);
}

/* Runs one unit of work (a seal task first: the deciding thread waits on it), with mu held on entry
 * and exit.  0 when there was nothing to do. */
static int work_one_locked(xv_ingest *g, struct worker *w)
{
    while (g->tclaim < g->ntasks && !g->tasks[g->tclaim].plan) {
        g->tclaim++;
        g->tdone++;
    }
    if (g->tdone == g->ntasks && g->ntasks)
        pthread_cond_broadcast(&g->done_cv);
    if (g->tclaim < g->ntasks) {
        struct task *t = &g->tasks[g->tclaim++];
        pthread_mutex_unlock(&g->mu);
        uint64_t t0 = xv_thread_ns(), delta_ns = 0;
        enum xv_status rc = seal_task(g, w, t, &delta_ns);
        uint64_t dt = xv_thread_ns() - t0;
        pthread_mutex_lock(&g->mu);
        g->ns[XV_STAGE_SEAL] += dt - delta_ns;
        g->ns[XV_STAGE_DELTA] += delta_ns;
        if (rc)
            fail_locked(g, rc);
        if (++g->tdone == g->ntasks)
            pthread_cond_broadcast(&g->done_cv);
        return 1;
    }
    if (g->jclaim < g->jadd) {
        uint64_t first = g->jclaim;
        size_t n = 0;
        while (n < HASH_CLAIM && g->jclaim < g->jadd) {
            g->jobs[g->jclaim++ % g->jcap].state = J_HASHING;
            n++;
        }
        pthread_mutex_unlock(&g->mu);
        uint64_t t0 = xv_thread_ns();
        enum xv_status rc = hash_jobs(g, w, first, n);
        uint64_t dt = xv_thread_ns() - t0;
        pthread_mutex_lock(&g->mu);
        g->ns[XV_STAGE_HASH] += dt;
        if (rc)
            fail_locked(g, rc);
        for (size_t i = 0; i < n; i++)
            g->jobs[(first + i) % g->jcap].state = J_HASHED;
        pthread_cond_broadcast(&g->done_cv);
        return 1;
    }
    return 0;
}

static int write_iov(int fd, struct iovec *iov, int n, uint64_t off);

static void *writer_main(void *arg)
{
    xv_ingest *g = arg;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        if (!g->wq_n) {
            if (g->stop)
                break;
            pthread_cond_wait(&g->write_cv, &g->mu);
            continue;
        }
        struct wjob job = g->wq[g->wq_head];
        pthread_mutex_unlock(&g->mu);
        uint64_t t0 = xv_thread_ns();
        int e = g->write_errno ? 0 : write_iov(job.fd, job.iov, job.niov, job.off);
        /* Start the write-back now, so the pack's fsync has little left to wait for.  Only a hint: a
         * file system without it loses nothing but the head start. */
        if (!e)
            sync_file_range(job.fd, (off_t)job.off, (off_t)job.len, SYNC_FILE_RANGE_WRITE);
        uint64_t dt = xv_thread_ns() - t0;
        free(job.iov);
        pthread_mutex_lock(&g->mu);
        g->ns[XV_STAGE_WRITE] += dt;
        if (e && !g->write_errno)
            g->write_errno = e;
        g->arena[job.arena].pending--;
        g->wq_head = (g->wq_head + 1) % 4;
        g->wq_n--;
        pthread_cond_broadcast(&g->wrote_cv);
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    xv_ingest *g = w->g;
    pthread_mutex_lock(&g->mu);
    while (!g->stop) {
        if (g->cancelled || g->err || !work_one_locked(g, w))
            pthread_cond_wait(&g->work_cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

static enum xv_status worker_init(struct worker *w, xv_ingest *g, const unsigned char *id_key,
                                  const unsigned char *enc_key)
{
    w->g = g;
    if (!(w->md = EVP_MD_CTX_new()))
        return XV_ENOMEM;
    enum xv_status rc = xv_sealer_init(&w->sl, id_key, enc_key);
    return rc ? rc : xv_dctx_new(&w->sl, &w->dctx);
}

static void worker_free(struct worker *w)
{
    xv_dctx_free(w->dctx);
    w->dctx = NULL;
    xv_sealer_free(&w->sl);
    EVP_MD_CTX_free(w->md);
    w->md = NULL;
}

void xv_ingest_free(xv_ingest *g)
{
    if (!g)
        return;
    if (g->sync_ready) {
        pthread_mutex_lock(&g->mu);
        g->stop = 1;
        pthread_cond_broadcast(&g->work_cv);
        pthread_cond_broadcast(&g->write_cv);
        pthread_mutex_unlock(&g->mu);
        for (int i = 0; i < g->nrunning; i++)
            pthread_join(g->w[i].th, NULL);
        if (g->writer_running)
            pthread_join(g->writer, NULL);   /* after the writes it was given: their fds are still open */
        pthread_mutex_destroy(&g->mu);
        pthread_cond_t *cv[5] = {&g->work_cv, &g->done_cv, &g->space_cv, &g->write_cv, &g->wrote_cv};
        for (int i = 0; i < 5; i++)
            pthread_cond_destroy(cv[i]);
    }
    for (int i = 0; i < g->nw; i++)
        worker_free(&g->w[i]);
    worker_free(&g->self);
    free(g->w);
    if (g->ring)
        munmap(g->ring, 2 * g->rcap);
    if (g->src)
        munmap((void *)g->src, SRC_MAP);
    free(g->jobs);
    free(g->tasks);
    for (int k = 0; k < 2; k++)
        if (g->arena[k].p)
            munmap(g->arena[k].p, g->arena[k].cap);
    EVP_MD_CTX_free(g->root);
    free(g);
}

/* The same rcap bytes of shared anonymous memory at ring and at ring + rcap: mremap with an old size
 * of 0 maps a shared mapping's pages a second time.  (A memfd would do too, but its size counts
 * against RLIMIT_FSIZE, and a full disk must not look like a failed allocation.) */
static enum xv_status map_ring(xv_ingest *g)
{
    void *base = mmap(NULL, 2 * g->rcap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return XV_ENOMEM;
    g->ring = base;
    if (mmap(g->ring, g->rcap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED ||
        mremap(g->ring, 0, g->rcap, MREMAP_MAYMOVE | MREMAP_FIXED, g->ring + g->rcap) == MAP_FAILED)
        return XV_ENOMEM;
    return XV_OK;
}

static enum xv_status sync_init(xv_ingest *g)
{
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr))
        return XV_ENOMEM;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);   /* take's timed wait ignores clock changes */
    if (pthread_mutex_init(&g->mu, NULL)) {
        pthread_condattr_destroy(&attr);
        return XV_ENOMEM;
    }
    pthread_cond_t *cv[5] = {&g->work_cv, &g->done_cv, &g->space_cv, &g->write_cv, &g->wrote_cv};
    for (int i = 0; i < 5; i++)
        if (pthread_cond_init(cv[i], &attr)) {
            while (i--)
                pthread_cond_destroy(cv[i]);
            pthread_mutex_destroy(&g->mu);
            pthread_condattr_destroy(&attr);
            return XV_ENOMEM;
        }
    pthread_condattr_destroy(&attr);
    g->sync_ready = 1;
    return XV_OK;
}

enum xv_status xv_ingest_new(uint32_t min_size, uint32_t avg_size, uint32_t max_size, const unsigned char id_key[32],
                             const unsigned char enc_key[32], xv_idset *known, const xv_parent *parent, int nworkers,
                             size_t ring_bytes, size_t batch_bytes, xv_ingest **out)
{
    if (!out || !id_key || !enc_key || !known || nworkers < 0 || nworkers > 1024 || !batch_bytes)
        return XV_EINVAL;
    *out = NULL;
    struct xv_cdc cdc;
    enum xv_status rc = xv_cdc_init(&cdc, min_size, avg_size, max_size);
    const EVP_MD *md;
    if (rc || (rc = xv_sha256_md(&md)))
        return rc;
    long pg = sysconf(_SC_PAGESIZE);
    /* Room for a batch being sealed, the next one being hashed and the lookahead of a cut. */
    size_t need = 2 * batch_bytes + 4 * (size_t)max_size + ((size_t)1 << 20);
    if (ring_bytes < need)
        ring_bytes = need;
    ring_bytes = (ring_bytes + (size_t)pg - 1) & ~((size_t)pg - 1);

    xv_ingest *g = calloc(1, sizeof *g);
    if (!g)
        return XV_ENOMEM;
    g->cdc = cdc;
    g->known = known;
    g->parent = parent;
    g->batch_bytes = batch_bytes;
    g->rcap = ring_bytes;
    g->jcap = ring_bytes / min_size + 8;    /* every live chunk but the last is at least min bytes */
    g->jobs = calloc(g->jcap, sizeof *g->jobs);
    g->root = EVP_MD_CTX_new();
    rc = g->jobs && g->root ? XV_OK : XV_ENOMEM;
    if (!rc)
        rc = EVP_DigestInit_ex(g->root, md, NULL) == 1 && EVP_DigestUpdate(g->root, ROOT_LABEL, sizeof ROOT_LABEL) == 1
                 ? XV_OK : XV_ECRYPTO;
    if (!rc)
        rc = map_ring(g);
    if (!rc)
        rc = worker_init(&g->self, g, id_key, enc_key);
    if (!rc && nworkers && !(g->w = calloc((size_t)nworkers, sizeof *g->w)))
        rc = XV_ENOMEM;
    for (; !rc && g->nw < nworkers; g->nw++)
        rc = worker_init(&g->w[g->nw], g, id_key, enc_key);
    if (!rc)
        rc = sync_init(g);
    if (!rc) {
        if (pthread_create(&g->writer, NULL, writer_main, g))
            rc = XV_ENOMEM;
        else
            g->writer_running = 1;
    }
    /* A worker that cannot start only costs speed: the deciding thread does its share. */
    for (int i = 0; !rc && i < g->nw; i++)
        if (pthread_create(&g->w[g->nrunning].th, NULL, worker_main, &g->w[g->nrunning]) == 0)
            g->nrunning++;
    if (rc) {
        xv_ingest_free(g);
        return rc;
    }
    *out = g;
    return XV_OK;
}

enum xv_status xv_ingest_source(xv_ingest *g, int fd, int punch)
{
    if (!g || fd < 0)
        return XV_EINVAL;
    pthread_mutex_lock(&g->mu);
    enum xv_status rc = g->head || g->src ? XV_ESTATE : XV_OK;
    if (!rc) {
        void *p = mmap(NULL, SRC_MAP, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (p == MAP_FAILED) {
            rc = XV_ENOMEM;
        } else {
            g->src = p;
            g->src_fd = fd;
            g->punch = punch;
        }
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

enum xv_status xv_ingest_space(xv_ingest *g, size_t want, unsigned char **buf, size_t *got)
{
    if (!g || !buf || !got)
        return XV_EINVAL;
    *buf = NULL;
    *got = 0;
    pthread_mutex_lock(&g->mu);
    enum xv_status rc = g->final ? XV_ESTATE : XV_OK;
    if (!rc && g->src)
        rc = XV_ESTATE;   /* a mapped source is not fed */
    while (!rc && !(rc = status_locked(g)) && g->head - g->released == g->rcap) {
        g->feeder_waiting = 1;
        pthread_cond_broadcast(&g->done_cv);   /* a take waiting for a full batch may go with less */
        pthread_cond_wait(&g->space_cv, &g->mu);
        g->feeder_waiting = 0;
    }
    if (!rc) {
        size_t room = g->rcap - (size_t)(g->head - g->released);
        *got = want && want < room ? want : room;
        *buf = g->ring + g->head % g->rcap;
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

enum { CUT_BATCH = 64 };

enum xv_status xv_ingest_commit(xv_ingest *g, size_t n, int final)
{
    if (!g)
        return XV_EINVAL;
    pthread_mutex_lock(&g->mu);
    enum xv_status rc = g->final ? XV_ESTATE : status_locked(g);
    if (!rc && !g->src && n > g->rcap - (size_t)(g->head - g->released))
        rc = XV_EINVAL;
    if (!rc && g->src && g->head + n > SRC_MAP)
        rc = XV_ENOMEM;
    if (rc) {
        pthread_mutex_unlock(&g->mu);
        return rc;
    }
    g->head += n;
    g->commits++;
    uint64_t head = g->head, cut = g->cut;

    /* Only this thread moves cut and writes the bytes past it: the scan needs no lock.  A cut is
     * decided once max bytes are there (or at the end), so it never depends on how input was split. */
    for (;;) {
        /* The job slots from jtake - outstanding on hold the taken batch (its seal reads their ids and
         * offsets) and the chunks not taken yet.  A ring bounds them by its bytes; a mapped source may
         * hold far more, so every cut, a commit's first included, waits for free slots (the deciding
         * thread may take a short batch meanwhile). */
        while (!status_locked(g) && g->jadd - (g->jtake - g->outstanding) + CUT_BATCH > g->jcap) {
            g->feeder_waiting = 1;
            pthread_cond_broadcast(&g->done_cv);
            pthread_cond_wait(&g->space_cv, &g->mu);
            g->feeder_waiting = 0;
        }
        rc = status_locked(g);
        pthread_mutex_unlock(&g->mu);
        if (rc)
            return rc;
        uint64_t off[CUT_BATCH];
        uint32_t len[CUT_BATCH];
        size_t k = 0;
        uint64_t t0 = xv_thread_ns();
        while (k < CUT_BATCH && cut < head && (head - cut >= g->cdc.max || final)) {
            size_t l = xv_cdc_cut(&g->cdc, at(g, cut), (size_t)(head - cut));
            off[k] = cut;
            len[k++] = (uint32_t)l;
            cut += l;
        }
        uint64_t dt = xv_thread_ns() - t0;
        pthread_mutex_lock(&g->mu);
        g->ns[XV_STAGE_CHUNK] += dt;
        for (size_t i = 0; i < k; i++) {
            struct job *j = &g->jobs[g->jadd++ % g->jcap];
            j->off = off[i];
            j->len = len[i];
            j->state = J_CUT;
        }
        g->cut = cut;
        if (k)
            pthread_cond_broadcast(&g->work_cv);
        if (k < CUT_BATCH) {
            g->final = final;
            pthread_cond_broadcast(&g->done_cv);
            pthread_mutex_unlock(&g->mu);
            return XV_OK;
        }
    }
}

/* Consecutive hashed chunks from jtake: how many and their bytes (stops at max chunks or a batch's
 * bytes: a batch is sealed whole into an arena, so its size bounds the pipeline's memory). */
static size_t ready_locked(const xv_ingest *g, size_t max, uint64_t *bytes)
{
    size_t k = 0;
    *bytes = 0;
    for (uint64_t s = g->jtake; s < g->jadd && k < max && *bytes < g->batch_bytes; s++, k++) {
        const struct job *j = &g->jobs[s % g->jcap];
        if (j->state != J_HASHED)
            break;
        *bytes += j->len;
    }
    return k;
}

enum { STALL_NS = 20 * 1000 * 1000 };

static const struct timespec *deadline(long ns)
{
    static __thread struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += ns;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    return &ts;
}

enum xv_status xv_ingest_take(xv_ingest *g, xv_ichunk *out, size_t max, unsigned char *entries, size_t *n)
{
    if (!g || !out || !max || !entries || !n)
        return XV_EINVAL;
    *n = 0;
    pthread_mutex_lock(&g->mu);
    enum xv_status rc = g->outstanding ? XV_ESTATE : XV_OK;
    size_t k = 0;
    for (; !rc && !(rc = status_locked(g));) {
        uint64_t bytes, commits = g->commits;
        k = ready_locked(g, max, &bytes);
        int all_cut = g->final && g->cut == g->head;
        if (k == max || bytes >= g->batch_bytes || (k && g->feeder_waiting) ||
            (all_cut && g->jtake + k == g->jadd))
            break;
        if (work_one_locked(g, &g->self))
            continue;
        /* Input that stalls (a writer waiting on its source) must not hold back what already came:
         * with nothing left to hash and no commit for a while, a shorter batch goes. */
        if (pthread_cond_timedwait(&g->done_cv, &g->mu, deadline(STALL_NS)) == ETIMEDOUT && k &&
            commits == g->commits && g->jtake + k == g->jclaim)
            break;
    }
    if (rc) {
        pthread_mutex_unlock(&g->mu);
        return rc;
    }
    /* In stream order: whether the write has the id already, the manifest entry, the root. */
    for (size_t i = 0; i < k; i++) {
        struct job *j = &g->jobs[(g->jtake + i) % g->jcap];
        /* the parent's chunks are in the store for certain: no need to keep their ids twice */
        int had = g->parent && xv_parent_has(g->parent, j->id) ? 1 : idset_put(g->known, j->id);
        if (had < 0) {
            rc = XV_ENOMEM;
            break;
        }
        xv_ichunk *c = &out[i];
        c->offset = j->off;
        c->data = at(g, j->off);
        c->length = j->len;
        c->flags = had ? XV_CHUNK_KNOWN : 0;
        memcpy(c->id, j->id, 32);
        unsigned char *e = entries + 36 * i, le[4];
        memcpy(e, j->id, 32);
        for (int b = 0; b < 4; b++)
            le[b] = e[32 + b] = (unsigned char)(j->len >> (8 * b));
        if (EVP_DigestUpdate(g->root, j->sha, 32) != 1 || EVP_DigestUpdate(g->root, le, 4) != 1) {
            rc = XV_ECRYPTO;
            break;
        }
        g->length += j->len;
    }
    if (rc) {
        fail_locked(g, rc);
    } else {
        g->jtake += k;
        g->nchunks += k;
        g->outstanding = k;
        g->ended = k == 0;
        *n = k;
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

/* The taken batch's tasks, laid out in the current arena (each with room for its whole entry). */
static enum xv_status plan_tasks_locked(xv_ingest *g, size_t n, const unsigned char *seal)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (seal[i] > 2)
            return XV_EINVAL;
        if (seal[i])
            bytes += XV_ENTRY_HEAD + (size_t)g->jobs[(g->jtake - n + i) % g->jcap].len + XV_TAG_SIZE;
    }
    if (n > g->tcap) {
        struct task *t = realloc(g->tasks, n * sizeof *t);
        if (!t)
            return XV_ENOMEM;
        g->tasks = t;
        g->tcap = n;
    }
    struct arena *a = &g->arena[g->cur];
    if (bytes > a->cap) {
        /* Mapped, not malloc'd: a few MiB freed and taken again would otherwise grow a thread's
         * malloc arena, and its pages stay resident after free. */
        if (a->p)
            munmap(a->p, a->cap);
        a->cap = 0;
        size_t cap = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
        void *p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            a->p = NULL;
            return XV_ENOMEM;
        }
        a->p = p;
        a->cap = cap;
    }
    g->obuf = a->p;
    size_t slot = 0;
    for (size_t i = 0; i < n; i++) {
        struct job *j = &g->jobs[(g->jtake - n + i) % g->jcap];
        struct task *t = &g->tasks[i];
        t->plan = seal[i];
        t->in = at(g, j->off);
        t->len = j->len;
        t->offset = j->off;
        t->id = j->id;
        t->out = slot;
        t->entry = 0;
        t->nbases = 0;
        if (seal[i])
            slot += XV_ENTRY_HEAD + (size_t)j->len + XV_TAG_SIZE;
    }
    g->ntasks = n;
    g->tclaim = g->tdone = g->tnext = 0;
    return XV_OK;
}

static int write_iov(int fd, struct iovec *iov, int n, uint64_t off)
{
    while (n) {
        ssize_t w = pwritev(fd, iov, n < IOV_MAX ? n : IOV_MAX, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? errno : EIO;
        off += (uint64_t)w;
        while (n && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

enum xv_status xv_ingest_seal(xv_ingest *g, size_t n, const unsigned char *seal, int fd,
                              uint64_t offset, uint64_t limit, uint64_t *entry_offset, uint32_t *sealed_len,
                              unsigned char *nbases, unsigned char (*base_ids)[32], uint64_t *written,
                              size_t *done, int *err_errno)
{
    if (!g || (n && (!seal || !entry_offset || !sealed_len || !nbases || !base_ids)) || !written || !done)
        return XV_EINVAL;
    *written = 0;
    *done = 0;
    pthread_mutex_lock(&g->mu);
    enum xv_status rc = status_locked(g);
    if (!rc && g->sealed ? n != g->ntasks - g->tnext : n != g->outstanding)
        rc = XV_ESTATE;
    if (!rc && !g->sealed) {
        /* The first call for a batch seals all of it; later ones write what the first did not. */
        while (g->arena[g->cur].pending && !g->write_errno)
            pthread_cond_wait(&g->wrote_cv, &g->mu);
        if (g->write_errno) {
            if (err_errno)
                *err_errno = g->write_errno;
            rc = XV_EIO;
        }
        if (!rc)
            rc = plan_tasks_locked(g, n, seal);
        if (!rc) {
            pthread_cond_broadcast(&g->work_cv);
            while (g->tdone < g->ntasks && !g->err && !g->cancelled)
                if (!work_one_locked(g, &g->self))
                    pthread_cond_wait(&g->done_cv, &g->mu);
            rc = status_locked(g);
        }
        if (!rc) {   /* the entries are sealed: the ring space of the whole batch is free again */
            g->sealed = 1;
            if (n) {
                const struct job *last = &g->jobs[(g->jtake - 1) % g->jcap];
                g->released = last->off + last->len;
            }
            punch_released_locked(g);
            pthread_cond_broadcast(&g->space_cv);
        }
    }
    /* Entries in order up to the one that takes the pack to `limit`. */
    size_t k = 0, niov = 0;
    uint64_t bytes = 0;
    struct iovec *iov = NULL;
    if (!rc && n && !(iov = malloc(sizeof *iov * n)))
        rc = XV_ENOMEM;
    for (; !rc && k < n && bytes < limit; k++) {
        struct task *t = &g->tasks[g->tnext + k];
        if (!t->plan)
            continue;
        entry_offset[k] = offset + bytes;
        sealed_len[k] = t->entry - XV_ENTRY_HEAD;
        nbases[k] = (unsigned char)t->nbases;
        memcpy(base_ids[16 * k], t->bases, 32 * (size_t)t->nbases);
        iov[niov].iov_base = g->obuf + t->out;
        iov[niov++].iov_len = t->entry;
        bytes += t->entry;
    }
    while (!rc && k < n && !g->tasks[g->tnext + k].plan)   /* skipped chunks need no pack */
        k++;
    if (!rc && niov) {
        while (g->wq_n == 4 && !g->write_errno)
            pthread_cond_wait(&g->wrote_cv, &g->mu);
        struct wjob *job = &g->wq[(g->wq_head + g->wq_n) % 4];
        *job = (struct wjob){fd, g->cur, offset, bytes, iov, (int)niov};
        iov = NULL;
        g->wq_n++;
        g->arena[g->cur].pending++;
        pthread_cond_signal(&g->write_cv);
    }
    free(iov);
    if (!rc) {
        *written = bytes;
        *done = k;
        g->tnext += k;
        g->outstanding -= k;
        pthread_cond_broadcast(&g->space_cv);   /* their job slots are free for the cutter */
        if (!g->outstanding) {   /* the batch is handed over: the next one seals into the other arena */
            g->sealed = 0;
            g->cur ^= 1;
        }
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

enum xv_status xv_ingest_flush(xv_ingest *g, int *err_errno)
{
    if (!g)
        return XV_EINVAL;
    pthread_mutex_lock(&g->mu);
    while (g->wq_n && !g->write_errno)
        pthread_cond_wait(&g->wrote_cv, &g->mu);
    int e = g->write_errno;
    pthread_mutex_unlock(&g->mu);
    if (e && err_errno)
        *err_errno = e;
    return e ? XV_EIO : XV_OK;
}

enum xv_status xv_ingest_result(const xv_ingest *g, unsigned char root[32], uint64_t *length, uint64_t *chunks)
{
    if (!g || !root || !length || !chunks)
        return XV_EINVAL;
    if (!g->ended)
        return XV_ESTATE;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (!c)
        return XV_ENOMEM;
    int ok = EVP_MD_CTX_copy_ex(c, g->root) == 1 && EVP_DigestFinal_ex(c, root, NULL) == 1;
    EVP_MD_CTX_free(c);
    *length = g->length;
    *chunks = g->nchunks;
    return ok ? XV_OK : XV_ECRYPTO;
}

enum xv_status xv_ingest_cancel(xv_ingest *g)
{
    if (!g)
        return XV_EINVAL;
    pthread_mutex_lock(&g->mu);
    g->cancelled = 1;
    pthread_cond_broadcast(&g->done_cv);
    pthread_cond_broadcast(&g->space_cv);
    pthread_cond_broadcast(&g->work_cv);
    pthread_mutex_unlock(&g->mu);
    return XV_OK;
}

enum xv_status xv_ingest_stats(const xv_ingest *g, uint64_t ns[XV_STAGE_COUNT])
{
    if (!g || !ns)
        return XV_EINVAL;
    pthread_mutex_lock((pthread_mutex_t *)&g->mu);
    memcpy(ns, g->ns, sizeof g->ns);
    pthread_mutex_unlock((pthread_mutex_t *)&g->mu);
    return XV_OK;
}
