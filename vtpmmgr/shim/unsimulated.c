/* What the simulated host does not model, with the answers a manager without it would give.
 *
 * The group provisioning ordinals (GROUP_NEW with an AIK, ACTIVATE, REGISTER, quotes) need a TPM
 * 1.2 identity key; pTPM pass-through needs a TPM 1.2.  Each call here fails the way the real code
 * fails when the TPM refuses, so vtpm_cmd_handler.c answers TPM_FAIL and changes nothing. */
#include <stdlib.h>
#include <string.h>

#include "vtpm_manager.h"
#include "log.h"
#include "uuid.h"
#include "tcg.h"
#include "tpm.h"
#include "tpm2.h"
#include "tpmrsa.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_crypto.h"
#include "mgmt_authority.h"

struct vtpm_globals vtpm_globals = { .tpm_fd = -1 };

int hw_is_tpm2(void)
{
	return 0;       /* seal (PCR-bound, persistent) rather than Xen's per-boot TPM 2.0 bind */
}

TPM_RESULT TPM_TransmitData(BYTE *in, UINT32 insize, BYTE *out, UINT32 *outsize)
{
	(void)in; (void)insize; (void)out; (void)outsize;
	return TPM_FAIL;
}

TPM_RESULT TPM2_GetRandom(UINT32 *bytesRequested, BYTE *randomBytes)
{
	(void)bytesRequested; (void)randomBytes;
	return TPM_FAIL;
}

/* Group 0 as vtpm_new_disk() asks for it (mgmt_authority.c): random identity and keys, no AIK yet.
 * A new group with an AIK (GROUP_NEW) needs TPM_MakeIdentity: refused. */
struct mem_group *vtpm_new_group(const struct tpm_authdata *privCADigest)
{
	struct mem_group *group;
	if (privCADigest)
		return NULL;
	group = calloc(1, sizeof(*group));
	if (!group)
		abort();
	group->flags = MEM_GROUP_FLAG_FIRSTBOOT;
	do_random(&group->id_data.uuid, 16);
	do_random(&group->group_key, 16);
	do_random(&group->rollback_mac_key, 16);
	do_random(&group->aik_authdata, 20);
	group->id_data.uuid[6] = 0x40 | (group->id_data.uuid[6] & 0x0F);
	group->id_data.uuid[8] = 0x80 | (group->id_data.uuid[8] & 0x3F);
	return group;
}

int group_do_activate(struct mem_group *group, void *blob, int blobSize, void *resp, unsigned int *rlen)
{
	(void)group; (void)blob; (void)blobSize; (void)resp; (void)rlen;
	return TPM_FAIL;
}

int vtpm_do_quote(struct mem_group *group, const uuid_t uuid, const uint8_t *kern_hash,
		  const struct tpm_authdata *data, TPM_PCR_SELECTION *sel, uint32_t extraInfoFlags,
		  void *pcr_out, uint32_t *pcr_size, void *sig_out)
{
	(void)group; (void)uuid; (void)kern_hash; (void)data; (void)sel; (void)extraInfoFlags;
	(void)pcr_out; (void)pcr_size; (void)sig_out;
	return TPM_FAIL;
}

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
