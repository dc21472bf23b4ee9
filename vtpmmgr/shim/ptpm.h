/* The physical TPM as the native manager uses it (shim/ptpm.c); 0 on success. */
#ifndef SHIM_PTPM_H
#define SHIM_PTPM_H
#include <stddef.h>
#include <stdint.h>

#define NR_PCRS 24
#define PTPM_BLOB_SIZE 256

int ptpm_read_pcrs(uint8_t values[NR_PCRS][32]);
int ptpm_seal(uint32_t mask, const void *src, size_t size, uint8_t blob[PTPM_BLOB_SIZE]);
int ptpm_unseal(uint32_t mask, const uint8_t blob[PTPM_BLOB_SIZE], void *dst, size_t size);
#endif
