/*
 * libFuzzer target: the request parser of the vtpmmgr transfer ops (vtpmmgr/src/xfer_request.c), built
 * with clang -fsanitize=fuzzer,address,undefined by fuzz/run.py.
 *
 * Input: the values of the nodes state, op, uuid, checkpoint, transfer, recipient and envelope,
 * NUL-separated (a lone 0x7f byte = node absent).  Every property the manager relies on is checked
 * against an independent reading of docs/protocol.md §9; a violation aborts, which libFuzzer reports.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt_request.h"
#include "xfer_request.h"

#define NR_FIELDS 7
enum { STATE, OP, UUID, CHECKPOINT, TRANSFER, RECIPIENT, ENVELOPE };

static int is_canonical(const char *s)
{
	static const char form[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
	size_t i;
	if (strlen(s) != 36)
		return 0;
	for (i = 0; i < 36; i++)
		if (form[i] == '-' ? s[i] != '-' : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return 0;
	return 1;
}

static int is_hex(const char *s, size_t bytes)
{
	size_t i;
	if (strlen(s) != 2 * bytes)
		return 0;
	for (i = 0; i < 2 * bytes; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return 0;
	return 1;
}

static void same_uuid(const char *text, const uint8_t bin[16])
{
	char back[37];
	ckpt_format_uuid(bin, back);
	if (!text || !is_canonical(text) || strcmp(back, text))
		abort();
}

static void same_hex(const char *text, const uint8_t *bin, size_t n)
{
	char *back = malloc(2 * n + 1);
	if (!back)
		abort();
	xfer_hex(bin, n, back);
	if (!text || !is_hex(text, n) || strcmp(back, text))
		abort();
	free(back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = malloc(size + 1), *v[NR_FIELDS], *p;
	struct xfer_request req;
	char err[CKPT_ERROR_MAX];
	int i, rc, is_export, is_import;

	if (!buf)
		abort();
	memcpy(buf, data, size);
	buf[size] = '\0';
	for (i = 0, p = buf; i < NR_FIELDS; i++) {
		v[i] = p;
		p += strlen(p);
		if (p < buf + size)
			p++;
	}
	for (i = 0; i < NR_FIELDS; i++)
		if (!strcmp(v[i], "\x7f"))
			v[i] = NULL;

	memset(err, 'E', sizeof(err));
	rc = xfer_parse_request(v[STATE], v[OP], v[UUID], v[CHECKPOINT], v[TRANSFER], v[RECIPIENT], v[ENVELOPE],
				&req, err, sizeof(err));
	if (rc == 0) {
		if (!v[STATE] || strcmp(v[STATE], "submitted") || !v[OP] || !xfer_is_op(v[OP]) ||
		    strcmp(v[OP], xfer_op_name(req.op)))
			abort();
		same_uuid(v[UUID], req.uuid);
		is_export = req.op == XFER_OP_EXPORT;
		is_import = req.op == XFER_OP_IMPORT;
		if (is_export || is_import) {
			same_uuid(v[TRANSFER], req.transfer);
			if (req.has_entry != (v[CHECKPOINT] != NULL))
				abort();
			if (req.has_entry)
				same_uuid(v[CHECKPOINT], req.entry);
		} else if (v[CHECKPOINT] || v[TRANSFER] || req.has_entry) {
			abort();              /* a field of another op was accepted */
		}
		if (is_export) {
			same_hex(v[RECIPIENT], req.recipient, XFER_POINT_SIZE);
			if (v[ENVELOPE])
				abort();
		} else if (is_import) {
			same_hex(v[ENVELOPE], req.envelope, XFER_ENVELOPE_SIZE);
			if (v[RECIPIENT])
				abort();
		} else if (v[RECIPIENT] || v[ENVELOPE]) {
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
