/*
 * vtpmmgr transfer extension: the envelope that carries one 64-byte entry (H ‖ K) from one manager
 * to another (docs/protocol.md of xen-vtpm, "Moving a vTPM").
 *
 * The sender's physical TPM makes an ephemeral ECDH key pair against the receiver's transfer key
 * (TPM2_ECDH_KeyGen); only the receiver's physical TPM can compute the same shared secret
 * (TPM2_ECDH_ZGen).  The entry is encrypted and authenticated with Xen's own disk primitives
 * (AES-128-CTR, AES-CMAC) under keys derived from that secret and from what the envelope is for.
 *
 *   envelope = version (1) ‖ Q_e (x ‖ y, 64) ‖ IV (16) ‖ AES-CTR(k_enc, entry) (64) ‖ CMAC(k_mac, all before) (16)
 *   k_enc ‖ k_mac = SHA-256(00000001 ‖ Z ‖ "xen-vtpm transfer v1" ‖ Q_e ‖ Q_R ‖ transfer ‖ uuid ‖ kind ‖ entry)
 */
#ifndef VTPMMGR_XFER_ENVELOPE_H
#define VTPMMGR_XFER_ENVELOPE_H

#include <stdint.h>

#define XFER_VERSION 1
#define XFER_POINT_SIZE 64                    /* an uncompressed P-256 point without its 04 prefix */
#define XFER_ENVELOPE_SIZE (1 + XFER_POINT_SIZE + 16 + 64 + 16)

/* What an envelope is for: opened with any other binding, it does not authenticate. */
struct xfer_binding {
	uint8_t recipient[XFER_POINT_SIZE];   /* the receiving manager's transfer key Q_R */
	uint8_t transfer[16];                 /* the transfer id */
	uint8_t uuid[16];                     /* the vTPM */
	uint8_t kind;                         /* 'v' the vTPM's entry, 'c' a checkpoint entry */
	uint8_t entry[16];                    /* the checkpoint entry's id ('c'), zero ('v') */
};

/* The ephemeral point Q_e an envelope carries (what the receiver's TPM needs for ZGen). */
const uint8_t *xfer_envelope_point(const uint8_t env[XFER_ENVELOPE_SIZE]);

void xfer_envelope_seal(const struct xfer_binding *b, const uint8_t eph[XFER_POINT_SIZE], const uint8_t z[32],
			const uint8_t entry[64], uint8_t env[XFER_ENVELOPE_SIZE]);

/* 0 and entry set, or -1 (wrong version, wrong key, other binding, altered). */
int xfer_envelope_open(const struct xfer_binding *b, const uint8_t z[32], const uint8_t env[XFER_ENVELOPE_SIZE],
		       uint8_t entry[64]);

#endif
