/* The PolarSSL 1.1 calls of the vtpmmgr over OpenSSL's libcrypto (same algorithms, same outputs). */
#include <openssl/aes.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include <polarssl/aes.h>
#include <polarssl/ctr_drbg.h>
#include <polarssl/entropy.h>
#include <polarssl/sha1.h>
#include <polarssl/sha2.h>

_Static_assert(sizeof(AES_KEY) <= sizeof(((aes_context *)0)->schedule), "AES_KEY fits aes_context");
_Static_assert(sizeof(SHA_CTX) <= sizeof(((sha1_context *)0)->state), "SHA_CTX fits sha1_context");

int aes_setkey_enc(aes_context *ctx, const unsigned char *key, unsigned int keysize)
{
	ctx->direction = AES_ENCRYPT;
	return AES_set_encrypt_key(key, (int)keysize, (AES_KEY *)ctx->schedule) ? -1 : 0;
}

int aes_setkey_dec(aes_context *ctx, const unsigned char *key, unsigned int keysize)
{
	ctx->direction = AES_DECRYPT;
	return AES_set_decrypt_key(key, (int)keysize, (AES_KEY *)ctx->schedule) ? -1 : 0;
}

int aes_crypt_ecb(aes_context *ctx, int mode, const unsigned char input[16], unsigned char output[16])
{
	/* PolarSSL keys a context for one direction; using it for the other is a caller bug. */
	if (mode != ctx->direction)
		abort();
	if (mode == AES_ENCRYPT)
		AES_encrypt(input, output, (const AES_KEY *)ctx->schedule);
	else
		AES_decrypt(input, output, (const AES_KEY *)ctx->schedule);
	return 0;
}

void sha1_starts(sha1_context *ctx) { SHA1_Init((SHA_CTX *)ctx->state); }
void sha1_update(sha1_context *ctx, const unsigned char *input, size_t ilen) { SHA1_Update((SHA_CTX *)ctx->state, input, ilen); }
void sha1_finish(sha1_context *ctx, unsigned char output[20]) { SHA1_Final(output, (SHA_CTX *)ctx->state); }
void sha1(const unsigned char *input, size_t ilen, unsigned char output[20]) { SHA1(input, ilen, output); }

void sha1_hmac_starts(sha1_context *ctx, const unsigned char *key, size_t keylen)
{
	unsigned char k[64] = { 0 }, ipad[64];
	size_t i;
	if (keylen > sizeof(k))
		SHA1(key, keylen, k);
	else
		memcpy(k, key, keylen);
	for (i = 0; i < sizeof(k); i++) {
		ipad[i] = k[i] ^ 0x36;
		ctx->opad[i] = k[i] ^ 0x5c;
	}
	sha1_starts(ctx);
	sha1_update(ctx, ipad, sizeof(ipad));
}

void sha1_hmac_update(sha1_context *ctx, const unsigned char *input, size_t ilen)
{
	sha1_update(ctx, input, ilen);
}

void sha1_hmac_finish(sha1_context *ctx, unsigned char output[20])
{
	unsigned char inner[20];
	sha1_finish(ctx, inner);
	sha1_starts(ctx);
	sha1_update(ctx, ctx->opad, sizeof(ctx->opad));
	sha1_update(ctx, inner, sizeof(inner));
	sha1_finish(ctx, output);
}

void sha1_hmac(const unsigned char *key, size_t keylen, const unsigned char *input, size_t ilen,
	       unsigned char output[20])
{
	sha1_context ctx;
	sha1_hmac_starts(&ctx, key, keylen);
	sha1_hmac_update(&ctx, input, ilen);
	sha1_hmac_finish(&ctx, output);
}

void sha2(const unsigned char *input, size_t ilen, unsigned char output[32], int is224)
{
	if (is224)
		SHA224(input, ilen, output);
	else
		SHA256(input, ilen, output);
}

int ctr_drbg_random(void *p_rng, unsigned char *output, size_t output_len)
{
	(void)p_rng;
	return RAND_bytes(output, (int)output_len) == 1 ? 0 : -1;
}

void entropy_init(entropy_context *ctx)
{
	ctx->source = NULL;
	ctx->p_source = NULL;
}

int entropy_add_source(entropy_context *ctx, f_source_ptr f_source, void *p_source, size_t threshold)
{
	(void)threshold;
	ctx->source = f_source;
	ctx->p_source = p_source;
	return 0;
}

int entropy_func(void *data, unsigned char *output, size_t len)
{
	entropy_context *ctx = data;
	size_t got = 0;
	if (!ctx->source || ctx->source(ctx->p_source, output, len, &got) || got != len)
		return POLARSSL_ERR_ENTROPY_SOURCE_FAILED;
	return 0;
}

int entropy_gather(entropy_context *ctx)
{
	unsigned char buf[32];
	return entropy_func(ctx, buf, sizeof(buf));
}

int ctr_drbg_init(ctr_drbg_context *ctx, int (*f_entropy)(void *, unsigned char *, size_t), void *p_entropy,
		  const unsigned char *custom, size_t len)
{
	unsigned char seed[32];
	(void)ctx; (void)custom; (void)len;
	if (f_entropy(p_entropy, seed, sizeof(seed)))
		return -1;
	RAND_add(seed, sizeof(seed), sizeof(seed));
	return 0;
}

void ctr_drbg_set_prediction_resistance(ctr_drbg_context *ctx, int resistance)
{
	(void)ctx; (void)resistance;
}
