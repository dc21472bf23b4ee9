/* The manager's DRBG (seeded from the pTPM on Xen); here OpenSSL's RAND_bytes. */
#ifndef SHIM_POLARSSL_CTR_DRBG_H
#define SHIM_POLARSSL_CTR_DRBG_H
#include <stddef.h>
typedef struct { int unused; } ctr_drbg_context;
int ctr_drbg_random(void *p_rng, unsigned char *output, size_t output_len);
#endif
