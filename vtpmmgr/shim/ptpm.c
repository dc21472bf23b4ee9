/* The simulator's physical TPM for the manager: a TPM 2.0 behind a TCTI (an swtpm socket by
 * default; any TCTI string works).  A seal is a keyedhash object under the owner hierarchy's ECC
 * primary with policy PolicyPCR(sha256 bank: selection) and no user auth; its blob is
 * be16 n | TPM2B_PUBLIC | be16 m | TPM2B_PRIVATE.  Names and the policy digest use SHA-1, as Xen's
 * TPM 1.2 seal does: with SHA-256 the blob (292 bytes) would not fit sealed_data[256].  Each call opens and closes its own connection:
 * the TPM serves one client at a time and the manager needs it only to seal and unseal. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include <mini-os/console.h>

#include "ptpm.h"
#include "shim.h"

struct tpm {
	TSS2_TCTI_CONTEXT *tcti;
	ESYS_CONTEXT *esys;
	ESYS_TR primary;
};

static void tpm_close(struct tpm *t)
{
	if (t->primary != ESYS_TR_NONE)
		Esys_FlushContext(t->esys, t->primary);
	if (t->esys)
		Esys_Finalize(&t->esys);
	if (t->tcti)
		Tss2_TctiLdr_Finalize(&t->tcti);
}

/* The manager owns its TPM (no resource manager): a killed predecessor may have left transient
 * objects behind, and the TPM has only a few slots for them. */
static void flush_leftovers(struct tpm *t)
{
	TPMS_CAPABILITY_DATA *cap = NULL;
	TPMI_YES_NO more;
	UINT32 i;
	if (Esys_GetCapability(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
			       0x80000000u /* TPM2_TRANSIENT_FIRST: the tss2 macro shifts an int */, 64, &more, &cap) != TSS2_RC_SUCCESS)
		return;
	for (i = 0; i < cap->data.handles.count; i++) {
		ESYS_TR obj;
		if (Esys_TR_FromTPMPublic(t->esys, cap->data.handles.handle[i], ESYS_TR_NONE, ESYS_TR_NONE,
					  ESYS_TR_NONE, &obj) == TSS2_RC_SUCCESS)
			Esys_FlushContext(t->esys, obj);
	}
	Esys_Free(cap);
}

static int tpm_open(struct tpm *t, int with_primary)
{
	TSS2_RC rc;
	TPM2B_SENSITIVE_CREATE sens = { 0 };
	TPM2B_PUBLIC tmpl = {
		.publicArea = {
			.type = TPM2_ALG_ECC,
			.nameAlg = TPM2_ALG_SHA1,
			.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
				TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
				TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_NODA,
			.parameters.eccDetail = {
				.symmetric = { .algorithm = TPM2_ALG_AES, .keyBits.aes = 128, .mode.aes = TPM2_ALG_CFB },
				.scheme = { .scheme = TPM2_ALG_NULL },
				.curveID = TPM2_ECC_NIST_P256,
				.kdf = { .scheme = TPM2_ALG_NULL },
			},
		},
	};
	TPM2B_DATA outside = { 0 };
	TPML_PCR_SELECTION none = { 0 };

	memset(t, 0, sizeof(*t));
	t->primary = ESYS_TR_NONE;
	if ((rc = Tss2_TctiLdr_Initialize(shim_config.tcti, &t->tcti)) != TSS2_RC_SUCCESS ||
	    (rc = Esys_Initialize(&t->esys, t->tcti, NULL)) != TSS2_RC_SUCCESS) {
		printk("disk_tpm: cannot reach the TPM at %s: %s\n", shim_config.tcti, Tss2_RC_Decode(rc));
		tpm_close(t);
		return -1;
	}
	rc = Esys_Startup(t->esys, TPM2_SU_CLEAR);
	if (rc != TSS2_RC_SUCCESS && rc != TPM2_RC_INITIALIZE) {
		printk("disk_tpm: TPM2_Startup: %s\n", Tss2_RC_Decode(rc));
		tpm_close(t);
		return -1;
	}
	flush_leftovers(t);
	if (!with_primary)
		return 0;
	rc = Esys_CreatePrimary(t->esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
				&sens, &tmpl, &outside, &none, &t->primary, NULL, NULL, NULL, NULL);
	if (rc != TSS2_RC_SUCCESS) {
		printk("disk_tpm: CreatePrimary: %s\n", Tss2_RC_Decode(rc));
		t->primary = ESYS_TR_NONE;
		tpm_close(t);
		return -1;
	}
	return 0;
}

static TPML_PCR_SELECTION selection_of(uint32_t mask)
{
	TPML_PCR_SELECTION sel = { .count = 1 };
	sel.pcrSelections[0].hash = TPM2_ALG_SHA256;
	sel.pcrSelections[0].sizeofSelect = 3;
	sel.pcrSelections[0].pcrSelect[0] = mask & 0xff;
	sel.pcrSelections[0].pcrSelect[1] = (mask >> 8) & 0xff;
	sel.pcrSelections[0].pcrSelect[2] = (mask >> 16) & 0xff;
	return sel;
}

static int pcr_session(struct tpm *t, TPM2_SE type, uint32_t mask, ESYS_TR *session)
{
	TPMT_SYM_DEF sym = { .algorithm = TPM2_ALG_NULL };
	TPM2B_DIGEST empty = { 0 };
	TPML_PCR_SELECTION sel = selection_of(mask);
	if (Esys_StartAuthSession(t->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
				  NULL, type, &sym, TPM2_ALG_SHA1, session) != TSS2_RC_SUCCESS)
		return -1;
	if (Esys_PolicyPCR(t->esys, *session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &empty, &sel)
	    != TSS2_RC_SUCCESS) {
		Esys_FlushContext(t->esys, *session);
		return -1;
	}
	return 0;
}

int ptpm_read_pcrs(uint8_t pcr_values[NR_PCRS][32])
{
	struct tpm t;
	int first;
	if (tpm_open(&t, 0))
		return -1;
	for (first = 0; first < NR_PCRS; first += 8) {
		TPML_PCR_SELECTION sel = selection_of(0xffu << first), *out_sel = NULL;
		TPML_DIGEST *values = NULL;
		UINT32 counter, i;
		if (Esys_PCR_Read(t.esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &sel, &counter, &out_sel,
				  &values) != TSS2_RC_SUCCESS) {
			tpm_close(&t);
			return -1;
		}
		for (i = 0; i < values->count && first + (int)i < NR_PCRS; i++)
			memcpy(pcr_values[first + i], values->digests[i].buffer, 32);
		Esys_Free(out_sel);
		Esys_Free(values);
	}
	tpm_close(&t);
	return 0;
}

int ptpm_seal(uint32_t mask, const void *src, size_t size, uint8_t blob[PTPM_BLOB_SIZE])
{
	struct tpm t;
	ESYS_TR trial;
	TPM2B_DIGEST *policy = NULL;
	TPM2B_SENSITIVE_CREATE sens = { 0 };
	TPM2B_PUBLIC tmpl = {
		.publicArea = {
			.type = TPM2_ALG_KEYEDHASH,
			.nameAlg = TPM2_ALG_SHA1,
			/* no USERWITHAUTH: the PCR policy is the only way to unseal */
			.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_NODA,
			.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL,
		},
	};
	TPM2B_DATA outside = { 0 };
	TPML_PCR_SELECTION none = { 0 };
	TPM2B_PRIVATE *priv = NULL;
	TPM2B_PUBLIC *pub = NULL;
	size_t off = 2, mark;
	TSS2_RC rc = TSS2_RC_SUCCESS;
	int ret = -1;

	if (size > sizeof(sens.sensitive.data.buffer) || tpm_open(&t, 1))
		return -1;
	if (pcr_session(&t, TPM2_SE_TRIAL, mask, &trial))
		goto out;
	if (Esys_PolicyGetDigest(t.esys, trial, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &policy) != TSS2_RC_SUCCESS) {
		Esys_FlushContext(t.esys, trial);
		goto out;
	}
	Esys_FlushContext(t.esys, trial);
	tmpl.publicArea.authPolicy = *policy;
	sens.sensitive.data.size = (UINT16)size;
	memcpy(sens.sensitive.data.buffer, src, size);
	rc = Esys_Create(t.esys, t.primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &tmpl, &outside,
			 &none, &priv, &pub, NULL, NULL, NULL);
	if (rc != TSS2_RC_SUCCESS)
		goto out;
	memset(blob, 0, PTPM_BLOB_SIZE);
	if ((rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, blob, PTPM_BLOB_SIZE, &off)) != TSS2_RC_SUCCESS)
		goto out;
	blob[0] = (off - 2) >> 8;
	blob[1] = (off - 2) & 0xff;
	mark = off;
	off += 2;
	if ((rc = Tss2_MU_TPM2B_PRIVATE_Marshal(priv, blob, PTPM_BLOB_SIZE, &off)) != TSS2_RC_SUCCESS)
		goto out;
	blob[mark] = (off - mark - 2) >> 8;
	blob[mark + 1] = (off - mark - 2) & 0xff;
	ret = 0;
out:
	if (ret)
		printk("disk_tpm: sealing %zu bytes failed: %s\n", size, Tss2_RC_Decode(rc));
	Esys_Free(policy);
	Esys_Free(priv);
	Esys_Free(pub);
	tpm_close(&t);
	return ret;
}

int ptpm_unseal(uint32_t mask, const uint8_t blob[PTPM_BLOB_SIZE], void *dst, size_t size)
{
	struct tpm t;
	TPM2B_PUBLIC pub = { 0 };
	TPM2B_PRIVATE priv = { 0 };
	TPM2B_SENSITIVE_DATA *out = NULL;
	ESYS_TR obj = ESYS_TR_NONE, session;
	size_t off = 2, limit = PTPM_BLOB_SIZE;
	int ret = -1;

	if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(blob, limit, &off, &pub) != TSS2_RC_SUCCESS)
		return -1;
	off += 2;
	if (off > limit || Tss2_MU_TPM2B_PRIVATE_Unmarshal(blob, limit, &off, &priv) != TSS2_RC_SUCCESS)
		return -1;
	if (tpm_open(&t, 1))
		return -1;
	if (Esys_Load(t.esys, t.primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv, &pub, &obj)
	    != TSS2_RC_SUCCESS)
		goto out;
	if (pcr_session(&t, TPM2_SE_POLICY, mask, &session))
		goto out;
	if (Esys_Unseal(t.esys, obj, session, ESYS_TR_NONE, ESYS_TR_NONE, &out) == TSS2_RC_SUCCESS &&
	    out->size == size) {
		memcpy(dst, out->buffer, size);
		ret = 0;
	}
	Esys_FlushContext(t.esys, session);
out:
	if (obj != ESYS_TR_NONE)
		Esys_FlushContext(t.esys, obj);
	Esys_Free(out);
	tpm_close(&t);
	return ret;
}

