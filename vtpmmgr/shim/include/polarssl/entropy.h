#ifndef SHIM_POLARSSL_ENTROPY_H
#define SHIM_POLARSSL_ENTROPY_H
#include <stddef.h>
#define POLARSSL_ERR_ENTROPY_SOURCE_FAILED -0x003C
/* init.c seeds the manager's DRBG from the physical TPM (TPM_GetRandom / TPM2_GetRandom); the native
 * build mixes what that source gives into OpenSSL's generator (shim/polarssl.c). */
typedef int (*f_source_ptr)(void *, unsigned char *, size_t, size_t *);
typedef struct {
	f_source_ptr source;
	void *p_source;
} entropy_context;
void entropy_init(entropy_context *ctx);
int entropy_add_source(entropy_context *ctx, f_source_ptr f_source, void *p_source, size_t threshold);
int entropy_gather(entropy_context *ctx);
int entropy_func(void *data, unsigned char *output, size_t len);
#endif
