/*
 * vtpmmgr transfer extension: seal and open an envelope (see xfer_envelope.h).
 */
#include <stdint.h>
#include <string.h>

#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_crypto.h"
#include "xfer_envelope.h"

static const char label[] = "xen-vtpm transfer v1";

#define OFF_POINT 1
#define OFF_IV (OFF_POINT + XFER_POINT_SIZE)
#define OFF_TAG (OFF_IV + 16 + 64)

/* NIST SP 800-56C one-step KDF with SHA-256 (one block: 32 bytes, split into the two AES keys). */
static void derive(const struct xfer_binding *b, const uint8_t z[32], const uint8_t eph[XFER_POINT_SIZE],
		   aes_context *enc, aes_context *mac)
{
	uint8_t in[4 + 32 + sizeof(label) + XFER_POINT_SIZE + sizeof(*b)], *p = in;
	struct hash256 out;
	struct key128 key;

	memcpy(p, "\0\0\0\1", 4);
	p += 4;
	memcpy(p, z, 32);
	p += 32;
	memcpy(p, label, sizeof(label));      /* with its NUL: the fields after it cannot shift into it */
	p += sizeof(label);
	memcpy(p, eph, XFER_POINT_SIZE);
	p += XFER_POINT_SIZE;
	memcpy(p, b->recipient, sizeof(b->recipient));
	p += sizeof(b->recipient);
	memcpy(p, b->transfer, 16);
	p += 16;
	memcpy(p, b->uuid, 16);
	p += 16;
	*p++ = b->kind;
	memcpy(p, b->entry, 16);
	p += 16;
	sha256(&out, in, (size_t)(p - in));
	memcpy(key.bits, out.bits, 16);
	aes_setup(enc, &key);
	memcpy(key.bits, out.bits + 16, 16);
	aes_setup(mac, &key);
	memset(&out, 0, sizeof(out));
	memset(&key, 0, sizeof(key));
	memset(in, 0, sizeof(in));
}

const uint8_t *xfer_envelope_point(const uint8_t env[XFER_ENVELOPE_SIZE])
{
	return env + OFF_POINT;
}

void xfer_envelope_seal(const struct xfer_binding *b, const uint8_t eph[XFER_POINT_SIZE], const uint8_t z[32],
			const uint8_t entry[64], uint8_t env[XFER_ENVELOPE_SIZE])
{
	aes_context enc, mac;
	uint64_t plain[8], sealed[10];     /* Xen's CTR code works on 64-bit words: aligned copies */
	derive(b, z, eph, &enc, &mac);
	env[0] = XFER_VERSION;
	memcpy(env + OFF_POINT, eph, XFER_POINT_SIZE);
	memcpy(plain, entry, 64);
	aes_encrypt_ctr(sealed, sizeof(sealed), plain, sizeof(plain), &enc);    /* a random IV, then the ciphertext */
	memcpy(env + OFF_IV, sealed, sizeof(sealed));
	aes_cmac((struct mac128 *)(env + OFF_TAG), env, OFF_TAG, &mac);
	memset(plain, 0, sizeof(plain));
	memset(&enc, 0, sizeof(enc));
	memset(&mac, 0, sizeof(mac));
}

int xfer_envelope_open(const struct xfer_binding *b, const uint8_t z[32], const uint8_t env[XFER_ENVELOPE_SIZE],
		       uint8_t entry[64])
{
	aes_context enc, mac;
	uint64_t plain[8], sealed[10];
	int bad;
	if (env[0] != XFER_VERSION)
		return -1;
	derive(b, z, env + OFF_POINT, &enc, &mac);
	bad = aes_cmac_verify((const struct mac128 *)(env + OFF_TAG), env, OFF_TAG, &mac);
	if (!bad) {
		memcpy(sealed, env + OFF_IV, sizeof(sealed));
		aes_decrypt_ctr(plain, sizeof(plain), sealed, sizeof(sealed), &enc);
		memcpy(entry, plain, 64);
		memset(plain, 0, sizeof(plain));
	}
	memset(&enc, 0, sizeof(enc));
	memset(&mac, 0, sizeof(mac));
	return bad ? -1 : 0;
}
