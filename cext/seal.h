/* Internal to the extension: a chunk's keyed id and its AES-256-GCM seal, as the store defines them
 * (docs/formats.md, "Checkpoint store" §0), one context per thread. */
#ifndef XEN_VTPM_SEAL_H
#define XEN_VTPM_SEAL_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "hashing.h"
#include "sha256.h"

#define XV_ID_SIZE 32
#define XV_NONCE_SIZE 12
#define XV_TAG_SIZE 16
#define XV_ENTRY_HEAD (XV_ID_SIZE + XV_NONCE_SIZE + 4)   /* pack entry: id | nonce | sealed length u32 */

/* One thread's keyed contexts: the id MAC and the AEAD, keyed once and reused for every chunk. */
struct xv_sealer {
    EVP_MAC_CTX *mac;
    EVP_CIPHER_CTX *enc, *dec;
};

XV_HIDDEN enum xv_status xv_sealer_init(struct xv_sealer *s, const unsigned char id_key[32],
                                        const unsigned char enc_key[32]);
XV_HIDDEN void xv_sealer_free(struct xv_sealer *s);

/* id = HMAC-SHA256(id key, SHA-256 of the plaintext). */
XV_HIDDEN enum xv_status xv_chunk_id(struct xv_sealer *s, const unsigned char sha[32], unsigned char id[32]);

/* One pack entry at out: id | random nonce | n u32 LE | ciphertext of in[0..n) | tag, associated data
 * id (|| "delta" for a delta payload).  out holds XV_ENTRY_HEAD + n + XV_TAG_SIZE bytes. */
XV_HIDDEN enum xv_status xv_seal_entry(struct xv_sealer *s, const unsigned char id[32], int delta,
                                       const unsigned char *in, uint32_t n, unsigned char *out);

/* Opens a sealed chunk (ciphertext || tag, sealed_len >= 16) into out (sealed_len - 16 bytes):
 * XV_EAUTH when the tag does not verify under id (|| "delta"). */
XV_HIDDEN enum xv_status xv_open_sealed(struct xv_sealer *s, const unsigned char id[32], int delta,
                                        const unsigned char nonce[12], const unsigned char *sealed,
                                        uint32_t sealed_len, unsigned char *out);

/* Thread CPU time in nanoseconds, for the per-stage figures. */
XV_HIDDEN uint64_t xv_thread_ns(void);

#endif /* XEN_VTPM_SEAL_H */
