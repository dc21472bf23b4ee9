/*
 * vtpmmgr checkpoint extension: the request format (docs/protocol.md of xen-vtpm).
 *
 * Pure functions over the strings read from a request directory, so they can be
 * fuzzed and tested on their own.  Values arrive as C strings, as mini-os's
 * xenbus_read() returns them.
 */
#ifndef VTPMMGR_CKPT_REQUEST_H
#define VTPMMGR_CKPT_REQUEST_H

#include <stddef.h>
#include <stdint.h>

enum ckpt_op {
	CKPT_OP_CHECKPOINT,
	CKPT_OP_RESTORE,
	CKPT_OP_DISCARD,
};

struct ckpt_request {
	enum ckpt_op op;
	int has_uuid;             /* optional for discard only */
	uint8_t uuid[16];         /* the vTPM */
	uint8_t checkpoint[16];   /* the checkpoint entry, named by dom0 */
};

#define CKPT_ERROR_MAX 160     /* longest error text, NUL included */
#define CKPT_REQUEST_ID_MAX 64

/* [A-Za-z0-9_.-]{1,64}: 1 if id may name a request directory. */
int ckpt_valid_request_id(const char *id);

/* The canonical lower-case 36-character form (libxl's LIBXL_UUID_FMT): 0 and out set, or -1. */
int ckpt_parse_uuid(const char *text, uint8_t out[16]);
void ckpt_format_uuid(const uint8_t uuid[16], char out[37]);

const char *ckpt_op_name(enum ckpt_op op);

/*
 * Validate the nodes of one request (NULL = node absent).  Returns 0 with *req
 * filled, or -1 with a one-line reason in err (at most errlen bytes, always
 * NUL-terminated when errlen > 0).
 */
int ckpt_parse_request(const char *state, const char *op, const char *uuid, const char *checkpoint,
		       struct ckpt_request *req, char *err, size_t errlen);

#endif
