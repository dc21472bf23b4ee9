/* mini-os tpm_tis: the manager's physical TPM.  In the native build (shim/tpm_tis.c) the descriptor
 * reaches a TPM behind a TCTI instead of TIS MMIO. */
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
