/* A chunk's keyed id and AES-256-GCM seal (docs/formats.md, "Checkpoint store" §0), byte for byte what
 * xen_vtpm/store/chunks.py computes: the same entries open on either side. */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "seal.h"

static const unsigned char DELTA_AAD[] = "delta";   /* 5 bytes after the id; the NUL is not used */

static EVP_MAC *g_hmac;
static EVP_CIPHER *g_gcm;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* Fetched once per process: OpenSSL 3 would otherwise look them up again for every context. */
static void fetch_once(void)
{
    g_hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    g_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
}

void xv_sealer_free(struct xv_sealer *s)
{
    EVP_MAC_CTX_free(s->mac);
    EVP_CIPHER_CTX_free(s->enc);
    EVP_CIPHER_CTX_free(s->dec);
    memset(s, 0, sizeof *s);
}

enum xv_status xv_sealer_init(struct xv_sealer *s, const unsigned char id_key[32], const unsigned char enc_key[32])
{
    memset(s, 0, sizeof *s);
    pthread_once(&g_once, fetch_once);
    if (!g_hmac || !g_gcm)
        return XV_ECRYPTO;
    s->mac = EVP_MAC_CTX_new(g_hmac);
    s->enc = EVP_CIPHER_CTX_new();
    s->dec = EVP_CIPHER_CTX_new();
    if (!s->mac || !s->enc || !s->dec) {
        xv_sealer_free(s);
        return XV_ENOMEM;
    }
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    size_t ivlen = XV_NONCE_SIZE;
    OSSL_PARAM gcm[] = {OSSL_PARAM_construct_size_t(OSSL_CIPHER_PARAM_AEAD_IVLEN, &ivlen), OSSL_PARAM_construct_end()};
    /* Keyed once: a later init with only a new nonce keeps the key schedule. */
    if (EVP_MAC_init(s->mac, id_key, 32, params) != 1 || EVP_EncryptInit_ex2(s->enc, g_gcm, enc_key, NULL, gcm) != 1 ||
        EVP_DecryptInit_ex2(s->dec, g_gcm, enc_key, NULL, gcm) != 1) {
        xv_sealer_free(s);
        return XV_ECRYPTO;
    }
    return XV_OK;
}

enum xv_status xv_chunk_id(struct xv_sealer *s, const unsigned char sha[32], unsigned char id[32])
{
    size_t n = 0;
    if (EVP_MAC_init(s->mac, NULL, 0, NULL) != 1 || EVP_MAC_update(s->mac, sha, 32) != 1 ||
        EVP_MAC_final(s->mac, id, &n, 32) != 1 || n != 32)
        return XV_ECRYPTO;
    return XV_OK;
}

static int add_aad(EVP_CIPHER_CTX *ctx, int encrypting, const unsigned char id[32], int delta)
{
    int outl;
    int (*update)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int) =
        encrypting ? EVP_EncryptUpdate : EVP_DecryptUpdate;
    return update(ctx, NULL, &outl, id, XV_ID_SIZE) == 1 &&
           (!delta || update(ctx, NULL, &outl, DELTA_AAD, (int)sizeof DELTA_AAD - 1) == 1);
}

enum xv_status xv_seal_entry(struct xv_sealer *s, const unsigned char id[32], int delta, const unsigned char *in,
                             uint32_t n, unsigned char *out)
{
    unsigned char *nonce = out + XV_ID_SIZE, *ct = out + XV_ENTRY_HEAD;
    uint32_t sealed = n + XV_TAG_SIZE;
    int outl = 0, fin = 0;
    if (n > INT32_MAX - XV_TAG_SIZE)
        return XV_EINVAL;
    memcpy(out, id, XV_ID_SIZE);
    if (RAND_bytes(nonce, XV_NONCE_SIZE) != 1)
        return XV_ECRYPTO;
    for (int i = 0; i < 4; i++)
        out[XV_ID_SIZE + XV_NONCE_SIZE + i] = (unsigned char)(sealed >> (8 * i));
    if (EVP_EncryptInit_ex2(s->enc, NULL, NULL, nonce, NULL) != 1 || !add_aad(s->enc, 1, id, delta) ||
        (n && EVP_EncryptUpdate(s->enc, ct, &outl, in, (int)n) != 1) ||
        EVP_EncryptFinal_ex(s->enc, ct + outl, &fin) != 1 || (uint32_t)(outl + fin) != n ||
        EVP_CIPHER_CTX_ctrl(s->enc, EVP_CTRL_AEAD_GET_TAG, XV_TAG_SIZE, ct + n) != 1)
        return XV_ECRYPTO;
    return XV_OK;
}

enum xv_status xv_open_sealed(struct xv_sealer *s, const unsigned char id[32], int delta, const unsigned char nonce[12],
                              const unsigned char *sealed, uint32_t sealed_len, unsigned char *out)
{
    if (sealed_len < XV_TAG_SIZE || sealed_len > INT32_MAX)
        return XV_EFORMAT;
    uint32_t n = sealed_len - XV_TAG_SIZE;
    int outl = 0, fin = 0;
    /* The tag is copied out: OpenSSL's set-tag control takes a non-const pointer. */
    unsigned char tag[XV_TAG_SIZE];
    memcpy(tag, sealed + n, XV_TAG_SIZE);
    if (EVP_DecryptInit_ex2(s->dec, NULL, NULL, nonce, NULL) != 1 || !add_aad(s->dec, 0, id, delta) ||
        (n && EVP_DecryptUpdate(s->dec, out, &outl, sealed, (int)n) != 1) ||
        EVP_CIPHER_CTX_ctrl(s->dec, EVP_CTRL_AEAD_SET_TAG, XV_TAG_SIZE, tag) != 1)
        return XV_ECRYPTO;
    if (EVP_DecryptFinal_ex(s->dec, out + outl, &fin) != 1)
        return XV_EAUTH;
    return (uint32_t)(outl + fin) == n ? XV_OK : XV_ECRYPTO;
}

uint64_t xv_thread_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
