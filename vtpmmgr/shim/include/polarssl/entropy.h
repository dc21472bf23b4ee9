#ifndef SHIM_POLARSSL_ENTROPY_H
#define SHIM_POLARSSL_ENTROPY_H
#include <stddef.h>
#define POLARSSL_ERR_ENTROPY_SOURCE_FAILED -0x003C
typedef struct { int unused; } entropy_context;
#endif
