/*
 * vtpmmgr transfer extension: the request format of the ops that move a vTPM to another host's
 * manager (docs/protocol.md of xen-vtpm, "Moving a vTPM").
 *
 * Pure functions over the strings read from a request directory, like ckpt_request.h, so they can
 * be fuzzed and tested on their own.
 */
#ifndef VTPMMGR_XFER_REQUEST_H
#define VTPMMGR_XFER_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "xfer_envelope.h"

enum xfer_op {
	XFER_OP_EXPORT,     /* wrap an entry for another manager's transfer key; a vTPM entry is parked */
	XFER_OP_IMPORT,     /* open an envelope with this manager's transfer key and add the entry */
	XFER_OP_UNEXPORT,   /* un-park an exported vTPM entry (the move was undone) */
	XFER_OP_REMOVE,     /* delete an exported or provisionally imported vTPM entry */
	XFER_OP_ADOPT,      /* an imported vTPM entry becomes an ordinary one (the move committed) */
};

struct xfer_request {
	enum xfer_op op;
	uint8_t uuid[16];                          /* the vTPM */
	int has_entry;                             /* export/import: a checkpoint entry of that vTPM */
	uint8_t entry[16];
	uint8_t transfer[16];                      /* export/import: the transfer id, chosen by the receiver */
	uint8_t recipient[XFER_POINT_SIZE];        /* export: the receiving manager's transfer key */
	uint8_t envelope[XFER_ENVELOPE_SIZE];      /* import */
};

/* 1 if op names one of the ops above (the request is then parsed by xfer_parse_request). */
int xfer_is_op(const char *op);
const char *xfer_op_name(enum xfer_op op);

/*
 * Validate the nodes of one transfer request (NULL = node absent): state, op, uuid, checkpoint,
 * transfer, recipient, envelope.  Returns 0 with *req filled, or -1 with a one-line reason in err.
 */
int xfer_parse_request(const char *state, const char *op, const char *uuid, const char *checkpoint,
		       const char *transfer, const char *recipient, const char *envelope,
		       struct xfer_request *req, char *err, size_t errlen);

/* Lower-case hex of len bytes into out (2 * len + 1 bytes). */
void xfer_hex(const uint8_t *data, size_t len, char *out);

#endif
