/* mini-os tpm_tis: declarations only, so init.c compiles in the patch check.  The native manager
 * reaches its TPM through shim/ptpm.c instead of TIS MMIO. */
#ifndef SHIM_MINIOS_TPM_TIS_H
#define SHIM_MINIOS_TPM_TIS_H
#include <stddef.h>
#include <stdint.h>
#define TPM_BASEADDR 0xFED40000
#define TPM_PROBE_IRQ 0xFFFF
#define TPM_TIS_LOCL_INT_TO_FLAG(x) (1 << (x))
struct tpm_chip;
struct tpm_chip *init_tpm_tis(unsigned long baseaddr, int localities, unsigned int irq);
struct tpm_chip *init_tpm2_tis(unsigned long baseaddr, int localities, unsigned int irq);
int tpm_tis_open(struct tpm_chip *tpm);
int tpm_tis_request_locality(struct tpm_chip *tpm, int locality);
#endif
