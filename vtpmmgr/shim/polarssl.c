/* The PolarSSL 1.1 calls of the vtpmmgr over OpenSSL's libcrypto (same algorithms, same outputs). */
#include <openssl/aes.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include <polarssl/aes.h>
#include <polarssl/ctr_drbg.h>
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
