/*
 * vtpmmgr checkpoint extension: the request format (see ckpt_request.h).
 */
#include <stdio.h>
#include <string.h>

#include "ckpt_request.h"

static const char *const op_names[] = {
	[CKPT_OP_CHECKPOINT] = "checkpoint",
	[CKPT_OP_RESTORE] = "restore",
	[CKPT_OP_DISCARD] = "discard",
};

const char *ckpt_op_name(enum ckpt_op op)
{
	return op_names[op];
}

int ckpt_valid_request_id(const char *id)
{
	size_t i;
	for (i = 0; id[i]; i++) {
		char c = id[i];
		if (i >= CKPT_REQUEST_ID_MAX)
			return 0;
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		      c == '_' || c == '.' || c == '-'))
			return 0;
	}
	return i > 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;      /* upper case is not canonical */
}

int ckpt_parse_uuid(const char *text, uint8_t out[16])
{
	size_t i, n = 0;
	for (i = 0; i < 36; i++) {
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (text[i] != '-')
				return -1;
			continue;
		}
		if (hexval(text[i]) < 0 || hexval(text[i + 1]) < 0)
			return -1;
		out[n++] = (uint8_t)(hexval(text[i]) << 4 | hexval(text[i + 1]));
		i++;
	}
	return text[36] == '\0' ? 0 : -1;
}

void ckpt_format_uuid(const uint8_t u[16], char out[37])
{
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

/* A node value quoted for an error text: one line, at most 40 characters shown, other bytes as \xNN. */
static void show(char *out, size_t outlen, const char *value)
{
	size_t i, o = 0;
	if (outlen < 8) {
		if (outlen)
			out[0] = '\0';
		return;
	}
	out[o++] = '\'';
	for (i = 0; value[i] && i < 40 && o + 6 < outlen; i++) {
		unsigned char c = (unsigned char)value[i];
		if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\')
			out[o++] = (char)c;
		else
			o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
	}
	out[o++] = '\'';
	if (value[i] && o + 4 <= outlen) {
		memcpy(out + o, "...", 3);
		o += 3;
	}
	out[o] = '\0';
}

static int parse_uuid_field(const char *text, const char *what, uint8_t out[16], char *err, size_t errlen)
{
	char shown[200];
	if (!text) {
		snprintf(err, errlen, "missing field '%s'", what);
		return -1;
	}
	if (ckpt_parse_uuid(text, out)) {
		show(shown, sizeof(shown), text);
		snprintf(err, errlen, "field '%s' is not a canonical lower-case UUID: %s", what, shown);
		return -1;
	}
	return 0;
}

int ckpt_parse_request(const char *state, const char *op, const char *uuid, const char *checkpoint,
		       struct ckpt_request *req, char *err, size_t errlen)
{
	char shown[200];
	size_t i;

	memset(req, 0, sizeof(*req));
	if (!state || strcmp(state, "submitted")) {
		if (state)
			show(shown, sizeof(shown), state);
		snprintf(err, errlen, "request state is %s, expected 'submitted'", state ? shown : "absent");
		return -1;
	}
	if (!op) {
		snprintf(err, errlen, "missing field 'op'");
		return -1;
	}
	for (i = 0; i < sizeof(op_names) / sizeof(op_names[0]); i++)
		if (!strcmp(op, op_names[i]))
			break;
	if (i == sizeof(op_names) / sizeof(op_names[0])) {
		show(shown, sizeof(shown), op);
		snprintf(err, errlen, "unknown op %s; expected one of checkpoint, restore, discard", shown);
		return -1;
	}
	req->op = (enum ckpt_op)i;
	if (parse_uuid_field(checkpoint, "checkpoint", req->checkpoint, err, errlen))
		return -1;
	if (req->op == CKPT_OP_DISCARD && !uuid)
		return 0;
	if (parse_uuid_field(uuid, "uuid", req->uuid, err, errlen))
		return -1;
	req->has_uuid = 1;
	return 0;
}
