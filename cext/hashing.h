/* Public surface of the state-hashing extension (parsed by cffi's cdef: no macros). */
int xv_sha256(const unsigned char *data, size_t len, unsigned char *out);
