/* The PolarSSL 1.1 AES API the vtpmmgr uses, over OpenSSL (shim/polarssl.c). */
#ifndef SHIM_POLARSSL_AES_H
#define SHIM_POLARSSL_AES_H
#define AES_ENCRYPT 1
#define AES_DECRYPT 0
typedef struct {
	unsigned char schedule[256] __attribute__((aligned(16)));   /* an OpenSSL AES_KEY */
	int direction;
} aes_context;
int aes_setkey_enc(aes_context *ctx, const unsigned char *key, unsigned int keysize);
int aes_setkey_dec(aes_context *ctx, const unsigned char *key, unsigned int keysize);
int aes_crypt_ecb(aes_context *ctx, int mode, const unsigned char input[16], unsigned char output[16]);
#endif
