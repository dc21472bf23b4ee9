/*
 * vtpmmgr transfer extension: the physical TPM's part of a move, as raw TPM 2.0 commands.
 *
 * The manager's transfer key is a primary of the owner hierarchy made from a fixed template
 * (ECC P-256, unrestricted decrypt, ECDH, fixedTPM): the same key comes back on every boot and
 * never exists outside this TPM.  The commands go through xfer_tpm_transmit, which the stub domain
 * build maps to Xen's TPM_TransmitData and the native build to a TCTI, so both run this code.
 */
#ifndef VTPMMGR_XFER_TPM2_H
#define VTPMMGR_XFER_TPM2_H

#include <stddef.h>
#include <stdint.h>

#include "xfer_envelope.h"

/* The transport (xfer_transmit_xen.c on mini-os, shim/xfer_transmit.c natively): open for one
 * operation, send one command and read its response (0, or -1 on an I/O error), close. */
int xfer_tpm_begin(void);
int xfer_tpm_transmit(const uint8_t *cmd, size_t len, uint8_t *rsp, size_t *rsplen);
void xfer_tpm_end(void);

/* Each returns 0, or -1 with a one-line reason in err. */

/* This TPM's transfer key (public part). */
int xfer_tpm_public(uint8_t q[XFER_POINT_SIZE], char *err, size_t errlen);

/* Sender: an ephemeral key pair on this TPM against the peer's key: Q_e and Z (the x coordinate). */
int xfer_tpm_keygen(const uint8_t peer[XFER_POINT_SIZE], uint8_t eph[XFER_POINT_SIZE], uint8_t z[32],
		    char *err, size_t errlen);

/* Receiver: Z from Q_e with the transfer key; also its public part (what the envelope is bound to). */
int xfer_tpm_zgen(const uint8_t eph[XFER_POINT_SIZE], uint8_t q[XFER_POINT_SIZE], uint8_t z[32],
		  char *err, size_t errlen);

#endif
