/* PolarSSL's multi-precision integers: only the layout and the calls vtpm_cmd_handler.c and tpmrsa.h
 * name.  Their only users are the group provisioning ordinals, which the simulator refuses before
 * any arithmetic (shim/unsimulated.c). */
#ifndef SHIM_POLARSSL_BIGNUM_H
#define SHIM_POLARSSL_BIGNUM_H
#include <stddef.h>
#include <stdint.h>
typedef uint64_t t_uint;
typedef struct {
	int s;
	size_t n;
	t_uint *p;
} mpi;
void mpi_free(mpi *X);
int mpi_read_binary(mpi *X, const unsigned char *buf, size_t buflen);
int mpi_write_binary(const mpi *X, unsigned char *buf, size_t buflen);
int mpi_exp_mod(mpi *X, const mpi *A, const mpi *E, const mpi *N, mpi *_RR);
#endif
