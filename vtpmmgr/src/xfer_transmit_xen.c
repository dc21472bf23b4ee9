/*
 * vtpmmgr transfer extension: the stub domain's transport for xfer_tpm2.c, Xen's own
 * TPM_TransmitData (tpm.c) to the physical TPM the manager drives (tpm_tis or tpmfront).  The
 * native build of the simulator has its own (vtpmmgr/shim/xfer_transmit.c).
 */
#include <stddef.h>
#include <stdint.h>

#include "tcg.h"
#include "tpm.h"
#include "xfer_tpm2.h"

int xfer_tpm_begin(void)
{
	return 0;        /* the manager keeps its TPM open for its whole life */
}

void xfer_tpm_end(void)
{
}

int xfer_tpm_transmit(const uint8_t *cmd, size_t len, uint8_t *rsp, size_t *rsplen)
{
	UINT32 out = (UINT32)*rsplen;
	if (TPM_TransmitData((BYTE *)cmd, (UINT32)len, rsp, &out) != TPM_SUCCESS)
		return -1;
	*rsplen = out;
	return 0;
}
