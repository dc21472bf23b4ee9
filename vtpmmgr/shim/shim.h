/* What the native manager is told on its command line (a mini-os domain learns it from Xen). */
#ifndef SHIM_H
#define SHIM_H
#include <stdint.h>
#include <xen/xen.h>

struct shim_config {
	domid_t domid;
	const char *disk_path;    /* the disk= image (blkfront) */
	const char *tcti;         /* the physical TPM (a TCTI string: swtpm socket, device, ...) */
	const char *run_dir;      /* where the ring sockets live: <run_dir>/tpmif/<B>-<F>-<N>.sock */
	int xsm;                  /* 1: FLASK, tpmback_get_peercontext reports xsm_label; 0: no XSM */
	const char *xsm_label;    /* the label every frontend has under FLASK */
	unsigned int release_delay_ms;  /* delay of the close callback after a frontend went away */
	uint32_t crash_cc;        /* die before sending the crash_nth TPM command with this code */
	unsigned int crash_nth;
};

extern struct shim_config shim_config;
#endif
