/*
 * vtpmmgr on TPM 2.0 hosts: the NV counter that makes an older copy of the
 * manager's disk unusable.  See tpm2_counter.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "vtpm_manager.h"
#include "uuid.h"
#include "tcg.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "tpm2_cmd.h"
#include "tpm2_seal.h"
#include "tpm2_counter.h"

#define COUNTER_ATTRIBUTES (T2_NV_COUNTER | T2_NV_AUTHWRITE | T2_NV_AUTHREAD | T2_NV_OWNERREAD | T2_NV_NO_DA)

static uint32_t nv_index = TPM2_COUNTER_DEFAULT_INDEX;
static int read_only;

int tpm2_counter_parse_args(int argc, char **argv)
{
	int i;
	for (i = 1; i < argc; i++) {
		if (strncmp(argv[i], "tpm2_nv_index=", 14))
			continue;
		/* an NV index handle: 0x01xxxxxx */
		if (sscanf(argv[i] + 14, "0x%" SCNx32, &nv_index) != 1 || (nv_index >> 24) != 0x01) {
			vtpmlogerror(VTPM_LOG_VTPM, "Invalid Option %s\n", argv[i]);
			return -1;
		}
	}
	return 0;
}

void tpm2_counter_read_only(void)
{
	read_only = 1;
}

/* A command authorized by the counter's authValue: the TPM is told twice which index it is. */
static void begin_with_auth(struct t2_cmd *c, uint32_t cc, uint32_t index, const struct tpm_authdata *auth)
{
	t2_begin(c, T2_ST_SESSIONS, cc);
	t2_u32(c, index);
	t2_u32(c, index);
	t2_pw_auth(c, auth->bits, sizeof(auth->bits));
}

static uint32_t read_public(uint32_t index, uint32_t *attributes, uint16_t *size)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t rc;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_NV_ReadPublic);
	t2_u32(&c, index);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	(void)t2_get_u16(&r);                    /* size of TPMS_NV_PUBLIC */
	if (t2_get_u32(&r) != index)
		return TPM_FAIL;
	(void)t2_get_u16(&r);                    /* nameAlg */
	*attributes = t2_get_u32(&r);
	(void)t2_get_raw(&r, t2_get_u16(&r));    /* authPolicy */
	*size = t2_get_u16(&r);
	return r.bad ? TPM_FAIL : 0;
}

static uint32_t read_value(uint32_t index, const struct tpm_authdata *auth, uint64_t *value)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t rc;
	begin_with_auth(&c, T2_CC_NV_Read, index, auth);
	t2_u16(&c, 8);                           /* size */
	t2_u16(&c, 0);                           /* offset */
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	t2_skip_param_size(&r);
	if (t2_get_u16(&r) != 8)
		return TPM_FAIL;
	*value = t2_get_u64(&r);
	return r.bad ? TPM_FAIL : 0;
}

static uint32_t increment(uint32_t index, const struct tpm_authdata *auth)
{
	struct t2_cmd c;
	struct t2_rsp r;
	begin_with_auth(&c, T2_CC_NV_Increment, index, auth);
	return t2_transmit(&c, &r);
}

/* Is index an NV counter that the manager's authValue writes? */
static int ours(uint32_t index)
{
	uint32_t attributes;
	uint16_t size;
	uint32_t rc = read_public(index, &attributes, &size);
	if (rc) {
		printk("vtpmmgr: TPM 2.0: NV counter 0x%08" PRIx32 " cannot be read: %s\n", index, t2_rc_text(rc));
		return 0;
	}
	if ((attributes & (T2_NV_TYPE_MASK | T2_NV_AUTHWRITE)) != (T2_NV_COUNTER | T2_NV_AUTHWRITE) || size != 8) {
		printk("vtpmmgr: TPM 2.0: NV index 0x%08" PRIx32 " is not the manager's counter (attributes 0x%08"
		       PRIx32 ")\n", index, attributes);
		return 0;
	}
	return 1;
}

int tpm2_counter_alloc(be32_t *slot, const struct tpm_authdata *auth, be32_t *value)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t rc, attributes;
	uint16_t size;
	uint64_t v;
	size_t mark;

	slot->value = 0;
	value->value = 0;
	if (!tpm2_seal_provisioning_requested())
		return 0;                        /* unprovisioned: nothing is ever written */

	/* Never take over an index: it may be the counter of another table of this TPM (a second disk
	 * started by mistake), which would then be refused as replaced. */
	if (!read_public(nv_index, &attributes, &size)) {
		printk("vtpmmgr: TPM 2.0: NV index 0x%08" PRIx32 " is already defined (another manager table's counter?); "
		       "choose another with tpm2_nv_index=, or remove it if its table is gone\n", nv_index);
		return -1;
	}

	t2_begin(&c, T2_ST_SESSIONS, T2_CC_NV_DefineSpace);
	t2_u32(&c, T2_RH_OWNER);
	t2_pw_auth(&c, NULL, 0);
	t2_b(&c, auth->bits, sizeof(auth->bits));
	mark = t2_open_b(&c);
	t2_u32(&c, nv_index);
	t2_u16(&c, T2_ALG_SHA256);
	t2_u32(&c, COUNTER_ATTRIBUTES);
	t2_b(&c, NULL, 0);                       /* authPolicy */
	t2_u16(&c, 8);
	t2_close_b(&c, mark);
	if ((rc = t2_transmit(&c, &r))) {
		printk("vtpmmgr: TPM 2.0: cannot define NV counter 0x%08" PRIx32 ": %s\n", nv_index, t2_rc_text(rc));
		return -1;
	}
	/* A counter has no value until its first increment, which starts it at the highest value any
	 * counter of this TPM ever had: a deleted and redefined counter never goes back. */
	if ((rc = increment(nv_index, auth)) || (rc = read_value(nv_index, auth, &v))) {
		printk("vtpmmgr: TPM 2.0: cannot start NV counter 0x%08" PRIx32 ": %s\n", nv_index, t2_rc_text(rc));
		return -1;
	}
	*slot = native_be32(nv_index);
	*value = native_be32((uint32_t)v);
	printk("vtpmmgr: TPM 2.0: anti-rollback NV counter 0x%08" PRIx32 " at %" PRIu64 "\n", nv_index, v);
	return 0;
}

int tpm2_counter_check(be32_t slot, const struct tpm_authdata *auth, be32_t value)
{
	uint32_t index = be32_native(slot), disk = be32_native(value), now, rc;
	uint64_t v;

	if (!index)
		return 0;
	if (!ours(index))
		return read_only ? 0 : -1;
	if ((rc = read_value(index, auth, &v))) {
		printk("vtpmmgr: TPM 2.0: NV counter 0x%08" PRIx32 " does not accept the table's authValue (%s): it "
		       "was replaced\n", index, t2_rc_text(rc));
		return read_only ? 0 : -1;
	}
	/* The root stores the low 32 bits: compare modulo 2^32. */
	now = (uint32_t)v;
	if (disk == now)
		return 0;
	if (disk == now + 1) {
		/* The manager stopped after writing the table and before counting the write. */
		if (read_only)
			return 0;
		if ((rc = increment(index, auth))) {
			printk("vtpmmgr: TPM 2.0: cannot advance NV counter 0x%08" PRIx32 ": %s\n", index, t2_rc_text(rc));
			return -1;
		}
		printk("vtpmmgr: TPM 2.0: the last write of the table was not counted yet; NV counter advanced to %"
		       PRIu32 "\n", disk);
		return 0;
	}
	if ((int32_t)(disk - now) < 0)
		printk("vtpmmgr: TPM 2.0: a root of the table carries counter %" PRIu32 " but NV counter 0x%08" PRIx32
		       " is at %" PRIu32 ": an older copy of the manager's disk (replayed)%s\n", disk, index, now,
		       read_only ? "" : "; refused");
	else
		printk("vtpmmgr: TPM 2.0: a root of the table carries counter %" PRIu32 ", ahead of NV counter 0x%08"
		       PRIx32 " at %" PRIu32 ": the counter was reset or replaced%s\n", disk, index, now,
		       read_only ? "" : "; refused");
	return read_only ? 0 : -1;
}

int tpm2_counter_incr(be32_t slot, const struct tpm_authdata *auth)
{
	uint32_t index = be32_native(slot), rc;
	if (!index)
		return 0;
	if ((rc = increment(index, auth))) {
		printk("vtpmmgr: TPM 2.0: cannot advance NV counter 0x%08" PRIx32 ": %s\n", index, t2_rc_text(rc));
		return -1;
	}
	return 0;
}
