/* mini-os tpmfront (tpmdriver=tpmfront): not simulated (shim/tpm_tis.c). */
#ifndef SHIM_MINIOS_TPMFRONT_H
#define SHIM_MINIOS_TPMFRONT_H
struct tpmfront_dev;
struct tpmfront_dev *init_tpmfront(const char *nodename);
int tpmfront_open(struct tpmfront_dev *dev);
#endif
