/* What the native build leaves out: PolarSSL's multi-precision arithmetic (tpmrsa.c, the SAA
 * Diffie-Hellman of GROUP_REGISTER).  Its users are the group provisioning ordinals of TPM 1.2
 * (GROUP_NEW with an AIK, ACTIVATE, REGISTER, UPDATE) and TPM 1.2 ownership: each call here fails
 * the way tpmrsa.c fails on a bad key, so vtpm_cmd_handler.c answers TPM_FAIL and changes nothing.
 * On a TPM 2.0 host those ordinals fail before, at the TPM 1.2 commands they send. */
#include <stdlib.h>
#include <string.h>

#include "tcg.h"
#include "tpmrsa.h"

void tpmrsa_set_pubkey(tpmrsa_context *ctx, const unsigned char *key, int keylen,
		       const unsigned char *exponent, int explen)
{
	(void)key; (void)keylen; (void)exponent; (void)explen;
	memset(ctx, 0, sizeof(*ctx));
}

/* No SAA signature is ever accepted, so GROUP_REGISTER and GROUP_UPDATE stop before they change
 * anything (and before the DH arithmetic below would run). */
TPM_RESULT tpmrsa_sigcheck(tpmrsa_context *ctx, const unsigned char *input, const unsigned char *sha1)
{
	(void)ctx; (void)input; (void)sha1;
	return TPM_FAIL;
}

TPM_RESULT tpmrsa_pub_encrypt_oaep(tpmrsa_context *ctx, int (*f_rng)(void *, unsigned char *, size_t), void *p_rng,
				   size_t ilen, const unsigned char *input, unsigned char *output)
{
	(void)ctx; (void)f_rng; (void)p_rng; (void)ilen; (void)input; (void)output;
	return TPM_FAIL;
}

void mpi_free(mpi *X)
{
	(void)X;
}

int mpi_read_binary(mpi *X, const unsigned char *buf, size_t buflen)
{
	(void)X; (void)buf; (void)buflen;
	abort();
}

int mpi_write_binary(const mpi *X, unsigned char *buf, size_t buflen)
{
	(void)X; (void)buf; (void)buflen;
	abort();
}

int mpi_exp_mod(mpi *X, const mpi *A, const mpi *E, const mpi *N, mpi *_RR)
{
	(void)X; (void)A; (void)E; (void)N; (void)_RR;
	abort();
}
