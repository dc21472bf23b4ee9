/*
 * vtpmmgr TPM 2.0 persistence: building, sending and parsing TPM 2.0 commands.
 *
 * tpm2.c marshals a handful of commands without bounds checks on the
 * response; the sealing, policy and NV commands of the persistence code are
 * built here instead, on the same transport (TPM_TransmitData).  Every read of
 * a response is bounded: a short or malformed response sets rsp->bad and the
 * caller reports TPM_FAIL, it never reads past the buffer.
 */
#ifndef VTPMMGR_TPM2_CMD_H
#define VTPMMGR_TPM2_CMD_H

#include <stddef.h>
#include <stdint.h>

#define T2_BUF_MAX 2048

/* TPM 2.0 Part 2 constants used by the persistence code. */
#define T2_ST_NO_SESSIONS 0x8001
#define T2_ST_SESSIONS 0x8002
#define T2_ST_VERIFIED 0x8022

#define T2_CC_NV_DefineSpace 0x0000012A
#define T2_CC_Create 0x00000153
#define T2_CC_NV_Increment 0x00000134
#define T2_CC_Load 0x00000157
#define T2_CC_Unseal 0x0000015E
#define T2_CC_PolicyAuthorize 0x0000016A
#define T2_CC_NV_Read 0x0000014E
#define T2_CC_FlushContext 0x00000165
#define T2_CC_LoadExternal 0x00000167
#define T2_CC_NV_ReadPublic 0x00000169
#define T2_CC_PolicyGetDigest 0x00000189
#define T2_CC_StartAuthSession 0x00000176
#define T2_CC_VerifySignature 0x00000177
#define T2_CC_PCR_Read 0x0000017E
#define T2_CC_PolicyPCR 0x0000017F

#define T2_RH_OWNER 0x40000001
#define T2_RH_NULL 0x40000007
#define T2_RS_PW 0x40000009

#define T2_ALG_KEYEDHASH 0x0008
#define T2_ALG_SHA256 0x000B
#define T2_ALG_NULL 0x0010
#define T2_ALG_ECDSA 0x0018
#define T2_ALG_ECC 0x0023
#define T2_ECC_NIST_P256 0x0003

#define T2_SE_POLICY 0x01
#define T2_SE_TRIAL 0x03

/* TPMA_OBJECT */
#define T2_OA_FIXEDTPM (1u << 1)
#define T2_OA_FIXEDPARENT (1u << 4)
#define T2_OA_USERWITHAUTH (1u << 6)
#define T2_OA_NODA (1u << 10)
#define T2_OA_SIGN (1u << 18)

/* TPMA_NV */
#define T2_NV_COUNTER (1u << 4)     /* TPM_NT_COUNTER in bits 7:4 */
#define T2_NV_TYPE_MASK (0xFu << 4)
#define T2_NV_AUTHWRITE (1u << 2)
#define T2_NV_NO_DA (1u << 25)
#define T2_NV_OWNERREAD (1u << 17)
#define T2_NV_AUTHREAD (1u << 18)
#define T2_NV_WRITTEN (1u << 29)

/* Response codes the persistence code tells apart (format-one codes carry a parameter number). */
#define T2_RC_INITIALIZE 0x100
#define T2_RC_NV_DEFINED 0x14C
#define T2_RC_HANDLE 0x08B
#define T2_RC_FMT1 0x080
#define T2_RC_POLICY_FAIL 0x09D
#define T2_RC_SIGNATURE 0x09B
#define T2_RC_VALUE 0x084

struct t2_cmd {
	uint8_t buf[T2_BUF_MAX];
	size_t len;
	int overflow;
};

struct t2_rsp {
	uint8_t buf[T2_BUF_MAX];
	size_t len;
	size_t pos;
	int bad;
	uint32_t rc;
};

/* Start a command: tag (T2_ST_*), command code; the size is filled in by t2_transmit. */
void t2_begin(struct t2_cmd *c, uint16_t tag, uint32_t cc);
void t2_u8(struct t2_cmd *c, uint8_t v);
void t2_u16(struct t2_cmd *c, uint16_t v);
void t2_u32(struct t2_cmd *c, uint32_t v);
void t2_bytes(struct t2_cmd *c, const void *p, size_t n);
/* A TPM2B: be16 size then the bytes. */
void t2_b(struct t2_cmd *c, const void *p, size_t n);
/* A TPM2B whose contents follow: t2_open_b writes a placeholder size, t2_close_b fills it in. */
size_t t2_open_b(struct t2_cmd *c);
void t2_close_b(struct t2_cmd *c, size_t mark);
/* An authorization area of one password session (TPM_RS_PW) with the given password. */
void t2_pw_auth(struct t2_cmd *c, const void *pw, size_t n);
/* An authorization area of one policy session, not continued (the TPM flushes it). */
void t2_policy_auth(struct t2_cmd *c, uint32_t session);
/* A TPML_PCR_SELECTION of the sha256 bank for the 24-bit mask. */
void t2_pcr_selection(struct t2_cmd *c, uint32_t mask);

/* Send the command; 0 if the TPM answered TPM_RC_SUCCESS (r->pos then points after the header),
 * else the response code (r->rc) or TPM_FAIL for a transport error.  TPM_RC_RETRY and
 * TPM_RC_NV_RATE are retried. */
uint32_t t2_transmit(struct t2_cmd *c, struct t2_rsp *r);

uint8_t t2_get_u8(struct t2_rsp *r);
uint16_t t2_get_u16(struct t2_rsp *r);
uint32_t t2_get_u32(struct t2_rsp *r);
uint64_t t2_get_u64(struct t2_rsp *r);
void t2_get_bytes(struct t2_rsp *r, void *out, size_t n);
/* A TPM2B into out[max]; returns its size (0 and r->bad when it does not fit). */
size_t t2_get_b(struct t2_rsp *r, void *out, size_t max);
/* A TPM2B in place, its size field included (*len = 2 + size); NULL and r->bad past the end. */
const uint8_t *t2_get_b_raw(struct t2_rsp *r, size_t *len);
/* The next n bytes of the response in place (NULL and r->bad past the end). */
const uint8_t *t2_get_raw(struct t2_rsp *r, size_t n);
/* Skip the parameterSize of a response to a command with sessions. */
void t2_skip_param_size(struct t2_rsp *r);

/* FlushContext of a transient object or session; errors are ignored (it may already be gone). */
void t2_flush(uint32_t handle);

/* A name for the response code, for console lines. */
const char *t2_rc_text(uint32_t rc);

#endif
