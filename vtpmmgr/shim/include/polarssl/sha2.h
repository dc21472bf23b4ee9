#ifndef SHIM_POLARSSL_SHA2_H
#define SHIM_POLARSSL_SHA2_H
#include <stddef.h>
void sha2(const unsigned char *input, size_t ilen, unsigned char output[32], int is224);
#endif
