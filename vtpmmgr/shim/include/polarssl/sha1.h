#ifndef SHIM_POLARSSL_SHA1_H
#define SHIM_POLARSSL_SHA1_H
#include <stddef.h>
typedef struct {
	unsigned char state[128] __attribute__((aligned(8)));   /* an OpenSSL SHA_CTX */
} sha1_context;
void sha1_starts(sha1_context *ctx);
void sha1_update(sha1_context *ctx, const unsigned char *input, size_t ilen);
void sha1_finish(sha1_context *ctx, unsigned char output[20]);
void sha1(const unsigned char *input, size_t ilen, unsigned char output[20]);
#endif
