/* disk_tpm.h for a native build: the manager's sealing on the simulator's physical TPM.
 *
 * Xen seals the manager's root and group keys with TPM 1.2 TPM_Seal bound to a PCR composite
 * (disk_tpm.c).  Here they are sealed on the simulator's physical TPM (shim/ptpm.c) to the entry's
 * PCR selection, the blob kept in disk_seal_entry.sealed_data[256].
 * TPM_pcr_digest is the TPM 1.2 composite hash (SHA-1 over the selection and the selected values)
 * computed over the sha256 bank, so a changed PCR changes every digest_release as on Xen.
 * The NVRAM and monotonic counter calls stay the stubs they are in Xen 4.17. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/sha.h>

#include "vtpm_manager.h"
#include "log.h"
#include "uuid.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_tpm.h"

#include "ptpm.h"
#include "shim.h"

static uint8_t pcr_values[NR_PCRS][32];

void TPM_read_pcrs(void)
{
	if (ptpm_read_pcrs(pcr_values))
		memset(pcr_values, 0xff, sizeof(pcr_values));   /* matches no digest_release */
}

void TPM_pcr_digest(struct hash160 *buf, le32_t selection)
{
	uint32_t mask = le32_native(selection);
	uint8_t head[9] = { 0, 3, mask & 0xff, (mask >> 8) & 0xff, (mask >> 16) & 0xff };
	uint32_t n = 0;
	int i;
	SHA_CTX ctx;
	for (i = 0; i < NR_PCRS; i++)
		n += (mask >> i) & 1;
	n *= 32;
	head[5] = n >> 24; head[6] = n >> 16; head[7] = n >> 8; head[8] = n;
	SHA1_Init(&ctx);
	SHA1_Update(&ctx, head, sizeof(head));
	for (i = 0; i < NR_PCRS; i++)
		if ((mask >> i) & 1)
			SHA1_Update(&ctx, pcr_values[i], 32);
	SHA1_Final(buf->bits, &ctx);
}

_Static_assert(sizeof(((struct disk_seal_entry *)0)->sealed_data) == PTPM_BLOB_SIZE, "seal blob size");

int TPM_disk_seal(struct disk_seal_entry *dst, const void *src, size_t size)
{
	/* disk_write.c ignores the result: a failed seal leaves a blob that never unseals */
	return ptpm_seal(le32_native(dst->pcr_selection), src, size, dst->sealed_data);
}

int TPM_disk_unseal(void *dst, size_t size, const struct disk_seal_entry *src)
{
	return ptpm_unseal(le32_native(src->pcr_selection), src->sealed_data, dst, size);
}

/* Xen's TPM 2.0 path (tpm2=1) binds to a key that changes every boot; the simulator seals instead
 * (hw_is_tpm2() is 0 in shim/unsimulated.c), so these are never called. */
TPM_RC TPM2_disk_bind(struct disk_seal_entry *dst, void *src, unsigned int size)
{
	(void)dst; (void)src; (void)size;
	return TPM_FAIL;
}

TPM_RC TPM2_disk_unbind(void *dst, unsigned int *size, const struct disk_seal_entry *src)
{
	(void)dst; (void)size; (void)src;
	return TPM_FAIL;
}

/* Stubs, as in Xen 4.17's disk_tpm.c ("TODO-3"): no NVRAM key, no monotonic counter. */
int TPM_disk_nvalloc(be32_t *nvram_slot, struct tpm_authdata auth) { (void)auth; nvram_slot->value = 0; return 0; }
int TPM_disk_nvread(void *buf, size_t bufsiz, be32_t nvram_slot, struct tpm_authdata auth)
{ (void)nvram_slot; (void)auth; memset(buf, 0, bufsiz); return 0; }
int TPM_disk_nvwrite(void *buf, size_t bufsiz, be32_t nvram_slot, struct tpm_authdata auth)
{ (void)buf; (void)bufsiz; (void)nvram_slot; (void)auth; return 0; }
int TPM_disk_nvchange(be32_t nvram_slot, struct tpm_authdata old, struct tpm_authdata noo)
{ (void)nvram_slot; (void)old; (void)noo; return 0; }
int TPM_disk_alloc_counter(be32_t *slot, struct tpm_authdata auth, be32_t *value)
{ (void)auth; slot->value = 0; value->value = 0; return 0; }
int TPM_disk_check_counter(be32_t slot, struct tpm_authdata auth, be32_t value)
{ (void)slot; (void)auth; (void)value; return 0; }
int TPM_disk_incr_counter(be32_t slot, struct tpm_authdata auth) { (void)slot; (void)auth; return 0; }
int TPM_disk_change_counter(be32_t slot, struct tpm_authdata old, struct tpm_authdata noo)
{ (void)slot; (void)old; (void)noo; return 0; }
