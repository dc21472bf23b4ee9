/* mini-os tpm_tis for a native build: the manager's physical TPM behind a TCTI (an swtpm socket by
 * default) instead of TIS MMIO.
 *
 * tpm_tis_open() returns a descriptor on which, as on mini-os, one write() sends a command and one
 * read() returns its whole response, so tpm.c's TPM_TransmitData runs unchanged: it is one end of a
 * SOCK_SEQPACKET pair served by a relay thread.  The relay opens the TCTI for each command and
 * closes it after the response: the TPM has no resource manager here and swtpm serves one
 * connection at a time, so a connection held for the manager's life would lock every other user
 * of that TPM out (the simulator's disk reader, vtpmmgr-native --dump).
 *
 * --crash-before-tpm-command CC[:N] kills the process just before the Nth command with code CC
 * reaches the TPM: how the tests stop the manager at an exact point between a disk write and
 * the TPM command that follows it. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tcti.h>
#include <tss2/tss2_tctildr.h>

#include <mini-os/console.h>
#include <mini-os/sched.h>
#include <mini-os/tpm_tis.h>
#include <mini-os/tpmfront.h>

#include "shim.h"

#define MAX_PACKET 0x2000          /* TCPA_MAX_BUFFER_LENGTH of tpm.c and tpm2.c */

struct tpm_chip {
	int fds[2];                /* [0] the manager's, [1] the relay's */
	unsigned int commands;
};

static struct tpm_chip chip = { { -1, -1 }, 0 };

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* One command to the TPM and its response; a transport failure is answered as the TPM's own
 * failure code, so the caller sees a failed command rather than a hang. */
static size_t transmit(const uint8_t *cmd, size_t len, uint8_t *rsp, size_t max)
{
	TSS2_TCTI_CONTEXT *tcti = NULL;
	TSS2_RC rc;
	size_t got = max;

	rc = Tss2_TctiLdr_Initialize(shim_config.tcti, &tcti);
	if (rc == TSS2_RC_SUCCESS)
		rc = Tss2_Tcti_Transmit(tcti, len, cmd);
	if (rc == TSS2_RC_SUCCESS)
		rc = Tss2_Tcti_Receive(tcti, &got, rsp, TSS2_TCTI_TIMEOUT_BLOCK);
	if (tcti)
		Tss2_TctiLdr_Finalize(&tcti);
	if (rc == TSS2_RC_SUCCESS && got >= 10)
		return got;
	printk("tpm_tis: the TPM at %s does not answer: %s\n", shim_config.tcti, Tss2_RC_Decode(rc));
	/* tag of the command, size 10, TPM_RC_FAILURE (TPM 2.0) / TPM_FAIL (1.2) */
	memcpy(rsp, cmd, 2);
	memcpy(rsp + 2, "\x00\x00\x00\x0a", 4);
	memcpy(rsp + 6, cmd[0] == 0x80 ? "\x00\x00\x01\x01" : "\x00\x00\x00\x09", 4);
	return 10;
}

static void relay(void *arg)
{
	static uint8_t cmd[MAX_PACKET], rsp[MAX_PACKET];
	(void)arg;
	for (;;) {
		ssize_t n = recv(chip.fds[1], cmd, sizeof(cmd), 0);
		size_t len;
		if (n <= 0)
			return;                  /* the manager closed its end */
		if (n < 10)
			continue;
		if (shim_config.crash_cc && be32(cmd + 6) == shim_config.crash_cc &&
		    ++chip.commands == shim_config.crash_nth) {
			printk("tpm_tis: stopping the domain before TPM command 0x%x (--crash-before-tpm-command)\n",
			       shim_config.crash_cc);
			raise(SIGKILL);
		}
		len = transmit(cmd, (size_t)n, rsp, sizeof(rsp));
		if (send(chip.fds[1], rsp, len, MSG_NOSIGNAL) < 0)
			return;
	}
}

static struct tpm_chip *init_chip(void)
{
	if (chip.fds[0] < 0) {
		if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, chip.fds)) {
			printk("tpm_tis: socketpair: %s\n", strerror(errno));
			return NULL;
		}
		create_thread("tpm_tis", relay, NULL);
	}
	return &chip;
}

struct tpm_chip *init_tpm_tis(unsigned long baseaddr, int localities, unsigned int irq)
{
	(void)baseaddr; (void)localities; (void)irq;
	return init_chip();
}

struct tpm_chip *init_tpm2_tis(unsigned long baseaddr, int localities, unsigned int irq)
{
	(void)baseaddr; (void)localities; (void)irq;
	return init_chip();
}

int tpm_tis_open(struct tpm_chip *tpm)
{
	return tpm->fds[0];
}

/* One TCTI connection per command carries no locality; the TPM answers at its default. */
int tpm_tis_request_locality(struct tpm_chip *tpm, int locality)
{
	(void)tpm;
	return locality;
}

/* tpmdriver=tpmfront (a manager behind another domain's vTPM) is not simulated. */
struct tpmfront_dev *init_tpmfront(const char *nodename)
{
	(void)nodename;
	printk("tpmfront: not simulated; use tpmdriver=tpm_tis\n");
	return NULL;
}

int tpmfront_open(struct tpmfront_dev *dev)
{
	(void)dev;
	return -1;
}
