/*
 * vtpmmgr transfer extension: TPM 2.0 commands for a move (see xfer_tpm2.h).  Marshalled here,
 * big-endian as every TPM 2.0 structure (TPM 2.0 Library, Part 1 §18), so that the same bytes go to a
 * hardware TPM from mini-os and to the simulator's swtpm natively.
 */
#include <stdio.h>
#include <string.h>

#include "xfer_tpm2.h"

#define ST_NO_SESSIONS 0x8001
#define ST_SESSIONS 0x8002
#define CC_CREATE_PRIMARY 0x00000131
#define CC_ECDH_ZGEN 0x00000154
#define CC_ECDH_KEYGEN 0x00000163
#define CC_FLUSH_CONTEXT 0x00000165
#define CC_LOAD_EXTERNAL 0x00000167
#define RH_OWNER 0x40000001
#define RH_NULL 0x40000007
#define RS_PW 0x40000009
#define ALG_ECC 0x0023
#define ALG_SHA256 0x000B
#define ALG_NULL 0x0010
#define ALG_ECDH 0x0019
#define ECC_NIST_P256 0x0003
/* fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA | decrypt */
#define TRANSFER_KEY_ATTRS 0x00020472u
/* userWithAuth | decrypt: a public key only, for ECDH_KeyGen */
#define PEER_KEY_ATTRS 0x00020040u
#define RC_INITIALIZE 0x00000100u       /* TPM_RC_INITIALIZE: the TPM was not started */
#define RC_FMT1 0x00000080u             /* a format-one code: the low six bits name the error */
#define RC_ECC_POINT 0x27u              /* TPM_RC_ECC_POINT: not a point on the key's curve */
#define BUF_SIZE 1024

struct msg {
	uint8_t b[BUF_SIZE];
	size_t len, pos;
	int bad;
};

static void put(struct msg *m, const void *data, size_t n)
{
	if (m->len + n > sizeof(m->b)) {
		m->bad = 1;
		return;
	}
	memcpy(m->b + m->len, data, n);
	m->len += n;
}

static void put8(struct msg *m, uint8_t v)
{
	put(m, &v, 1);
}

static void put16(struct msg *m, uint16_t v)
{
	uint8_t b[2] = { v >> 8, v & 0xff };
	put(m, b, 2);
}

static void put32(struct msg *m, uint32_t v)
{
	uint8_t b[4] = { v >> 24, (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff };
	put(m, b, 4);
}

static const uint8_t *get(struct msg *m, size_t n)
{
	const uint8_t *p = m->b + m->pos;
	if (m->bad || m->pos + n > m->len) {
		m->bad = 1;
		return NULL;
	}
	m->pos += n;
	return p;
}

static uint32_t get_be(struct msg *m, size_t n)
{
	const uint8_t *p = get(m, n);
	uint32_t v = 0;
	size_t i;
	for (i = 0; p && i < n; i++)
		v = v << 8 | p[i];
	return v;
}

/* A TPM2B_ECC_PARAMETER of exactly 32 bytes (a P-256 coordinate). */
static void get_coord(struct msg *m, uint8_t out[32])
{
	const uint8_t *p;
	if (get_be(m, 2) != 32) {
		m->bad = 1;
		return;
	}
	p = get(m, 32);
	if (p)
		memcpy(out, p, 32);
}

/* TPM2B_ECC_POINT */
static void put_point(struct msg *m, const uint8_t q[XFER_POINT_SIZE])
{
	put16(m, 2 + 32 + 2 + 32);
	put16(m, 32);
	put(m, q, 32);
	put16(m, 32);
	put(m, q + 32, 32);
}

static void get_point(struct msg *m, uint8_t q[XFER_POINT_SIZE])
{
	if (get_be(m, 2) != 2 + 32 + 2 + 32) {
		m->bad = 1;
		return;
	}
	get_coord(m, q);
	get_coord(m, q + 32);
}

/* Z, the x coordinate of the shared point that comes next in an answer. */
static int read_z(struct msg *rsp, uint8_t z[32])
{
	uint8_t point[XFER_POINT_SIZE];
	get_point(rsp, point);
	memcpy(z, point, 32);
	memset(point, 0, sizeof(point));
	return rsp->bad ? -1 : 0;
}

/* TPMT_PUBLIC of an ECC P-256 key with the ECDH scheme; unique = x only (a primary's seed
 * input) or the whole point (an external public key). */
static void put_public(struct msg *m, uint32_t attrs, const uint8_t *x, const uint8_t *y)
{
	size_t mark = m->len;
	put16(m, 0);                    /* TPM2B size, patched below */
	put16(m, ALG_ECC);
	put16(m, ALG_SHA256);
	put32(m, attrs);
	put16(m, 0);                    /* authPolicy */
	put16(m, ALG_NULL);             /* symmetric */
	put16(m, ALG_ECDH);
	put16(m, ALG_SHA256);
	put16(m, ECC_NIST_P256);
	put16(m, ALG_NULL);             /* kdf */
	put16(m, 32);
	put(m, x, 32);
	put16(m, y ? 32 : 0);
	if (y)
		put(m, y, 32);
	if (!m->bad) {
		size_t n = m->len - mark - 2;
		m->b[mark] = n >> 8;
		m->b[mark + 1] = n & 0xff;
	}
}

/* The unique field of TPMT_PUBLIC's ECC layout after its fixed part: skip to it in a response. */
static void get_public_point(struct msg *m, uint8_t q[XFER_POINT_SIZE])
{
	size_t size = get_be(m, 2), start = m->pos;
	get(m, 2 + 2 + 4);                       /* type, nameAlg, attributes */
	get(m, get_be(m, 2));                    /* authPolicy */
	if (get_be(m, 2) != ALG_NULL || get_be(m, 2) != ALG_ECDH) {
		m->bad = 1;                          /* not the template we asked for */
		return;
	}
	get(m, 2 + 2 + 2);                       /* scheme hash, curve, kdf (NULL) */
	get_coord(m, q);
	get_coord(m, q + 32);
	if (!m->bad && m->pos - start != size)
		m->bad = 1;
}

static void begin(struct msg *m, uint16_t tag, uint32_t cc)
{
	memset(m, 0, sizeof(*m));
	put16(m, tag);
	put32(m, 0);                    /* commandSize, patched by run() */
	put32(m, cc);
}

/* An empty password session (TPM_RS_PW): the owner hierarchy and the transfer key have no auth. */
static void put_pw_session(struct msg *m)
{
	put32(m, 9);                    /* authorizationSize */
	put32(m, RS_PW);
	put16(m, 0);                    /* nonce */
	put8(m, 0);                     /* sessionAttributes */
	put16(m, 0);                    /* hmac: the empty password */
}

static int run(struct msg *cmd, struct msg *rsp, const char *what, char *err, size_t errlen)
{
	uint32_t rc;
	if (cmd->bad) {
		snprintf(err, errlen, "%s: command too long", what);
		return -1;
	}
	cmd->b[2] = cmd->len >> 24;
	cmd->b[3] = (cmd->len >> 16) & 0xff;
	cmd->b[4] = (cmd->len >> 8) & 0xff;
	cmd->b[5] = cmd->len & 0xff;
	memset(rsp, 0, sizeof(*rsp));
	rsp->len = sizeof(rsp->b);
	if (xfer_tpm_transmit(cmd->b, cmd->len, rsp->b, &rsp->len)) {
		snprintf(err, errlen, "%s: the physical TPM did not answer", what);
		return -1;
	}
	get(rsp, 2);
	if (get_be(rsp, 4) != rsp->len || rsp->bad) {
		snprintf(err, errlen, "%s: malformed answer from the physical TPM", what);
		return -1;
	}
	rc = get_be(rsp, 4);
	if ((rc & RC_FMT1) && (rc & 0x3f) == RC_ECC_POINT) {
		snprintf(err, errlen, "%s: the point is not on the curve (TPM_RC_ECC_POINT): altered", what);
		return -1;
	}
	if (rc) {
		/* A TPM 1.2 answers a TPM 2.0 command with a 1.2 error code (below 0x100). */
		snprintf(err, errlen, "%s: the physical TPM refused (rc 0x%x)%s", what, rc,
			 rc < RC_INITIALIZE ? "; the transfer needs a TPM 2.0 (TPM2_ECDH_ZGen)" : "");
		return -1;
	}
	return 0;
}

static void flush(uint32_t handle)
{
	struct msg cmd, rsp;
	char ignored[8];
	begin(&cmd, ST_NO_SESSIONS, CC_FLUSH_CONTEXT);
	put32(&cmd, handle);
	run(&cmd, &rsp, "FlushContext", ignored, sizeof(ignored));
}

/* One operation's hold on the TPM (a connection natively, nothing on mini-os). */
static int begin_op(char *err, size_t errlen)
{
	if (!xfer_tpm_begin())
		return 0;
	snprintf(err, errlen, "cannot reach the physical TPM");
	return -1;
}

static const uint8_t transfer_seed[32] = "xen-vtpm manager transfer key v1";

/* CreatePrimary of the transfer key: its handle and public point. */
static int create_transfer_key(uint32_t *handle, uint8_t q[XFER_POINT_SIZE], char *err, size_t errlen)
{
	struct msg cmd, rsp;
	begin(&cmd, ST_SESSIONS, CC_CREATE_PRIMARY);
	put32(&cmd, RH_OWNER);
	put_pw_session(&cmd);
	put16(&cmd, 4);                 /* inSensitive: no userAuth, no data */
	put16(&cmd, 0);
	put16(&cmd, 0);
	put_public(&cmd, TRANSFER_KEY_ATTRS, transfer_seed, NULL);
	put16(&cmd, 0);                 /* outsideInfo */
	put32(&cmd, 0);                 /* creationPCR */
	if (run(&cmd, &rsp, "CreatePrimary (transfer key)", err, errlen))
		return -1;
	*handle = get_be(&rsp, 4);
	get_be(&rsp, 4);                /* parameterSize */
	get_public_point(&rsp, q);
	if (rsp.bad) {
		flush(*handle);
		snprintf(err, errlen, "CreatePrimary (transfer key): unexpected public area");
		return -1;
	}
	return 0;
}

int xfer_tpm_public(uint8_t q[XFER_POINT_SIZE], char *err, size_t errlen)
{
	uint32_t handle;
	int rc;
	if (begin_op(err, errlen))
		return -1;
	rc = create_transfer_key(&handle, q, err, errlen);
	if (!rc)
		flush(handle);
	xfer_tpm_end();
	return rc;
}

int xfer_tpm_zgen(const uint8_t eph[XFER_POINT_SIZE], uint8_t q[XFER_POINT_SIZE], uint8_t z[32],
		  char *err, size_t errlen)
{
	struct msg cmd, rsp;
	uint32_t handle;
	int rc = -1;
	if (begin_op(err, errlen))
		return -1;
	if (create_transfer_key(&handle, q, err, errlen))
		goto out;
	begin(&cmd, ST_SESSIONS, CC_ECDH_ZGEN);
	put32(&cmd, handle);
	put_pw_session(&cmd);
	put_point(&cmd, eph);
	/* A point off the curve is refused by the TPM (TPM_RC_ECC_POINT): the envelope is bad. */
	if (!run(&cmd, &rsp, "ECDH_ZGen", err, errlen)) {
		get_be(&rsp, 4);            /* parameterSize */
		rc = read_z(&rsp, z);
		if (rc)
			snprintf(err, errlen, "ECDH_ZGen: malformed point in the answer");
	}
	flush(handle);
out:
	xfer_tpm_end();
	return rc;
}

int xfer_tpm_keygen(const uint8_t peer[XFER_POINT_SIZE], uint8_t eph[XFER_POINT_SIZE], uint8_t z[32],
		    char *err, size_t errlen)
{
	struct msg cmd, rsp;
	uint32_t handle;
	int rc = -1;
	if (begin_op(err, errlen))
		return -1;
	begin(&cmd, ST_NO_SESSIONS, CC_LOAD_EXTERNAL);
	put16(&cmd, 0);                 /* inPrivate: none */
	put_public(&cmd, PEER_KEY_ATTRS, peer, peer + 32);
	put32(&cmd, RH_NULL);
	/* The TPM checks the point is on the curve (TPM_RC_ECC_POINT): no invalid-curve attack. */
	if (run(&cmd, &rsp, "LoadExternal (recipient key)", err, errlen))
		goto out;
	handle = get_be(&rsp, 4);
	begin(&cmd, ST_NO_SESSIONS, CC_ECDH_KEYGEN);
	put32(&cmd, handle);
	if (!run(&cmd, &rsp, "ECDH_KeyGen", err, errlen)) {
		rc = read_z(&rsp, z);       /* zPoint */
		get_point(&rsp, eph);       /* pubPoint */
		if (rc || rsp.bad) {
			rc = -1;
			snprintf(err, errlen, "ECDH_KeyGen: malformed points in the answer");
		}
	}
	flush(handle);
out:
	xfer_tpm_end();
	return rc;
}
