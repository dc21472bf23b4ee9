/*
 * libFuzzer target: the C request parser of the vtpmmgr checkpoint extension (vtpmmgr/src/ckpt_request.c),
 * built with clang -fsanitize=fuzzer,address,undefined by fuzz/run.py.
 *
 * Input: the values of the nodes state, op, checkpoint, uuid and then the request id, NUL-separated
 * (a lone 0x7f byte = node absent), the layout of fz_mgrproto's request inputs without their first
 * byte.  Every property the manager relies on is checked against an independent reading of
 * docs/protocol.md; a violation aborts, which libFuzzer reports as a finding.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt_request.h"

#define NR_FIELDS 4

static int is_canonical(const char *s)
{
	static const char form[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
	size_t i;
	if (strlen(s) != 36)
		return 0;
	for (i = 0; i < 36; i++) {
		if (form[i] == '-' ? s[i] != '-' : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return 0;
	}
	return 1;
}

static int id_ok(const char *s)
{
	size_t n = strlen(s), i;
	if (n < 1 || n > 64)
		return 0;
	for (i = 0; i < n; i++)
		if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-", s[i]))
			return 0;
	return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size + 1), *parts[NR_FIELDS + 1] = { 0 }, *values[NR_FIELDS], *p, *rid;
	struct ckpt_request req;
	char err[CKPT_ERROR_MAX], text[37];
	int i, rc;

	if (!buf)
		abort();
	memcpy(buf, data, size);
	buf[size] = '\0';
	p = buf;
	for (i = 0; i <= NR_FIELDS; i++) {
		parts[i] = p;
		p = memchr(p, '\0', (size_t)(buf + size - p));
		if (!p) {
			p = buf + size;
			for (i++; i <= NR_FIELDS; i++)
				parts[i] = p;
			break;
		}
		p++;
		if (p > buf + size)
			p = buf + size;
	}
	for (i = 0; i < NR_FIELDS; i++)
		values[i] = strcmp(parts[i], "\x7f") ? parts[i] : NULL;
	rid = parts[NR_FIELDS];

	if (ckpt_valid_request_id(rid) != id_ok(rid))
		abort();

	memset(err, 'E', sizeof(err));
	rc = ckpt_parse_request(values[0], values[1], values[3], values[2], &req, err, sizeof(err));
	if (rc == 0) {
		if (!values[0] || strcmp(values[0], "submitted") || !values[1])
			abort();
		if (strcmp(values[1], ckpt_op_name(req.op)))
			abort();
		if (!values[2] || !is_canonical(values[2]))
			abort();
		ckpt_format_uuid(req.checkpoint, text);
		if (strcmp(text, values[2]))
			abort();
		if (req.has_uuid) {
			if (!values[3] || !is_canonical(values[3]))
				abort();
			ckpt_format_uuid(req.uuid, text);
			if (strcmp(text, values[3]))
				abort();
		} else if (req.op != CKPT_OP_DISCARD || values[3]) {
			abort();
		}
	} else {
		size_t n = strnlen(err, sizeof(err));
		/* one line, terminated, never empty */
		if (rc != -1 || n == 0 || n == sizeof(err) || strchr(err, '\n'))
			abort();
	}
	free(buf);
	return 0;
}
