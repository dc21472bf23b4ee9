#ifndef SHIM_POLARSSL_ENTROPY_H
#define SHIM_POLARSSL_ENTROPY_H
#include <stddef.h>
#define POLARSSL_ERR_ENTROPY_SOURCE_FAILED -0x003C
typedef struct { int unused; } entropy_context;
/* Declared so init.c compiles in the patch check; the native manager seeds nothing (RAND_bytes). */
typedef int (*f_source_ptr)(void *, unsigned char *, size_t, size_t *);
void entropy_init(entropy_context *ctx);
int entropy_add_source(entropy_context *ctx, f_source_ptr f_source, void *p_source, size_t threshold);
int entropy_gather(entropy_context *ctx);
int entropy_func(void *data, unsigned char *output, size_t len);
#endif
