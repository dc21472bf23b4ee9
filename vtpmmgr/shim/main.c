/* The manager's boot for a native build: what vtpmmgr.c main() and init.c vtpmmgr_init() do on
 * mini-os, with the simulator's disk, TPM and rings.
 *
 *   vtpmmgr-native --domid M --disk IMG --tcti TCTI --run-dir DIR [--no-provision] [-- ARGS...]
 *       serve as domain M (XENSTORED_PATH names M's xenstored connection); ARGS are the domain's
 *       command line (extra=), e.g. tpm2=1 checkpoint=0.
 *   vtpmmgr-native --dump --disk IMG --tcti TCTI
 *       load the table with Xen's disk code and print it (tests read the sealed disk this way).
 *
 * A fresh manager is provisioned like `manage-vtpmmgr.pl group-update 0` would: one seal for the
 * current PCRs 0-7 and one kernel hash, SHA-1 of the XSM label tpmback reports, so the table
 * persists and reconnecting vTPMs are authorized (docs/protocol.md, "The simulated host"). */
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mini-os/console.h>
#include <mini-os/tpmback.h>
#include <mini-os/xenbus.h>
#include <polarssl/sha1.h>

#include "log.h"
#include "uuid.h"
#include "tcg.h"
#include "vtpm_manager.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "disk_tpm.h"
#include "vtpm_checkpoint.h"

#include "shim.h"

struct shim_config shim_config = {
	.xsm_label = "system_u:system_r:vtpm_t",
	.provision = 1,
};

static volatile sig_atomic_t do_shutdown;

/* init.c set_opaque/free_opaque, as patched by the checkpoint extension. */
static void set_opaque(domid_t domid, unsigned int handle)
{
	struct tpm_opaque *opq = calloc(1, sizeof(*opq));
	if (!opq)
		abort();
	opq->uuid = (uuid_t *)tpmback_get_uuid(domid, handle);
	opq->domid = domid;
	opq->handle = handle;
	tpmback_set_opaque(domid, handle, opq);
	vtpm_ckpt_conn_opened(opq);
}

static void free_opaque(domid_t domid, unsigned int handle)
{
	struct tpm_opaque *opq = tpmback_get_opaque(domid, handle);
	vtpm_ckpt_lock();
	vtpm_ckpt_conn_closed(opq);
	if (opq && opq->vtpm)
		opq->vtpm->flags &= ~VTPM_FLAG_OPEN;
	vtpm_ckpt_unlock();
	free(opq);
}

/* What a signed GROUP_UPDATE of group 0 commits (vtpm_cmd_handler.c vtpmmgr_GroupUpdate). */
static void provision_group0(void)
{
	struct mem_group *group = g_mgr->groups[0].v;
	group->seals = calloc(1, sizeof(group->seals[0]));
	if (!group->seals)
		abort();
	group->nr_seals = 1;
	group->seals[0].pcr_selection = native_le32(0xff);
	TPM_pcr_digest(&group->seals[0].digest_release, group->seals[0].pcr_selection);
	sha1((const unsigned char *)shim_config.xsm_label, strlen(shim_config.xsm_label),
	     group->seal_bits.kernels[0].bits);
	group->seal_bits.nr_kerns = native_be32(1);
	group->details.cfg_seq = native_be64(1);
	group->flags &= ~MEM_GROUP_FLAG_SEAL_VALID;
	g_mgr->root_seals_valid = 0;
}

static int count_entries(void)
{
	int g, p, n = 0;
	for (g = 0; g < g_mgr->nr_groups; g++)
		if (g_mgr->groups[g].v)
			for (p = 0; p < g_mgr->groups[g].v->nr_pages; p++)
				n += g_mgr->groups[g].v->data[p].size;
	return n;
}

static void hex(const void *buf, size_t len)
{
	const uint8_t *b = buf;
	size_t i;
	for (i = 0; i < len; i++)
		printf("%02x", b[i]);
}

static int dump(void)
{
	int g, p, i;
	TPM_read_pcrs();
	if (vtpm_load_disk())
		return 2;
	printf("dump slot %d sequence %" PRIu64 "\ndump tm_key ", g_mgr->active_root, g_mgr->sequence);
	hex(&g_mgr->tm_key, 16);
	printf("\n");
	for (g = 0; g < g_mgr->nr_groups; g++) {
		struct mem_group *group = g_mgr->groups[g].v;
		if (!group)
			continue;
		printf("dump group %d key ", g);
		hex(&group->group_key, 16);
		printf("\n");
		for (p = 0; p < group->nr_pages; p++)
			for (i = 0; i < group->data[p].size; i++) {
				struct mem_vtpm *v = group->data[p].vtpms[i];
				printf("dump entry ");
				hex(v->uuid, 16);
				printf(" %08" PRIx32 " ", v->flags);
				hex(v->data, 64);
				printf("\n");
			}
	}
	return 0;
}

static void *signal_thread(void *arg)
{
	sigset_t *set = arg;
	int sig;
	sigwait(set, &sig);
	printk("Shutdown requested: %d\n", sig);
	do_shutdown = 1;
	shutdown_tpmback();
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: vtpmmgr-native --domid M --disk IMG --tcti TCTI --run-dir DIR [--no-provision]"
		" [-- ARGS...]\n       vtpmmgr-native --dump --disk IMG --tcti TCTI\n");
	exit(64);
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "domid", required_argument, NULL, 'd' }, { "disk", required_argument, NULL, 'k' },
		{ "tcti", required_argument, NULL, 't' }, { "run-dir", required_argument, NULL, 'r' },
		{ "no-provision", no_argument, NULL, 'n' }, { "dump", no_argument, NULL, 'D' }, { 0 },
	};
	static uint8_t respbuf[TCPA_MAX_BUFFER_LENGTH];
	sigset_t set;
	pthread_t tid;
	int opt, dump_only = 0, dom_argc;
	char **dom_argv;

	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 'd': shim_config.domid = (domid_t)strtoul(optarg, NULL, 10); break;
		case 'k': shim_config.disk_path = optarg; break;
		case 't': shim_config.tcti = optarg; break;
		case 'r': shim_config.run_dir = optarg; break;
		case 'n': shim_config.provision = 0; break;
		case 'D': dump_only = 1; break;
		default: usage();
		}
	}
	if (!shim_config.disk_path || !shim_config.tcti || (!dump_only && !shim_config.run_dir))
		usage();
	/* The domain's own command line: argv[0] then the extra= words, as mini-os passes them. */
	dom_argc = argc - optind + 1;
	dom_argv = argv + optind - 1;
	dom_argv[0] = argv[0];

	if (vtpm_storage_init()) {
		printk("ERROR[VTPM]: Unable to initialize storage subsystem!\n");
		return 1;
	}
	if (dump_only)
		return dump();

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	pthread_create(&tid, NULL, signal_thread, &set);
	pthread_detach(tid);

	printk("INFO[VTPM]: Starting vTPM manager domain %u\n", shim_config.domid);
	if (shim_xenbus_init()) {
		printk("xenbus: cannot connect to xenstored (XENSTORED_PATH)\n");
		return 1;
	}
	init_tpmback(set_opaque, free_opaque);

	TPM_read_pcrs();
	if (vtpm_load_disk()) {
		printk("INFO[VTPM]: Failed to read manager file. Assuming first time initialization.\n");
		if (vtpm_new_disk())
			return 1;
		if (shim_config.provision)
			provision_group0();
	} else {
		printk("vtpmmgr: loaded %d entries (sequence %" PRIu64 ", slot %d)\n", count_entries(),
		       g_mgr->sequence, g_mgr->active_root);
	}

	vtpm_ckpt_start(dom_argc, dom_argv);
	printk("vtpmmgr: ready\n");

	/* vtpmmgr.c main_loop, as patched by the checkpoint extension */
	while (!do_shutdown) {
		tpmcmd_t *tpmcmd = tpmback_req_any();
		if (tpmcmd == NULL)
			continue;
		tpmcmd->resp = respbuf;
		vtpm_ckpt_handle_cmd(tpmcmd->opaque, tpmcmd);
		tpmback_resp(tpmcmd);
	}
	printk("INFO[VTPM]: vTPM Manager shutting down...\n");
	return 0;
}
