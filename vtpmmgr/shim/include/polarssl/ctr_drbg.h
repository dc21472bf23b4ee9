/* The manager's DRBG (seeded from the pTPM on Xen); here OpenSSL's RAND_bytes, given the pTPM's bytes too. */
#ifndef SHIM_POLARSSL_CTR_DRBG_H
#define SHIM_POLARSSL_CTR_DRBG_H
#include <stddef.h>
typedef struct { int unused; } ctr_drbg_context;
int ctr_drbg_random(void *p_rng, unsigned char *output, size_t output_len);
#define CTR_DRBG_PR_OFF 0
int ctr_drbg_init(ctr_drbg_context *ctx, int (*f_entropy)(void *, unsigned char *, size_t), void *p_entropy,
		  const unsigned char *custom, size_t len);
void ctr_drbg_set_prediction_resistance(ctr_drbg_context *ctx, int resistance);
#endif
