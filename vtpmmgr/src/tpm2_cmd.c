/*
 * vtpmmgr TPM 2.0 persistence: command building and bounded response parsing
 * over tpm.c's TPM_TransmitData (see tpm2_cmd.h).
 */
#include <stdio.h>
#include <string.h>

#include <mini-os/sched.h>

#include "tcg.h"
#include "tpm.h"
#include "tpm2_cmd.h"

void t2_begin(struct t2_cmd *c, uint16_t tag, uint32_t cc)
{
	c->len = 0;
	c->overflow = 0;
	t2_u16(c, tag);
	t2_u32(c, 0);
	t2_u32(c, cc);
}

void t2_bytes(struct t2_cmd *c, const void *p, size_t n)
{
	if (!n)
		return;
	if (c->overflow || n > sizeof(c->buf) - c->len) {
		c->overflow = 1;
		return;
	}
	memcpy(c->buf + c->len, p, n);
	c->len += n;
}

void t2_u8(struct t2_cmd *c, uint8_t v)
{
	t2_bytes(c, &v, 1);
}

void t2_u16(struct t2_cmd *c, uint16_t v)
{
	uint8_t b[2] = { v >> 8, v };
	t2_bytes(c, b, 2);
}

void t2_u32(struct t2_cmd *c, uint32_t v)
{
	uint8_t b[4] = { v >> 24, v >> 16, v >> 8, v };
	t2_bytes(c, b, 4);
}

void t2_b(struct t2_cmd *c, const void *p, size_t n)
{
	if (n > 0xFFFF) {
		c->overflow = 1;
		return;
	}
	t2_u16(c, (uint16_t)n);
	t2_bytes(c, p, n);
}

size_t t2_open_b(struct t2_cmd *c)
{
	size_t mark = c->len;
	t2_u16(c, 0);
	return mark;
}

void t2_close_b(struct t2_cmd *c, size_t mark)
{
	size_t n = c->len - mark - 2;
	if (c->overflow || n > 0xFFFF) {
		c->overflow = 1;
		return;
	}
	c->buf[mark] = (uint8_t)(n >> 8);
	c->buf[mark + 1] = (uint8_t)n;
}

void t2_pw_auth(struct t2_cmd *c, const void *pw, size_t n)
{
	t2_u32(c, 4 + 2 + 1 + 2 + (uint32_t)n);   /* authorizationSize */
	t2_u32(c, T2_RS_PW);
	t2_b(c, NULL, 0);                          /* nonceCaller */
	t2_u8(c, 0);                               /* sessionAttributes */
	t2_b(c, pw, n);
}

void t2_policy_auth(struct t2_cmd *c, uint32_t session)
{
	t2_u32(c, 4 + 2 + 1 + 2);
	t2_u32(c, session);
	t2_b(c, NULL, 0);
	t2_u8(c, 0);                               /* continueSession clear */
	t2_b(c, NULL, 0);                          /* no HMAC: the policy needs no authValue */
}

void t2_pcr_selection(struct t2_cmd *c, uint32_t mask)
{
	t2_u32(c, 1);
	t2_u16(c, T2_ALG_SHA256);
	t2_u8(c, 3);
	t2_u8(c, mask & 0xFF);
	t2_u8(c, (mask >> 8) & 0xFF);
	t2_u8(c, (mask >> 16) & 0xFF);
}

/* Warnings after which the same command is sent again: TPM_RC_RETRY (e.g. the first use of a
 * dictionary-attack protected object after a startup, while the TPM records that in NV) and
 * TPM_RC_NV_RATE (NV writes throttled: wait a little first). */
#define RC_NV_RATE 0x920
#define RC_RETRY 0x922
#define MAX_TRIES 50

static uint32_t transmit_once(struct t2_cmd *c, struct t2_rsp *r)
{
	UINT32 outlen = sizeof(r->buf);
	uint32_t size;

	r->len = r->pos = 0;
	r->bad = 0;
	r->rc = TPM_FAIL;
	if (TPM_TransmitData(c->buf, (UINT32)c->len, r->buf, &outlen) != TPM_SUCCESS || outlen < 10)
		return TPM_FAIL;
	r->len = outlen;
	size = ((uint32_t)r->buf[2] << 24) | ((uint32_t)r->buf[3] << 16) | ((uint32_t)r->buf[4] << 8) | r->buf[5];
	if (size != outlen)
		return TPM_FAIL;
	r->pos = 6;
	r->rc = t2_get_u32(r);
	return r->rc;
}

uint32_t t2_transmit(struct t2_cmd *c, struct t2_rsp *r)
{
	uint32_t rc = TPM_FAIL;
	int tries;

	if (c->overflow || c->len < 10) {
		r->len = r->pos = 0;
		r->bad = 1;
		r->rc = TPM_FAIL;
		return TPM_FAIL;
	}
	c->buf[2] = c->len >> 24;
	c->buf[3] = c->len >> 16;
	c->buf[4] = c->len >> 8;
	c->buf[5] = c->len;
	for (tries = 0; tries < MAX_TRIES; tries++) {
		rc = transmit_once(c, r);
		if (rc == RC_NV_RATE)
			msleep(20);
		else if (rc != RC_RETRY)
			break;
	}
	return rc;
}

const uint8_t *t2_get_raw(struct t2_rsp *r, size_t n)
{
	const uint8_t *p;
	if (r->bad || n > r->len - r->pos) {
		r->bad = 1;
		return NULL;
	}
	p = r->buf + r->pos;
	r->pos += n;
	return p;
}

const uint8_t *t2_get_b_raw(struct t2_rsp *r, size_t *len)
{
	size_t start = r->pos;
	uint16_t n = t2_get_u16(r);
	if (!t2_get_raw(r, n)) {
		*len = 0;
		return NULL;
	}
	*len = 2 + (size_t)n;
	return r->buf + start;
}

void t2_get_bytes(struct t2_rsp *r, void *out, size_t n)
{
	const uint8_t *p = t2_get_raw(r, n);
	if (p)
		memcpy(out, p, n);
	else
		memset(out, 0, n);
}

uint8_t t2_get_u8(struct t2_rsp *r)
{
	const uint8_t *p = t2_get_raw(r, 1);
	return p ? p[0] : 0;
}

uint16_t t2_get_u16(struct t2_rsp *r)
{
	const uint8_t *p = t2_get_raw(r, 2);
	return p ? (uint16_t)((p[0] << 8) | p[1]) : 0;
}

uint32_t t2_get_u32(struct t2_rsp *r)
{
	const uint8_t *p = t2_get_raw(r, 4);
	return p ? ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3] : 0;
}

uint64_t t2_get_u64(struct t2_rsp *r)
{
	uint64_t hi = t2_get_u32(r);
	return (hi << 32) | t2_get_u32(r);
}

size_t t2_get_b(struct t2_rsp *r, void *out, size_t max)
{
	uint16_t n = t2_get_u16(r);
	const uint8_t *p;
	if (n > max) {
		r->bad = 1;
		return 0;
	}
	p = t2_get_raw(r, n);
	if (!p)
		return 0;
	memcpy(out, p, n);
	return n;
}

void t2_skip_param_size(struct t2_rsp *r)
{
	(void)t2_get_u32(r);
}

void t2_flush(uint32_t handle)
{
	struct t2_cmd c;
	struct t2_rsp r;
	t2_begin(&c, T2_ST_NO_SESSIONS, T2_CC_FlushContext);
	t2_u32(&c, handle);
	(void)t2_transmit(&c, &r);
}

const char *t2_rc_text(uint32_t rc)
{
	static char text[64];
	uint32_t base = (rc & T2_RC_FMT1) ? (rc & 0xBF) : rc;
	const char *name;
	switch (base) {
	case 0: name = "success"; break;
	case T2_RC_VALUE: name = "TPM_RC_VALUE"; break;
	case T2_RC_HANDLE: name = "TPM_RC_HANDLE"; break;
	case T2_RC_SIGNATURE: name = "TPM_RC_SIGNATURE"; break;
	case T2_RC_POLICY_FAIL: name = "TPM_RC_POLICY_FAIL"; break;
	case T2_RC_NV_DEFINED: name = "TPM_RC_NV_DEFINED"; break;
	case 0x14A: name = "TPM_RC_NV_UNINITIALIZED"; break;
	case 0x149: name = "TPM_RC_NV_AUTHORIZATION"; break;
	case 0x146: name = "TPM_RC_NV_RANGE"; break;
	case 0x902: name = "TPM_RC_OBJECT_MEMORY"; break;
	case 0x903: name = "TPM_RC_SESSION_MEMORY"; break;
	case 0x08E: name = "TPM_RC_AUTH_FAIL"; break;
	case 0x0A2: name = "TPM_RC_BAD_AUTH"; break;
	case 0x920: name = "TPM_RC_NV_RATE"; break;
	case 0x921: name = "TPM_RC_LOCKOUT (dictionary-attack lockout)"; break;
	case TPM_FAIL: name = "no answer from the TPM"; break;
	default: name = "TPM error"; break;
	}
	snprintf(text, sizeof(text), "%s (0x%x)", name, (unsigned int)rc);
	return text;
}
