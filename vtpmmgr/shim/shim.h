/* What the native manager is told on its command line (a mini-os domain learns it from Xen). */
#ifndef SHIM_H
#define SHIM_H
#include <xen/xen.h>

struct shim_config {
	domid_t domid;
	const char *disk_path;    /* the disk= image (blkfront) */
	const char *tcti;         /* the physical TPM (a TCTI string: swtpm socket, device, ...) */
	const char *run_dir;      /* where the ring sockets live: <run_dir>/tpmif/<B>-<F>-<N>.sock */
	const char *xsm_label;    /* what tpmback_get_peercontext reports for every frontend */
	int provision;            /* provision group 0 when the manager starts fresh */
};

extern struct shim_config shim_config;

/* The pTPM side of disk_tpm.h (shim/disk_tpm.c). */
int shim_tpm_init(void);
#endif
