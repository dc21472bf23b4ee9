/* mini-os tpmback API (include/tpmback.h), implemented over the simulator's ring sockets. */
#ifndef SHIM_MINIOS_TPMBACK_H
#define SHIM_MINIOS_TPMBACK_H
#include <stdint.h>
#include <string.h>
#include <xen/xen.h>

struct tpmcmd {
	domid_t domid;
	uint8_t locality;
	unsigned int handle;
	void *opaque;
	uint8_t *req;
	unsigned int req_len;
	unsigned int resp_len;
	uint8_t *resp;
};
typedef struct tpmcmd tpmcmd_t;

void init_tpmback(void (*open_cb)(domid_t, unsigned int), void (*close_cb)(domid_t, unsigned int));
void shutdown_tpmback(void);
tpmcmd_t *tpmback_req_any(void);
void tpmback_resp(tpmcmd_t *tpmcmd);
unsigned char *tpmback_get_uuid(domid_t domid, unsigned int handle);
void *tpmback_get_opaque(domid_t domid, unsigned int handle);
int tpmback_set_opaque(domid_t domid, unsigned int handle, void *opaque);
int tpmback_get_peercontext(domid_t domid, unsigned int handle, void *buffer, int buflen);
#endif
