/* Delta chunks (docs/formats.md, "Checkpoint store" §0): a new memory chunk stored as copies from the
 * full chunks of its parent checkpoint plus the bytes that differ.  This is xen_vtpm/store/delta.py's
 * DeltaEncoder.encode in C, run by the ingest pipeline's workers next to the sealing: the same
 * comparison (4 KiB pages, then 256-byte blocks, each differing run's ends trimmed to 64 bytes), the
 * same segments, at most 16 bases, kept only at half the chunk or less and only once rebuilt equal. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "delta.h"

enum { COARSE = 4096, BLOCK = 256, FINE = 64, MAX_BASES = 16, KEEP = 8 };
enum { COPY = 0, LITERAL = 1 };

/* ---------------------------------------------------------------- the parent */

struct place;
static const struct place *find_place(const xv_parent *p, const unsigned char *id);

struct place {
    unsigned char id[32];
    int fd;
    uint64_t entry_offset;
    uint32_t sealed_len, plain_len;
    int delta;
};

struct xv_parent {
    size_t n;
    unsigned char *ids;      /* 32 bytes per chunk, stream order */
    uint64_t *starts;        /* n + 1 cumulative offsets */
    struct place *places;    /* sorted by id once ready */
    size_t nplaces, cap;
    int sorted;
};

enum xv_status xv_parent_new(const unsigned char *entries, size_t n, xv_parent **out)
{
    if (!out || (n && !entries))
        return XV_EINVAL;
    *out = NULL;
    xv_parent *p = calloc(1, sizeof *p);
    if (!p)
        return XV_ENOMEM;
    p->n = n;
    p->ids = malloc(32 * (n ? n : 1));
    p->starts = malloc(sizeof *p->starts * (n + 1));
    if (!p->ids || !p->starts) {
        xv_parent_free(p);
        return XV_ENOMEM;
    }
    p->starts[0] = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *e = entries + 36 * i;
        memcpy(p->ids + 32 * i, e, 32);
        uint32_t len = (uint32_t)e[32] | (uint32_t)e[33] << 8 | (uint32_t)e[34] << 16 | (uint32_t)e[35] << 24;
        p->starts[i + 1] = p->starts[i] + len;
    }
    *out = p;
    return XV_OK;
}

void xv_parent_free(xv_parent *p)
{
    if (!p)
        return;
    free(p->ids);
    free(p->starts);
    free(p->places);
    free(p);
}

enum xv_status xv_parent_places(xv_parent *p, const xv_rplace *places, const unsigned char *is_delta, size_t n)
{
    if (!p || (n && (!places || !is_delta)) || p->sorted)
        return p && p->sorted ? XV_ESTATE : XV_EINVAL;
    if (p->nplaces + n > p->cap) {
        size_t cap = p->cap ? p->cap : 1024;
        while (cap < p->nplaces + n)
            cap *= 2;
        struct place *q = realloc(p->places, cap * sizeof *q);
        if (!q)
            return XV_ENOMEM;
        p->places = q;
        p->cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        struct place *d = &p->places[p->nplaces++];
        memcpy(d->id, places[i].id, 32);
        d->fd = places[i].fd;
        d->entry_offset = places[i].entry_offset;
        d->sealed_len = places[i].sealed_len;
        d->plain_len = places[i].plain_len;
        d->delta = is_delta[i] != 0;
    }
    return XV_OK;
}

static int by_id(const void *a, const void *b)
{
    return memcmp(((const struct place *)a)->id, ((const struct place *)b)->id, 32);
}

enum xv_status xv_parent_ready(xv_parent *p)
{
    if (!p)
        return XV_EINVAL;
    if (!p->sorted && p->nplaces)
        qsort(p->places, p->nplaces, sizeof *p->places, by_id);
    p->sorted = 1;
    return XV_OK;
}

int xv_parent_has(const xv_parent *p, const unsigned char *id)
{
    return p->sorted && find_place(p, id) != NULL;
}

static const struct place *find_place(const xv_parent *p, const unsigned char *id)
{
    size_t lo = 0, hi = p->nplaces;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = memcmp(p->places[mid].id, id, 32);
        if (!c)
            return &p->places[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---------------------------------------------------------------- opened parent chunks, per worker */

struct mseg {               /* a parent delta's segment in its own coordinates */
    uint32_t start, len;
    int base;               /* index in the entry's bases, -1 for a literal */
    uint32_t boff;
};

struct entry {
    unsigned char id[32];
    unsigned char *plain;
    uint32_t len;
    int full;               /* 1: a full chunk; 0: a delta, with its segments and bases */
    struct mseg *seg;
    size_t nseg;
    int nbases;
    unsigned char bid[MAX_BASES][32];   /* its bases' ids: looked up again when used, as a cache
                                         * entry may be evicted between calls */
    uint64_t gen, used;   /* gen: the call that last touched it (pinned during that call) */
};

struct xv_dctx {
    struct xv_sealer *sl;
    struct entry *e;
    size_t n, cap;
    uint64_t gen, clock;
    unsigned char *rd, *tmp;
    size_t rdcap, tmpcap;
};

enum xv_status xv_dctx_new(struct xv_sealer *sl, struct xv_dctx **out)
{
    struct xv_dctx *c = calloc(1, sizeof *c);
    if (!c)
        return XV_ENOMEM;
    c->sl = sl;
    *out = c;
    return XV_OK;
}

static void entry_clear(struct entry *e)
{
    free(e->plain);
    free(e->seg);
    memset(e, 0, sizeof *e);
}

void xv_dctx_free(struct xv_dctx *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n; i++)
        entry_clear(&c->e[i]);
    free(c->e);
    free(c->rd);
    free(c->tmp);
    free(c);
}

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

/* Reads and opens the entry a place names into *plain (malloc'd, sealed_len - 16 bytes). */
static enum xv_status open_place(struct xv_dctx *c, const struct place *pl, unsigned char **plain)
{
    if (pl->sealed_len < XV_TAG_SIZE)
        return XV_EFORMAT;
    size_t want = XV_ENTRY_HEAD + (size_t)pl->sealed_len, got = 0;
    if (!grow(&c->rd, &c->rdcap, want))
        return XV_ENOMEM;
    while (got < want) {
        ssize_t k = pread(pl->fd, c->rd + got, want - got, (off_t)(pl->entry_offset + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? XV_EIO : XV_EFORMAT;
        got += (size_t)k;
    }
    if (memcmp(c->rd, pl->id, 32) != 0 || le32(c->rd + XV_ID_SIZE + XV_NONCE_SIZE) != pl->sealed_len)
        return XV_EFORMAT;
    unsigned char *out = malloc(pl->sealed_len - XV_TAG_SIZE + 1);
    if (!out)
        return XV_ENOMEM;
    enum xv_status rc = xv_open_sealed(c->sl, pl->id, pl->delta, c->rd + XV_ID_SIZE, c->rd + XV_ENTRY_HEAD,
                                       pl->sealed_len, out);
    if (rc) {
        free(out);
        return rc;
    }
    *plain = out;
    return XV_OK;
}

static int slot_for(struct xv_dctx *c)
{
    /* An entry touched in this call is pinned; beyond KEEP entries the least recently used other goes. */
    if (c->n >= KEEP) {
        size_t victim = c->n;
        for (size_t i = 0; i < c->n; i++)
            if (c->e[i].gen != c->gen && (victim == c->n || c->e[i].used < c->e[victim].used))
                victim = i;
        if (victim < c->n) {
            entry_clear(&c->e[victim]);
            return (int)victim;
        }
    }
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 16;
        struct entry *q = realloc(c->e, cap * sizeof *q);
        if (!q)
            return -1;
        c->e = q;
        c->cap = cap;
    }
    memset(&c->e[c->n], 0, sizeof c->e[c->n]);
    return (int)c->n++;
}

/* Linear: the cache holds a few entries. */
static int lookup(struct xv_dctx *c, const unsigned char *id)
{
    for (size_t i = 0; i < c->n; i++)
        if (c->e[i].plain && memcmp(c->e[i].id, id, 32) == 0) {
            c->e[i].gen = c->gen;
            c->e[i].used = ++c->clock;
            return (int)i;
        }
    return -1;
}

/* Cache index of the opened chunk id (a base when want_full), or -1 when it cannot serve (unknown
 * place, a damaged entry: the chunk is then stored whole; verify reports the damage). */
static int open_chunk(struct xv_dctx *c, const xv_parent *P, const unsigned char *id, int want_full)
{
    int hit = lookup(c, id);
    if (hit >= 0)
        return want_full && !c->e[hit].full ? -1 : hit;
    const struct place *pl = find_place(P, id);
    if (!pl || (want_full && pl->delta))
        return -1;
    unsigned char *plain;
    if (open_place(c, pl, &plain))
        return -1;
    if (!pl->delta) {
        if (pl->sealed_len - XV_TAG_SIZE != pl->plain_len) {
            free(plain);
            return -1;
        }
        int s = slot_for(c);
        if (s < 0) {
            free(plain);
            return -1;
        }
        struct entry *e = &c->e[s];
        memcpy(e->id, id, 32);
        e->plain = plain;
        e->len = pl->plain_len;
        e->full = 1;
        e->gen = c->gen;
        e->used = ++c->clock;
        return s;
    }
    /* A parent delta: decode its payload (every bound checked), open its bases, assemble it. */
    size_t n = pl->sealed_len - XV_TAG_SIZE;
    const unsigned char *p = plain;
    int rc = -1, nb = 0, bidx[MAX_BASES];
    struct mseg *seg = NULL;
    unsigned char *out = NULL;
    size_t nseg = 0, pos = 3;
    if (n < 3 || p[0] != 1)
        goto done;
    nb = (int)(p[1] | p[2] << 8);
    if (nb < 1 || nb > MAX_BASES || pos + 32 * (size_t)nb + 4 > n)
        goto done;
    for (int i = 0; i < nb; i++) {
        for (int k = 0; k < i; k++)
            if (memcmp(p + pos + 32 * i, p + pos + 32 * k, 32) == 0)
                goto done;
        if ((bidx[i] = open_chunk(c, P, p + pos + 32 * i, 1)) < 0)
            goto done;
    }
    pos += 32 * (size_t)nb;
    uint32_t count = le32(p + pos), total = 0;
    pos += 4;
    if (count > pl->plain_len || !(seg = malloc(sizeof *seg * (count ? count : 1))) ||
        !(out = malloc(pl->plain_len ? pl->plain_len : 1)))
        goto done;
    for (uint32_t s = 0; s < count; s++) {
        if (pos + 5 > n)
            goto done;
        unsigned kind = p[pos];
        uint32_t len = le32(p + pos + 1);
        pos += 5;
        if (kind > 1 || !len || len > pl->plain_len - total)
            goto done;
        struct mseg *m = &seg[nseg++];
        m->start = total;
        m->len = len;
        if (kind == COPY) {
            if (pos + 6 > n)
                goto done;
            int index = p[pos] | p[pos + 1] << 8;
            uint32_t off = le32(p + pos + 2);
            pos += 6;
            if (index >= nb || (uint64_t)off + len > c->e[bidx[index]].len)
                goto done;
            memcpy(out + total, c->e[bidx[index]].plain + off, len);
            m->base = index;
            m->boff = off;
        } else {
            if (len > n - pos)
                goto done;
            memcpy(out + total, p + pos, len);
            m->base = -1;
            m->boff = 0;
            pos += len;
        }
        total += len;
    }
    if (pos != n || total != pl->plain_len)
        goto done;
    int s = slot_for(c);
    if (s < 0)
        goto done;
    struct entry *e = &c->e[s];
    memcpy(e->id, id, 32);
    e->plain = out;
    e->len = total;
    e->full = 0;
    e->seg = seg;
    e->nseg = nseg;
    e->nbases = nb;
    for (int i = 0; i < nb; i++)
        memcpy(e->bid[i], p + 3 + 32 * i, 32);
    e->gen = c->gen;
    e->used = ++c->clock;
    out = NULL;
    seg = NULL;
    rc = s;
done:
    free(plain);
    free(out);
    free(seg);
    return rc;
}

/* ---------------------------------------------------------------- comparing */

struct run {
    uint32_t a, b;
};

struct runs {
    struct run *r;
    size_t n, cap;
};

static int run_push(struct runs *R, uint32_t a, uint32_t b, int join)
{
    if (join && R->n && R->r[R->n - 1].b == a) {
        R->r[R->n - 1].b = b;
        return 1;
    }
    if (R->n == R->cap) {
        size_t cap = R->cap ? 2 * R->cap : 64;
        struct run *q = realloc(R->r, cap * sizeof *q);
        if (!q)
            return 0;
        R->r = q;
        R->cap = cap;
    }
    R->r[R->n].a = a;
    R->r[R->n++].b = b;
    return 1;
}

/* delta.py's equal_runs: [a, b) where new equals old, compared up to the shorter one. */
static int equal_runs(const unsigned char *nw, const unsigned char *old, uint32_t n, struct runs *R)
{
    for (uint32_t i = 0; i < n; i += COARSE) {
        uint32_t j = i + COARSE < n ? i + COARSE : n;
        if (!memcmp(nw + i, old + i, j - i)) {
            if (!run_push(R, i, j, 1))
                return 0;
            continue;
        }
        for (uint32_t k = i; k < j; k += BLOCK) {
            uint32_t kk = k + BLOCK < j ? k + BLOCK : j;
            if (!memcmp(nw + k, old + k, kk - k)) {
                if (!run_push(R, k, kk, 1))
                    return 0;
                continue;
            }
            /* a differing block: its equal head joins the run before, its equal tail starts one */
            uint32_t a = k, b = kk;
            while (a + FINE < kk && !memcmp(nw + a, old + a, FINE))
                a += FINE;
            if (a > k && !run_push(R, k, a, 1))
                return 0;
            while (b > a + FINE && !memcmp(nw + b - FINE, old + b - FINE, FINE))
                b -= FINE;
            if (b < kk && !run_push(R, b, kk, 0))
                return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- building the delta */

struct seg {
    int kind;
    uint32_t len;
    int base;               /* index in the call's base table (copies) */
    uint32_t off;           /* in the base (copy) or in the chunk (literal) */
};

struct segs {
    struct seg *s;
    size_t n, cap;
};

static int seg_add(struct segs *S, int kind, uint32_t len, int base, uint32_t off)
{
    if (S->n) {
        struct seg *l = &S->s[S->n - 1];
        if (l->kind == kind && l->base == base && l->off + l->len == off) {
            l->len += len;
            return 1;
        }
    }
    if (S->n == S->cap) {
        size_t cap = S->cap ? 2 * S->cap : 64;
        struct seg *q = realloc(S->s, cap * sizeof *q);
        if (!q)
            return 0;
        S->s = q;
        S->cap = cap;
    }
    S->s[S->n++] = (struct seg){kind, len, base, off};
    return 1;
}

struct btab {               /* the bases a delta's copies name: cache entries of full chunks */
    int entry[MAX_BASES * 24];
    uint64_t weight[MAX_BASES * 24];
    int n;
};

static int btab_index(struct btab *T, int entry)
{
    for (int i = 0; i < T->n; i++)
        if (T->entry[i] == entry)
            return i;
    if (T->n == (int)(sizeof T->entry / sizeof T->entry[0]))
        return -1;
    T->entry[T->n] = entry;
    T->weight[T->n] = 0;
    return T->n++;
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

enum xv_status xv_delta_encode(struct xv_dctx *c, const xv_parent *P, const unsigned char *data, uint32_t len,
                               uint64_t start, unsigned char **payload, size_t *plen,
                               unsigned char base_ids[][32], int *nbases)
{
    *plen = 0;
    *nbases = 0;
    uint64_t end = start + len;
    if (!P->n || start >= P->starts[P->n] || !len)
        return XV_OK;
    c->gen++;
    /* the parent chunks overlapping [start, end) */
    size_t lo = 0, hi = P->n;
    while (lo + 1 < hi) {
        size_t mid = (lo + hi) / 2;
        if (P->starts[mid] <= start)
            lo = mid;
        else
            hi = mid;
    }
    size_t first = lo, last = first;
    while (last < P->n && P->starts[last] < end)
        last++;
    int src[64];
    size_t nsrc = last - first;
    if (nsrc > 64)
        return XV_OK;
    for (size_t k = 0; k < nsrc; k++)
        if ((src[k] = open_chunk(c, P, P->ids + 32 * (first + k), 0)) < 0 ||
            c->e[src[k]].len != P->starts[first + k + 1] - P->starts[first + k])
            return XV_OK;

    /* the parent's bytes of [start, end) */
    uint64_t have = (P->starts[last] < end ? P->starts[last] : end) - start;
    if (!grow(&c->tmp, &c->tmpcap, len))
        return XV_ENOMEM;
    for (size_t k = 0; k < nsrc; k++) {
        uint64_t ps = P->starts[first + k], a = start > ps ? start : ps, b = end < P->starts[first + k + 1] ?
                                                                                  end : P->starts[first + k + 1];
        memcpy(c->tmp + (a - start), c->e[src[k]].plain + (a - ps), b - a);
    }
    struct runs R = {0};
    struct segs S = {0}, S2 = {0};
    struct btab T;
    T.n = 0;
    enum xv_status rc = XV_OK;
    unsigned char *out = NULL;
    if (!equal_runs(data, c->tmp, (uint32_t)have, &R)) {
        rc = XV_ENOMEM;
        goto done;
    }
    uint64_t same = 0;
    for (size_t i = 0; i < R.n; i++)
        same += R.r[i].b - R.r[i].a;
    if (same * 2 < len)
        goto done;

    uint32_t pos = 0;
    for (size_t r = 0; r < R.n; r++) {
        uint32_t a = R.r[r].a, b = R.r[r].b;
        if (a > pos && !seg_add(&S, LITERAL, a - pos, -1, pos))
            goto oom;
        uint64_t x = start + a, y = start + b;
        for (size_t k = 0; k < nsrc; k++) {
            /* c->e may move when a base is opened: entries are reached by index */
            int ei = src[k];
            uint64_t ps = P->starts[first + k], elen = c->e[ei].len;
            uint64_t l0 = (x > ps ? x : ps) - ps, h0 = (y < ps + elen ? y : ps + elen);
            if (h0 <= ps || l0 >= h0 - ps)
                continue;
            uint32_t lo2 = (uint32_t)l0, hi2 = (uint32_t)(h0 - ps);
            if (c->e[ei].full) {
                int bi = btab_index(&T, ei);
                if (bi < 0)
                    goto done;
                if (!seg_add(&S, COPY, hi2 - lo2, bi, lo2))
                    goto oom;
                continue;
            }
            const struct mseg *seg = c->e[ei].seg;   /* its own allocation: does not move */
            for (size_t i = 0, nseg = c->e[ei].nseg; i < nseg; i++) {
                const struct mseg *m = &seg[i];
                if (m->start + m->len <= lo2)
                    continue;
                if (m->start >= hi2)
                    break;
                uint32_t s0 = lo2 > m->start ? lo2 : m->start, s1 = hi2 < m->start + m->len ? hi2 : m->start + m->len;
                if (m->base < 0) {
                    if (!seg_add(&S, LITERAL, s1 - s0, -1, (uint32_t)(ps + s0 - start)))
                        goto oom;
                    continue;
                }
                unsigned char bid[32];
                memcpy(bid, c->e[ei].bid[m->base], 32);
                int be = open_chunk(c, P, bid, 1);
                int bi = be < 0 ? -1 : btab_index(&T, be);
                if (bi < 0)
                    goto done;   /* a base that cannot serve: the chunk is stored whole */
                if (!seg_add(&S, COPY, s1 - s0, bi, m->boff + s0 - m->start))
                    goto oom;
            }
        }
        pos = b;
    }
    if (pos < len && !seg_add(&S, LITERAL, len - pos, -1, pos))
        goto oom;

    /* at most MAX_BASES bases: the most used (ties by id), the others' copies become literals */
    for (size_t i = 0; i < S.n; i++)
        if (S.s[i].kind == COPY)
            T.weight[S.s[i].base] += S.s[i].len;
    int order[MAX_BASES * 24], nused = 0;
    for (int i = 0; i < T.n; i++)
        if (T.weight[i])
            order[nused++] = i;
    if (!nused)
        goto done;
    for (int i = 1; i < nused; i++)      /* insertion sort: a few entries */
        for (int k = i; k > 0; k--) {
            int x = order[k - 1], y = order[k];
            int before = T.weight[y] > T.weight[x] ||
                         (T.weight[y] == T.weight[x] && memcmp(c->e[T.entry[y]].id, c->e[T.entry[x]].id, 32) < 0);
            if (!before)
                break;
            order[k - 1] = y;
            order[k] = x;
        }
    int keep = nused < MAX_BASES ? nused : MAX_BASES, newidx[MAX_BASES * 24];
    for (int i = 0; i < T.n; i++)
        newidx[i] = -1;
    for (int i = 0; i < keep; i++)
        newidx[order[i]] = i;
    struct segs *F = &S;
    if (keep < nused) {
        uint32_t at = 0;
        for (size_t i = 0; i < S.n; i++) {
            const struct seg *g = &S.s[i];
            int ok = g->kind == COPY && newidx[g->base] >= 0 ? seg_add(&S2, COPY, g->len, g->base, g->off)
                                                            : seg_add(&S2, LITERAL, g->len, -1, at);
            if (!ok)
                goto oom;
            at += g->len;
        }
        F = &S2;
    }
    size_t size = 3 + 32 * (size_t)keep + 4;
    for (size_t i = 0; i < F->n; i++)
        size += 5 + (F->s[i].kind == COPY ? 6 : F->s[i].len);
    if (size * 2 > len)
        goto done;
    if (!(out = malloc(size)))
        goto oom;
    out[0] = 1;
    out[1] = (unsigned char)keep;
    out[2] = (unsigned char)(keep >> 8);
    for (int i = 0; i < keep; i++)
        memcpy(out + 3 + 32 * i, c->e[T.entry[order[i]]].id, 32);
    size_t at = 3 + 32 * (size_t)keep;
    put32(out + at, (uint32_t)F->n);
    at += 4;
    uint32_t check = 0;
    for (size_t i = 0; i < F->n; i++) {
        const struct seg *g = &F->s[i];
        out[at] = (unsigned char)g->kind;
        put32(out + at + 1, g->len);
        at += 5;
        if (g->kind == COPY) {
            int bi = newidx[g->base];
            const struct entry *be = &c->e[T.entry[g->base]];
            out[at] = (unsigned char)bi;
            out[at + 1] = (unsigned char)(bi >> 8);
            put32(out + at + 2, g->off);
            at += 6;
            /* the rebuild check: the copy, from exactly that base, gives the chunk's bytes */
            if ((uint64_t)g->off + g->len > be->len || memcmp(be->plain + g->off, data + check, g->len))
                goto done;
        } else {
            memcpy(out + at, data + g->off, g->len);
            at += g->len;
        }
        check += g->len;
    }
    if (check != len || at != size)
        goto done;
    for (int i = 0; i < keep; i++)
        memcpy(base_ids[i], c->e[T.entry[order[i]]].id, 32);
    *payload = out;
    *plen = size;
    *nbases = keep;
    out = NULL;
    goto done;
oom:
    rc = XV_ENOMEM;
done:
    free(out);
    free(R.r);
    free(S.s);
    free(S2.s);
    return rc;
}
