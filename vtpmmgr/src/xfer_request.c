/*
 * vtpmmgr transfer extension: the request format (see xfer_request.h).
 */
#include <stdio.h>
#include <string.h>

#include "ckpt_request.h"
#include "xfer_request.h"

static const char *const op_names[] = {
	[XFER_OP_EXPORT] = "export",
	[XFER_OP_IMPORT] = "import",
	[XFER_OP_UNEXPORT] = "unexport",
	[XFER_OP_REMOVE] = "remove",
	[XFER_OP_ADOPT] = "adopt",
};
#define NR_OPS (sizeof(op_names) / sizeof(op_names[0]))

const char *xfer_op_name(enum xfer_op op)
{
	return op_names[op];
}

static int op_index(const char *op)
{
	size_t i;
	for (i = 0; op && i < NR_OPS; i++)
		if (!strcmp(op, op_names[i]))
			return (int)i;
	return -1;
}

int xfer_is_op(const char *op)
{
	return op_index(op) >= 0;
}

void xfer_hex(const uint8_t *data, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t i;
	for (i = 0; i < len; i++) {
		out[2 * i] = digits[data[i] >> 4];
		out[2 * i + 1] = digits[data[i] & 15];
	}
	out[2 * len] = '\0';
}

static int nibble(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;      /* lower case only, as every value the tool writes */
}

/* Exactly 2 * len lower-case hex digits. */
static int parse_hex(const char *text, uint8_t *out, size_t len)
{
	size_t i;
	for (i = 0; i < len; i++) {
		int hi = nibble(text[2 * i]), lo = hi < 0 ? -1 : nibble(text[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return text[2 * len] == '\0' ? 0 : -1;
}

static int need_uuid(const char *text, const char *what, uint8_t out[16], char *err, size_t errlen)
{
	if (!text) {
		snprintf(err, errlen, "missing field '%s'", what);
		return -1;
	}
	if (ckpt_parse_uuid(text, out)) {
		snprintf(err, errlen, "field '%s' is not a canonical lower-case UUID", what);
		return -1;
	}
	return 0;
}

static int need_hex(const char *text, const char *what, uint8_t *out, size_t len, char *err, size_t errlen)
{
	if (!text) {
		snprintf(err, errlen, "missing field '%s'", what);
		return -1;
	}
	if (parse_hex(text, out, len)) {
		snprintf(err, errlen, "field '%s' is not %zu lower-case hex digits", what, 2 * len);
		return -1;
	}
	return 0;
}

static int refuse_field(const char *text, const char *what, const char *op, char *err, size_t errlen)
{
	if (!text)
		return 0;
	snprintf(err, errlen, "field '%s' does not belong to op '%s'", what, op);
	return -1;
}

int xfer_parse_request(const char *state, const char *op, const char *uuid, const char *checkpoint,
		       const char *transfer, const char *recipient, const char *envelope,
		       struct xfer_request *req, char *err, size_t errlen)
{
	int i = op_index(op);

	memset(req, 0, sizeof(*req));
	if (!state || strcmp(state, "submitted")) {
		snprintf(err, errlen, "request state is %s, expected 'submitted'", state ? "not 'submitted'" : "absent");
		return -1;
	}
	if (i < 0) {
		snprintf(err, errlen, "not a transfer op");
		return -1;
	}
	req->op = (enum xfer_op)i;
	if (need_uuid(uuid, "uuid", req->uuid, err, errlen))
		return -1;
	switch (req->op) {
	case XFER_OP_EXPORT:
	case XFER_OP_IMPORT:
		if (need_uuid(transfer, "transfer", req->transfer, err, errlen))
			return -1;
		if (checkpoint) {
			if (need_uuid(checkpoint, "checkpoint", req->entry, err, errlen))
				return -1;
			req->has_entry = 1;
		}
		if (req->op == XFER_OP_EXPORT)
			return need_hex(recipient, "recipient", req->recipient, sizeof(req->recipient), err, errlen) ||
			       refuse_field(envelope, "envelope", op, err, errlen) ? -1 : 0;
		return need_hex(envelope, "envelope", req->envelope, sizeof(req->envelope), err, errlen) ||
		       refuse_field(recipient, "recipient", op, err, errlen) ? -1 : 0;
	default:
		return refuse_field(checkpoint, "checkpoint", op, err, errlen) ||
		       refuse_field(transfer, "transfer", op, err, errlen) ||
		       refuse_field(recipient, "recipient", op, err, errlen) ||
		       refuse_field(envelope, "envelope", op, err, errlen) ? -1 : 0;
	}
}
