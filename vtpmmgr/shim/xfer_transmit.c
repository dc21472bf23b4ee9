/* The native manager's transport for the transfer extension's TPM 2.0 commands (src/xfer_tpm2.c):
 * raw command bytes to the physical TPM behind the TCTI, one connection per operation like the
 * sealing in ptpm.c (an swtpm socket serves one client at a time).  On mini-os the same commands go
 * through Xen's TPM_TransmitData (src/xfer_transmit_xen.c). */
#include <stdint.h>
#include <stdio.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tcti.h>
#include <tss2/tss2_tctildr.h>

#include <mini-os/console.h>

#include "shim.h"
#include "xfer_tpm2.h"

static TSS2_TCTI_CONTEXT *tcti;

int xfer_tpm_begin(void)
{
	TSS2_RC rc = Tss2_TctiLdr_Initialize(shim_config.tcti, &tcti);
	if (rc != TSS2_RC_SUCCESS) {
		printk("xfer: cannot reach the TPM at %s: %s\n", shim_config.tcti, Tss2_RC_Decode(rc));
		tcti = NULL;
		return -1;
	}
	return 0;
}

void xfer_tpm_end(void)
{
	if (tcti)
		Tss2_TctiLdr_Finalize(&tcti);
}

int xfer_tpm_transmit(const uint8_t *cmd, size_t len, uint8_t *rsp, size_t *rsplen)
{
	TSS2_RC rc;
	if (!tcti)
		return -1;
	rc = Tss2_Tcti_Transmit(tcti, len, cmd);
	if (rc == TSS2_RC_SUCCESS)
		rc = Tss2_Tcti_Receive(tcti, rsplen, rsp, 30000);
	if (rc != TSS2_RC_SUCCESS) {
		printk("xfer: TPM I/O failed: %s\n", Tss2_RC_Decode(rc));
		return -1;
	}
	return 0;
}
