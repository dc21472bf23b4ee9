#include <openssl/evp.h>
#include "hashing.h"

/* One-shot SHA-256 through libcrypto so SHA-NI is used where present. */
int xv_sha256(const unsigned char *data, size_t len, unsigned char *out)
{
    unsigned int outlen = 0;
    return EVP_Digest(data, len, out, &outlen, EVP_sha256(), NULL) == 1 ? 0 : -1;
}
