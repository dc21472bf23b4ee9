#ifndef SHIM_POLARSSL_SHA1_H
#define SHIM_POLARSSL_SHA1_H
#include <stddef.h>
typedef struct {
	unsigned char state[128] __attribute__((aligned(8)));   /* an OpenSSL SHA_CTX */
	unsigned char opad[64];                                 /* HMAC: the outer padded key */
} sha1_context;
void sha1_starts(sha1_context *ctx);
void sha1_update(sha1_context *ctx, const unsigned char *input, size_t ilen);
void sha1_finish(sha1_context *ctx, unsigned char output[20]);
void sha1(const unsigned char *input, size_t ilen, unsigned char output[20]);
/* HMAC-SHA-1 (tpm.c's TPM 1.2 authorization sessions) */
void sha1_hmac_starts(sha1_context *ctx, const unsigned char *key, size_t keylen);
void sha1_hmac_update(sha1_context *ctx, const unsigned char *input, size_t ilen);
void sha1_hmac_finish(sha1_context *ctx, unsigned char output[20]);
void sha1_hmac(const unsigned char *key, size_t keylen, const unsigned char *input, size_t ilen,
	       unsigned char output[20]);
#endif
