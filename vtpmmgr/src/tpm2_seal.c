/*
 * vtpmmgr persistence on TPM 2.0 hosts: sealing the manager's keys to a TPM 2.0
 * policy, provisioning group 0, refusing to replace a table it cannot open.
 * See tpm2_seal.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <polarssl/sha1.h>

#include "log.h"
#include "vtpm_manager.h"
#include "uuid.h"
#include "tcg.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_io.h"
#include "disk_crypto.h"
#include "disk_format.h"
#include "tpm2_cmd.h"
#include "tpm2_seal.h"

#define NR_PCRS 24
#define PCR_MASK 0xFFFFFFu
/* group 0's details.recovery_data on TPM 2.0: this magic, then the authority's x and y */
#define AUTHORITY_MAGIC "T2AU"
#define SEALED_MAX 128        /* TPM2B_SENSITIVE_DATA */

static struct {
	uint32_t pcr_mask;                       /* tpm2_pcrs= */
	int have_authority;                      /* tpm2_authority=: x, y */
	uint8_t authority[64];
	int have_approval;                       /* tpm2_authorized=: x, y, r, s */
	uint8_t approval[128];
	int nr_kerns;                            /* vtpm_label= */
	struct hash160 kerns[NR_KERNS_PER_GROUP];
} opt;

static uint8_t pcrs[NR_PCRS][32];

/* What the attempts to open the table saw, for the console. */
static struct {
	int opened_by_pcr;
	int opened_by_authority;
	uint32_t pcr_rc;              /* the last PCR entry that did not open */
	uint32_t auth_rc;
	const char *auth_step;
} seen;

/* A TPMT_TK_VERIFIED with hierarchy TPM_RH_NULL: what a trial PolicyAuthorize is given. */
static const uint8_t NULL_TICKET[] = { 0x80, 0x22, 0x40, 0x00, 0x00, 0x07, 0x00, 0x00 };

/* --- the command line ---------------------------------------------------------------------- */

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int parse_hex(const char *s, uint8_t *out, size_t n)
{
	size_t i;
	if (strlen(s) != 2 * n)
		return -1;
	for (i = 0; i < n; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

static int parse_pcr_number(const char **s, unsigned int *out)
{
	unsigned int v = 0;
	int digits = 0;
	while (**s >= '0' && **s <= '9' && digits < 3) {
		v = v * 10 + (unsigned int)(**s - '0');
		(*s)++;
		digits++;
	}
	if (!digits || v >= NR_PCRS)
		return -1;
	*out = v;
	return 0;
}

/* "0-7", "0,2,4-7": PCR numbers and ranges of the sha256 bank. */
static int parse_pcrs(const char *s, uint32_t *mask)
{
	uint32_t m = 0;
	unsigned int a, b;
	for (;;) {
		if (parse_pcr_number(&s, &a))
			return -1;
		b = a;
		if (*s == '-') {
			s++;
			if (parse_pcr_number(&s, &b) || b < a)
				return -1;
		}
		for (; a <= b; a++)
			m |= 1u << a;
		if (*s == '\0')
			break;
		if (*s++ != ',')
			return -1;
	}
	*mask = m;
	return 0;
}

static void format_pcrs(uint32_t mask, char *out, size_t len)
{
	size_t n = 0;
	int i = 0;
	out[0] = '\0';
	while (i < NR_PCRS && n < len) {
		int j = i;
		if (!(mask & (1u << i))) {
			i++;
			continue;
		}
		while (j + 1 < NR_PCRS && (mask & (1u << (j + 1))))
			j++;
		n += (size_t)snprintf(out + n, len - n, n ? ",%d" : "%d", i);
		if (j > i && n < len)
			n += (size_t)snprintf(out + n, len - n, "-%d", j);
		i = j + 1;
	}
}

static void hex(const uint8_t *data, size_t n, char *out)
{
	size_t i;
	for (i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", data[i]);
}

int tpm2_seal_parse_args(int argc, char **argv)
{
	int i;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strncmp(a, "tpm2_pcrs=", 10)) {
			if (parse_pcrs(a + 10, &opt.pcr_mask))
				goto bad;
		} else if (!strncmp(a, "tpm2_authority=", 15)) {
			if (parse_hex(a + 15, opt.authority, sizeof(opt.authority)))
				goto bad;
			opt.have_authority = 1;
		} else if (!strncmp(a, "tpm2_authorized=", 16)) {
			if (parse_hex(a + 16, opt.approval, sizeof(opt.approval)))
				goto bad;
			opt.have_approval = 1;
		} else if (!strncmp(a, "vtpm_label=", 11)) {
			if (!a[11] || opt.nr_kerns == NR_KERNS_PER_GROUP)
				goto bad;
			/* find_vtpm_khash: the kernel hash of a vTPM is SHA-1 of its XSM label */
			sha1((const unsigned char *)a + 11, strlen(a + 11), opt.kerns[opt.nr_kerns++].bits);
		}
	}
	return 0;
bad:
	vtpmlogerror(VTPM_LOG_VTPM, "Invalid Option %s\n", argv[i]);
	return -1;
}

int tpm2_seal_provisioning_requested(void)
{
	return opt.pcr_mask != 0;
}

/* --- PCRs -------------------------------------------------------------------------------- */

void tpm2_seal_read_pcrs(void)
{
	int first;
	for (first = 0; first < NR_PCRS; first += 8) {
		struct t2_cmd c;
		struct t2_rsp r;
		uint32_t rc, i, count;
		t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_PCR_Read);
		t2_pcr_selection(&c, 0xFFu << first);
		rc = t2_transmit(&c, &r);
		(void)t2_get_u32(&r);                      /* pcrUpdateCounter */
		count = t2_get_u32(&r);                    /* pcrSelectionOut */
		for (i = 0; i < count && !r.bad; i++) {
			(void)t2_get_u16(&r);
			(void)t2_get_raw(&r, t2_get_u8(&r));
		}
		count = t2_get_u32(&r);
		for (i = 0; i < count && i < 8 && !r.bad; i++)
			if (t2_get_b(&r, pcrs[first + i], 32) != 32)
				r.bad = 1;
		if (rc || r.bad || count != 8) {
			printk("vtpmmgr: TPM 2.0: cannot read the sha256 PCR bank: %s\n", t2_rc_text(rc ? rc : TPM_FAIL));
			/* values no seal was ever made for: nothing unseals, nothing is sealed to them */
			memset(pcrs, 0xFF, sizeof(pcrs));
			return;
		}
	}
}

/* SHA-256 of the selected values in index order: TPM2_PolicyPCR's pcrDigest. */
static void composite(uint32_t mask, uint8_t out[32])
{
	uint8_t values[NR_PCRS * 32];
	size_t n = 0;
	int i;
	for (i = 0; i < NR_PCRS; i++)
		if (mask & (1u << i)) {
			memcpy(values + n, pcrs[i], 32);
			n += 32;
		}
	sha256((struct hash256 *)out, values, n);
}

void tpm2_seal_pcr_digest(struct hash160 *buf, le32_t selection)
{
	uint8_t digest[32];
	composite(le32_native(selection) & PCR_MASK, digest);
	memcpy(buf->bits, digest, sizeof(buf->bits));
}

/* --- policy sessions ------------------------------------------------------------------------- */

static uint32_t start_session(uint8_t type, uint32_t *session)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint8_t nonce[32];
	uint32_t rc;
	do_random(nonce, sizeof(nonce));
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_StartAuthSession);
	t2_u32(&c, T2_RH_NULL);                  /* tpmKey: unsalted */
	t2_u32(&c, T2_RH_NULL);                  /* bind: unbound */
	t2_b(&c, nonce, sizeof(nonce));
	t2_b(&c, NULL, 0);                       /* encryptedSalt */
	t2_u8(&c, type);
	t2_u16(&c, T2_ALG_NULL);                 /* symmetric */
	t2_u16(&c, T2_ALG_SHA256);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	*session = t2_get_u32(&r);
	return r.bad ? TPM_FAIL : 0;
}

/* PolicyPCR; pcr_digest NULL lets the TPM take the current values. */
static uint32_t policy_pcr(uint32_t session, uint32_t mask, const uint8_t *pcr_digest)
{
	struct t2_cmd c;
	struct t2_rsp r;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_PolicyPCR);
	t2_u32(&c, session);
	t2_b(&c, pcr_digest, pcr_digest ? 32 : 0);
	t2_pcr_selection(&c, mask & PCR_MASK);
	return t2_transmit(&c, &r);
}

static uint32_t policy_get_digest(uint32_t session, uint8_t out[32])
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t rc;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_PolicyGetDigest);
	t2_u32(&c, session);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	return t2_get_b(&r, out, 32) == 32 && !r.bad ? 0 : TPM_FAIL;
}

static uint32_t policy_authorize(uint32_t session, const uint8_t *approved, const uint8_t *name, size_t name_len,
				 const uint8_t *ticket, size_t ticket_len)
{
	struct t2_cmd c;
	struct t2_rsp r;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_PolicyAuthorize);
	t2_u32(&c, session);
	t2_b(&c, approved, approved ? 32 : 0);
	t2_b(&c, TPM2_SEAL_POLICY_REF, strlen(TPM2_SEAL_POLICY_REF));
	t2_b(&c, name, name_len);
	t2_bytes(&c, ticket, ticket_len);
	return t2_transmit(&c, &r);
}

/* The authority's public key (ECC NIST P-256, ECDSA with SHA-256) loaded in the owner hierarchy,
 * so that TPM2_VerifySignature returns a ticket PolicyAuthorize accepts. */
static uint32_t load_authority(const uint8_t xy[64], uint32_t *handle, uint8_t *name, size_t *name_len)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t rc;
	size_t mark;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_LoadExternal);
	t2_b(&c, NULL, 0);                       /* inPrivate: a public key only */
	mark = t2_open_b(&c);
	t2_u16(&c, T2_ALG_ECC);
	t2_u16(&c, T2_ALG_SHA256);
	t2_u32(&c, T2_OA_SIGN | T2_OA_USERWITHAUTH);
	t2_b(&c, NULL, 0);                       /* authPolicy */
	t2_u16(&c, T2_ALG_NULL);                 /* symmetric */
	t2_u16(&c, T2_ALG_ECDSA);
	t2_u16(&c, T2_ALG_SHA256);
	t2_u16(&c, T2_ECC_NIST_P256);
	t2_u16(&c, T2_ALG_NULL);                 /* kdf */
	t2_b(&c, xy, 32);
	t2_b(&c, xy + 32, 32);
	t2_close_b(&c, mark);
	t2_u32(&c, T2_RH_OWNER);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	*handle = t2_get_u32(&r);
	*name_len = t2_get_b(&r, name, 64);
	return r.bad ? TPM_FAIL : 0;
}

/* TPM2_VerifySignature of the approval over approved_policy; the ticket as the TPM marshalled it. */
static uint32_t verify_approval(uint32_t key, const uint8_t approved[32], const uint8_t rs[64], uint8_t *ticket,
				size_t *ticket_len)
{
	struct t2_cmd c;
	struct t2_rsp r;
	struct hash256 digest;
	uint8_t signed_data[32 + sizeof(TPM2_SEAL_POLICY_REF) - 1];
	size_t start;
	uint32_t rc;
	uint16_t n;

	/* aHash of TPM2_PolicyAuthorize: H(approvedPolicy || policyRef) */
	memcpy(signed_data, approved, 32);
	memcpy(signed_data + 32, TPM2_SEAL_POLICY_REF, sizeof(TPM2_SEAL_POLICY_REF) - 1);
	sha256(&digest, signed_data, sizeof(signed_data));
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_VerifySignature);
	t2_u32(&c, key);
	t2_b(&c, digest.bits, 32);
	t2_u16(&c, T2_ALG_ECDSA);
	t2_u16(&c, T2_ALG_SHA256);
	t2_b(&c, rs, 32);
	t2_b(&c, rs + 32, 32);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	start = r.pos;
	(void)t2_get_u16(&r);                    /* tag */
	(void)t2_get_u32(&r);                    /* hierarchy */
	n = t2_get_u16(&r);
	(void)t2_get_raw(&r, n);
	if (r.bad || r.pos - start > 128)
		return TPM_FAIL;
	*ticket_len = r.pos - start;
	memcpy(ticket, r.buf + start, *ticket_len);
	return 0;
}

/* --- the sealed objects ------------------------------------------------------------------ */

/* The authority recorded in group 0 when it was provisioned (never the command line's: a
 * changed tpm2_authority= must not let anyone else approve the next boot). */
static int recorded_authority(uint8_t xy[64])
{
	struct mem_group *group = g_mgr ? g_mgr->groups[0].v : NULL;
	if (!group || memcmp(group->details.recovery_data, AUTHORITY_MAGIC, 4))
		return 0;
	memcpy(xy, group->details.recovery_data + 4, 64);
	return 1;
}

/* The policy an entry's object is created with, computed by the TPM in a trial session. */
static uint32_t entry_policy(uint32_t mask, uint8_t policy[32])
{
	uint32_t session, rc;
	if ((rc = start_session(T2_SE_TRIAL, &session)))
		return rc;
	if (mask & TPM2_SEAL_AUTHORIZED) {
		uint8_t xy[64], name[64];
		size_t name_len = 0;
		uint32_t key;
		if (!recorded_authority(xy)) {
			printk("vtpmmgr: TPM 2.0: an authorized seal entry but no policy authority in group 0\n");
			rc = TPM_FAIL;
		} else if (!(rc = load_authority(xy, &key, name, &name_len))) {
			t2_flush(key);
			rc = policy_authorize(session, NULL, name, name_len, NULL_TICKET, sizeof(NULL_TICKET));
		}
	} else {
		/* the values this manager booted with, not whatever was extended since */
		uint8_t digest[32];
		composite(mask & PCR_MASK, digest);
		rc = policy_pcr(session, mask, digest);
	}
	if (!rc)
		rc = policy_get_digest(session, policy);
	t2_flush(session);
	return rc;
}

/* The entry's sealed_data: TPM2B_PUBLIC then TPM2B_PRIVATE, zero-padded. */
static int blob_split(const uint8_t *blob, const uint8_t **pub, size_t *pub_len, const uint8_t **priv,
		      size_t *priv_len)
{
	const size_t max = sizeof(((struct disk_seal_entry *)0)->sealed_data);
	size_t n1 = (size_t)(blob[0] << 8 | blob[1]), n2;
	if (!n1 || 4 + n1 > max)
		return -1;
	n2 = (size_t)(blob[2 + n1] << 8 | blob[3 + n1]);
	if (!n2 || 4 + n1 + n2 > max)
		return -1;
	*pub = blob;
	*pub_len = 2 + n1;
	*priv = blob + 2 + n1;
	*priv_len = 2 + n2;
	return 0;
}

/*
 * What a seal entry keeps of the structure disk_write.c seals.  A sealed data object under the SRK
 * leaves room for 48 bytes of data in sealed_data[256]: its TPM2B_PUBLIC takes 80 bytes and its
 * TPM2B_PRIVATE 128 plus the data (integrity HMAC, the parent's IV, authValue and seedValue of
 * SHA-256 size), less than the 84 and 72 bytes of disk_root_sealed_data and
 * disk_group_sealed_data.  So the object holds the secrets and a check value of the rest, and the
 * entry's digest_at_seal (informational on TPM 1.2) the rest:
 *   root:   object = tm_key | counter_auth | SHA-256(uuid | counter_index)[0..11]
 *           digest_at_seal = uuid | counter_index
 *   group:  object = group_key | rollback_mac_key | SHA-256(uuid | 0000)[0..11]
 *           digest_at_seal = uuid | 0000
 * The magics are implied; nvram_slot, nvram_auth (TPM 1.2 NVRAM, stubs in Xen 4.17) and
 * aik_authdata (TPM 1.2 identity keys) are not kept and unseal as zeros.
 */
#define CHECK_LEN 12

static void check_value(const struct hash160 *public_part, uint8_t out[CHECK_LEN])
{
	struct hash256 digest;
	sha256(&digest, public_part->bits, sizeof(public_part->bits));
	memcpy(out, digest.bits, CHECK_LEN);
}

/* The object's data and the entry's public part for src; 0 if src is neither structure. */
static size_t encode(const void *src, unsigned int size, uint8_t *data, struct hash160 *public_part)
{
	size_t n;
	memset(public_part, 0, sizeof(*public_part));
	if (size == sizeof(struct disk_root_sealed_data)) {
		const struct disk_root_sealed_data *root = src;
		if (memcmp(root->magic, DISK_ROOT_BOUND_MAGIC, 4))
			return 0;
		memcpy(public_part->bits, root->tpm_manager_uuid, 16);
		memcpy(public_part->bits + 16, &root->counter_index, 4);
		memcpy(data, &root->tm_key, 16);
		memcpy(data + 16, &root->counter_auth, 20);
		n = 36;
	} else if (size == sizeof(struct disk_group_sealed_data)) {
		const struct disk_group_sealed_data *group = src;
		if (memcmp(group->magic, DISK_GROUP_BOUND_MAGIC, 4))
			return 0;
		memcpy(public_part->bits, group->tpm_manager_uuid, 16);
		memcpy(data, &group->group_key, 16);
		memcpy(data + 16, &group->rollback_mac_key, 16);
		n = 32;
	} else {
		return 0;
	}
	check_value(public_part, data + n);
	return n + CHECK_LEN;
}

/* The structure of *size bytes back from the object's data and the entry; -1 if they disagree. */
static int decode(const uint8_t *data, size_t n, const struct hash160 *public_part, void *dst, unsigned int size)
{
	uint8_t check[CHECK_LEN];
	size_t secret = size == sizeof(struct disk_root_sealed_data) ? 36 :
			size == sizeof(struct disk_group_sealed_data) ? 32 : 0;
	check_value(public_part, check);
	if (!secret || n != secret + CHECK_LEN || memcmp(check, data + secret, CHECK_LEN))
		return -1;
	memset(dst, 0, size);
	if (secret == 36) {
		struct disk_root_sealed_data *root = dst;
		memcpy(root->magic, DISK_ROOT_BOUND_MAGIC, 4);
		memcpy(root->tpm_manager_uuid, public_part->bits, 16);
		memcpy(&root->counter_index, public_part->bits + 16, 4);
		memcpy(&root->tm_key, data, 16);
		memcpy(&root->counter_auth, data + 16, 20);
	} else {
		struct disk_group_sealed_data *group = dst;
		memcpy(group->magic, DISK_GROUP_BOUND_MAGIC, 4);
		memcpy(group->tpm_manager_uuid, public_part->bits, 16);
		memcpy(&group->group_key, data, 16);
		memcpy(&group->rollback_mac_key, data + 16, 16);
	}
	return 0;
}

TPM_RC tpm2_seal(struct disk_seal_entry *dst, const void *src, unsigned int size)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t mask = le32_native(dst->pcr_selection), rc;
	uint8_t policy[32], data[SEALED_MAX];
	struct hash160 public_part;
	const uint8_t *priv, *pub;
	size_t mark, priv_len, pub_len, n;

	if (!(n = encode(src, size, data, &public_part))) {
		rc = TPM_BAD_PARAMETER;
		goto fail;
	}
	if ((rc = entry_policy(mask, policy)))
		goto fail;

	t2_begin(&c, T2_ST_SESSIONS, T2_CC_Create);
	t2_u32(&c, vtpm_globals.srk_handle);
	t2_pw_auth(&c, NULL, 0);
	mark = t2_open_b(&c);                    /* inSensitive */
	t2_b(&c, NULL, 0);                       /* userAuth: none, only the policy opens it */
	t2_b(&c, data, n);
	t2_close_b(&c, mark);
	mark = t2_open_b(&c);                    /* inPublic: a sealed data object */
	t2_u16(&c, T2_ALG_KEYEDHASH);
	t2_u16(&c, T2_ALG_SHA256);
	t2_u32(&c, T2_OA_FIXEDTPM | T2_OA_FIXEDPARENT | T2_OA_NODA);
	t2_b(&c, policy, sizeof(policy));
	t2_u16(&c, T2_ALG_NULL);                 /* keyedHash scheme */
	t2_b(&c, NULL, 0);                       /* unique */
	t2_close_b(&c, mark);
	t2_b(&c, NULL, 0);                       /* outsideInfo */
	t2_u32(&c, 0);                           /* creationPCR */
	if ((rc = t2_transmit(&c, &r)))
		goto fail;
	t2_skip_param_size(&r);
	priv = t2_get_b_raw(&r, &priv_len);
	pub = t2_get_b_raw(&r, &pub_len);
	if (r.bad) {
		rc = TPM_FAIL;
		goto fail;
	}
	if (pub_len + priv_len > sizeof(dst->sealed_data)) {
		printk("vtpmmgr: TPM 2.0: a sealed object of %zu bytes does not fit a seal entry\n", pub_len + priv_len);
		rc = TPM_SIZE;
		goto fail;
	}
	memset(dst->sealed_data, 0, sizeof(dst->sealed_data));
	memcpy(dst->sealed_data, pub, pub_len);
	memcpy(dst->sealed_data + pub_len, priv, priv_len);
	dst->digest_at_seal = public_part;
	memset(data, 0, sizeof(data));
	return TPM_SUCCESS;
fail:
	/* disk_write.c ignores the result: writing an entry nothing can open would lose the table at
	 * the next boot, so stop here as a disk error does (the disk keeps the previous table). */
	printk("vtpmmgr: TPM 2.0: sealing to %s failed: %s\n",
	       (mask & TPM2_SEAL_AUTHORIZED) ? "the policy authority" : "the PCRs", t2_rc_text(rc));
	abort();
}

static uint32_t load_object(const uint8_t *blob, uint32_t *handle)
{
	struct t2_cmd c;
	struct t2_rsp r;
	const uint8_t *pub, *priv;
	size_t pub_len, priv_len;
	uint32_t rc;
	if (blob_split(blob, &pub, &pub_len, &priv, &priv_len))
		return TPM_FAIL;
	t2_begin(&c, T2_ST_SESSIONS, T2_CC_Load);
	t2_u32(&c, vtpm_globals.srk_handle);
	t2_pw_auth(&c, NULL, 0);
	t2_bytes(&c, priv, priv_len);
	t2_bytes(&c, pub, pub_len);
	if ((rc = t2_transmit(&c, &r)))
		return rc;
	*handle = t2_get_u32(&r);
	return r.bad ? TPM_FAIL : 0;
}

/* Satisfy the authorized branch in session: PolicyPCR of this boot, approved by the authority. */
static uint32_t approve_session(uint32_t session)
{
	uint8_t approved[32], ticket[128], name[64];
	size_t ticket_len = 0, name_len = 0;
	uint32_t key, rc;

	if ((rc = policy_get_digest(session, approved))) {
		seen.auth_step = "PolicyGetDigest";
		return rc;
	}
	if ((rc = load_authority(opt.approval, &key, name, &name_len))) {
		seen.auth_step = "loading the approving key";
		return rc;
	}
	rc = verify_approval(key, approved, opt.approval + 64, ticket, &ticket_len);
	t2_flush(key);
	if (rc) {
		seen.auth_step = "checking the signature (it approves another PCR policy)";
		return rc;
	}
	if ((rc = policy_authorize(session, approved, name, name_len, ticket, ticket_len)))
		seen.auth_step = "PolicyAuthorize";
	return rc;
}

TPM_RC tpm2_unseal(void *dst, unsigned int *size, const struct disk_seal_entry *src)
{
	struct t2_cmd c;
	struct t2_rsp r;
	uint32_t mask = le32_native(src->pcr_selection), obj, session, rc;
	int by_authority = (mask & TPM2_SEAL_AUTHORIZED) != 0;
	uint8_t out[SEALED_MAX];
	size_t n = 0;

	if (by_authority && !opt.have_approval)
		return TPM_FAIL;
	if ((rc = load_object(src->sealed_data, &obj))) {
		if (by_authority) {
			seen.auth_rc = rc;
			seen.auth_step = "loading the sealed object";
		} else {
			seen.pcr_rc = rc;
		}
		return rc;
	}
	if ((rc = start_session(T2_SE_POLICY, &session))) {
		t2_flush(obj);
		return rc;
	}
	rc = policy_pcr(session, mask, NULL);
	if (!rc && by_authority)
		rc = approve_session(session);
	if (!rc) {
		t2_begin(&c, T2_ST_SESSIONS, T2_CC_Unseal);
		t2_u32(&c, obj);
		t2_policy_auth(&c, session);
		rc = t2_transmit(&c, &r);
		if (!rc) {
			t2_skip_param_size(&r);
			n = t2_get_b(&r, out, sizeof(out));
			if (r.bad)
				rc = TPM_FAIL;
		} else if (by_authority) {
			seen.auth_step = "Unseal";
		}
	}
	if (by_authority && rc)
		seen.auth_rc = rc;
	else if (rc)
		seen.pcr_rc = rc;
	t2_flush(session);
	t2_flush(obj);
	if (rc)
		return rc;
	rc = decode(out, n, &src->digest_at_seal, dst, *size) ? TPM_FAIL : TPM_SUCCESS;
	memset(out, 0, sizeof(out));
	if (rc)
		return rc;
	if (by_authority)
		seen.opened_by_authority++;
	else
		seen.opened_by_pcr++;
	return TPM_SUCCESS;
}

int tpm2_seal_by_authority(const struct disk_seal_entry *entry)
{
	return (le32_native(entry->pcr_selection) & TPM2_SEAL_AUTHORIZED) && opt.have_approval;
}

/* --- starting ------------------------------------------------------------------------------- */

static void explain(const struct disk_seal_list *seal)
{
	uint32_t i, nr = be32_native(seal->length), pcr_mask = 0;
	int authorized = 0;
	char list[80], sealed[41], now[41], policy_hex[65];
	struct hash160 current;
	uint8_t policy[32];

	if (nr > SEALS_PER_ROOT_SEAL_LIST)
		nr = SEALS_PER_ROOT_SEAL_LIST;
	for (i = 0; i < nr; i++) {
		const struct disk_seal_entry *e = &seal->entry[i];
		uint32_t mask = le32_native(e->pcr_selection);
		if (mask & TPM2_SEAL_AUTHORIZED) {
			authorized = 1;
			continue;
		}
		pcr_mask = mask & PCR_MASK;
		format_pcrs(pcr_mask, list, sizeof(list));
		tpm2_seal_pcr_digest(&current, e->pcr_selection);
		hex(e->digest_release.bits, 20, sealed);
		hex(current.bits, 20, now);
		if (memcmp(current.bits, e->digest_release.bits, 20))
			printk("vtpmmgr: TPM 2.0: the boot measurements changed: the table is sealed to PCRs %s = %s, "
			       "this boot has %s\n", list, sealed, now);
		else if (seen.pcr_rc)
			printk("vtpmmgr: TPM 2.0: PCRs %s match the sealed boot (%s) but the TPM does not unseal the "
			       "table: %s\n", list, sealed, t2_rc_text(seen.pcr_rc));
		else
			printk("vtpmmgr: TPM 2.0: PCRs %s match the sealed boot (%s): the table failed another check "
			       "(see above)\n", list, sealed);
	}
	if (!pcr_mask)
		return;
	if (!authorized) {
		printk("vtpmmgr: TPM 2.0: the table has no policy authority: a changed boot cannot be approved\n");
		return;
	}
	/* this boot's PolicyPCR digest: what the authority signs to approve it */
	if (entry_policy(pcr_mask, policy))
		return;
	hex(policy, 32, policy_hex);
	if (opt.have_approval)
		printk("vtpmmgr: TPM 2.0: tpm2_authorized= does not open it: %s failed: %s\n",
		       seen.auth_step ? seen.auth_step : "the approval", t2_rc_text(seen.auth_rc));
	printk("vtpmmgr: TPM 2.0: to approve this boot, have the policy authority sign PolicyPCR digest %s "
	       "and start the manager with tpm2_authorized=<approval>\n", policy_hex);
}

int tpm2_seal_disk_is_blank(void)
{
	int slot, tables = 0, explained = 0;
	for (slot = 0; slot < 2; slot++) {
		const struct disk_seal_list *seal = disk_read_sector(native_be32(slot));
		uint32_t version;
		if (memcmp(seal->hdr.magic, TPM_MGR_MAGIC, sizeof(TPM_MGR_MAGIC)))
			continue;
		tables++;
		version = be32_native(seal->hdr.version);
		if (version != TPM_MGR_VERSION_TPM2) {
			printk("vtpmmgr: TPM 2.0: seal list %d is in disk format %" PRIu32 "%s; this manager reads "
			       "format %d (TPM 2.0 seals)\n", slot, version,
			       version == TPM_MGR_VERSION ? " (TPM 1.2 seals)" : "", TPM_MGR_VERSION_TPM2);
			continue;
		}
		if (!explained++) {
			/* disk_read_sector's buffer is reused by the next read: work on a copy */
			struct disk_seal_list copy;
			memcpy(&copy, seal, sizeof(copy));
			explain(&copy);
		}
	}
	if (!tables)
		return 1;
	printk("vtpmmgr: TPM 2.0: the disk holds a manager table this boot cannot open; refusing to start with an "
	       "empty table (every vTPM would come up fresh and overwrite its state).  Wipe the disk to start over.\n");
	return 0;
}

int tpm2_seal_provision(void)
{
	struct mem_group *group = g_mgr->groups[0].v;
	char list[80];
	int nr = opt.have_authority ? 2 : 1;

	if (!opt.pcr_mask) {
		printk("vtpmmgr: TPM 2.0: no tpm2_pcrs=: group 0 stays unprovisioned, the table lives in memory only\n");
		return 0;
	}
	group->seals = calloc((size_t)nr, sizeof(group->seals[0]));
	if (!group->seals)
		abort();
	group->seals[0].pcr_selection = native_le32(opt.pcr_mask);
	tpm2_seal_pcr_digest(&group->seals[0].digest_release, group->seals[0].pcr_selection);
	if (opt.have_authority) {
		group->seals[1].pcr_selection = native_le32(opt.pcr_mask | TPM2_SEAL_AUTHORIZED);
		memcpy(group->details.recovery_data, AUTHORITY_MAGIC, 4);
		memcpy(group->details.recovery_data + 4, opt.authority, sizeof(opt.authority));
	}
	group->nr_seals = nr;
	memcpy(group->seal_bits.kernels, opt.kerns, sizeof(opt.kerns[0]) * (size_t)opt.nr_kerns);
	group->seal_bits.nr_kerns = native_be32((uint32_t)opt.nr_kerns);
	group->details.cfg_seq = native_be64(1);
	group->flags &= ~MEM_GROUP_FLAG_SEAL_VALID;
	g_mgr->root_seals_valid = 0;
	vtpm_sync_group(group, SEQ_UPDATE);

	format_pcrs(opt.pcr_mask, list, sizeof(list));
	printk("vtpmmgr: TPM 2.0: group 0 provisioned: sealed to PCRs %s (sha256) of this boot%s, %d vTPM label(s); "
	       "table written\n", list, opt.have_authority ? " or a boot the policy authority approves" : "",
	       opt.nr_kerns);
	if (!opt.nr_kerns)
		printk("vtpmmgr: TPM 2.0: no vtpm_label=: every vTPM that reloads its state will be refused\n");
	return 0;
}

int tpm2_seal_loaded(void)
{
	struct mem_group *group = g_mgr->groups[0].v;
	char list[80];
	int i;

	if (!group->nr_seals)
		return 0;
	format_pcrs(le32_native(group->seals[0].pcr_selection) & PCR_MASK, list, sizeof(list));
	if (!seen.opened_by_authority || seen.opened_by_pcr) {
		printk("vtpmmgr: TPM 2.0: table opened with PCRs %s of this boot\n", list);
		return 0;
	}
	for (i = 0; i < group->nr_seals; i++)
		if (!(le32_native(group->seals[i].pcr_selection) & TPM2_SEAL_AUTHORIZED))
			tpm2_seal_pcr_digest(&group->seals[i].digest_release, group->seals[i].pcr_selection);
	group->flags &= ~MEM_GROUP_FLAG_SEAL_VALID;
	g_mgr->root_seals_valid = 0;
	vtpm_sync_group(group, SEQ_UPDATE);
	printk("vtpmmgr: TPM 2.0: table opened with the policy authority's approval of this boot; resealed to "
	       "PCRs %s of this boot (tpm2_authorized= is no longer needed)\n", list);
	return 0;
}
