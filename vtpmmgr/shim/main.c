/* The manager's process for a native build: what mini-os and Xen give the domain, then Xen's own
 * main() (vtpmmgr.c, built as vtpmmgr_stubdom_main) with the patched init.c, disk code, TPM code.
 *
 *   vtpmmgr-native --domid M --disk IMG --tcti TCTI --run-dir DIR [OPTIONS] [-- ARGS...]
 *       serve as domain M (XENSTORED_PATH names M's xenstored connection); ARGS are the domain's
 *       command line (extra=), e.g. tpm2=1 tpm2_pcrs=0-7 vtpm_label=system_u:system_r:vtpm_t
 *   vtpmmgr-native --dump --disk IMG --tcti TCTI [-- ARGS...]
 *       load the table with Xen's disk code (read-only: a stale root is reported, not refused, and
 *       the NV counter is not advanced) and print it; ARGS as for the manager, tpm2=1 by default
 *
 * OPTIONS are the hypervisor and toolstack behaviours Xen 4.17 leaves to the host (vtpmmgr/README.md):
 *   --xsm flask|none      FLASK (default): every frontend has the label --xsm-label; none: the dummy
 *                         XSM module fails tpmback_get_peercontext, as on x86 Xen 4.17 without FLASK
 *   --xsm-label LABEL     default system_u:system_r:vtpm_t
 *   --no-provision        ignore the provisioning words (tpm2_pcrs=, vtpm_label=, tpm2_authority=):
 *                         group 0 gets no seal and no kernel, as a manager nobody provisioned
 *   --release-delay S     run tpmback's close callback S seconds after a frontend went away, while
 *                         new frontends are served: libxl removed the backend before the manager freed it
 *   --crash-before-tpm-command CC[:N]
 *                         die (SIGKILL) just before the Nth TPM command with code CC (test seam) */
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mini-os/console.h>
#include <mini-os/tpm_tis.h>
#include <mini-os/xenbus.h>

#include "log.h"
#include "uuid.h"
#include "tcg.h"
#include "vtpm_manager.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "tpm2.h"
#include "tpm2_seal.h"
#include "tpm2_counter.h"

#include "shim.h"

struct shim_config shim_config = {
	.xsm = 1,
	.xsm_label = "system_u:system_r:vtpm_t",
};

/* Xen's main() of vtpmmgr.c, renamed by the build. */
int vtpmmgr_stubdom_main(int argc, char **argv);
void app_shutdown(unsigned int reason);

static const char *const PROVISIONING_WORDS[] = { "tpm2_pcrs=", "vtpm_label=", "tpm2_authority=" };

static void hex(const void *buf, size_t len)
{
	const uint8_t *b = buf;
	size_t i;
	for (i = 0; i < len; i++)
		printf("%02x", b[i]);
}

static void print_table(void)
{
	int g, p, i;
	printf("dump slot %d sequence %" PRIu64 " counter %" PRIu32 "\ndump tm_key ", g_mgr->active_root,
	       g_mgr->sequence, be32_native(g_mgr->counter_value));
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
}

/* vtpmmgr2_init up to the load, without what would disturb a running manager: no flush of the
 * TPM's objects, no tpmback; the SRK is the persistent one (srk_handle=) or a transient copy. */
static int dump(int argc, char **argv)
{
	struct tpm_chip *tpm;
	int i, rc, transient_srk;

	parse_cmdline_hw(argc, argv);
	if (!hw_is_tpm2()) {
		fprintf(stderr, "vtpmmgr-native --dump: only TPM 2.0 tables (tpm2=1) can be read\n");
		return 64;
	}
	for (i = 1; i < argc; i++)
		if (!strncmp(argv[i], "srk_handle=", 11) && sscanf(argv[i] + 11, "%x", &vtpm_globals.srk_handle) != 1)
			return 64;
	if (tpm2_seal_parse_args(argc, argv) || tpm2_counter_parse_args(argc, argv))
		return 64;
	tpm2_counter_read_only();
	if (vtpm_storage_init() || !(tpm = init_tpm2_tis(0, 0, 0)))
		return 1;
	vtpm_globals.tpm_fd = tpm_tis_open(tpm);
	transient_srk = vtpm_globals.srk_handle == 0;
	if (transient_srk && tpm2_take_ownership())
		return 1;
	rc = vtpm_load_disk();
	if (!rc)
		print_table();
	if (transient_srk)
		TPM2_FlushContext(vtpm_globals.srk_handle);
	return rc ? 2 : 0;
}

static void *signal_thread(void *arg)
{
	sigset_t *set = arg;
	int sig;
	sigwait(set, &sig);
	app_shutdown((unsigned int)sig);
	return NULL;
}

static int is_provisioning_word(const char *word)
{
	size_t i;
	for (i = 0; i < sizeof(PROVISIONING_WORDS) / sizeof(PROVISIONING_WORDS[0]); i++)
		if (!strncmp(word, PROVISIONING_WORDS[i], strlen(PROVISIONING_WORDS[i])))
			return 1;
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: vtpmmgr-native --domid M --disk IMG --tcti TCTI --run-dir DIR [--xsm flask|none] "
		"[--xsm-label LABEL] [--no-provision] [--release-delay S] [--crash-before-tpm-command CC[:N]] "
		"[-- ARGS...]\n       vtpmmgr-native --dump --disk IMG --tcti TCTI [-- ARGS...]\n");
	exit(64);
}

int main(int argc, char **argv)
{
	enum { O_XSM = 256, O_LABEL, O_UNPROVISIONED, O_RACE, O_CRASH };
	static const struct option options[] = {
		{ "domid", required_argument, NULL, 'd' }, { "disk", required_argument, NULL, 'k' },
		{ "tcti", required_argument, NULL, 't' }, { "run-dir", required_argument, NULL, 'r' },
		{ "dump", no_argument, NULL, 'D' }, { "xsm", required_argument, NULL, O_XSM },
		{ "xsm-label", required_argument, NULL, O_LABEL },
		{ "no-provision", no_argument, NULL, O_UNPROVISIONED },
		{ "release-delay", required_argument, NULL, O_RACE },
		{ "crash-before-tpm-command", required_argument, NULL, O_CRASH }, { 0 },
	};
	static char default_hw[] = "tpm2=1";
	char **dom_argv;
	sigset_t set;
	pthread_t tid;
	int opt, dump_only = 0, unprovisioned = 0, dom_argc, i, n;

	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 'd': shim_config.domid = (domid_t)strtoul(optarg, NULL, 10); break;
		case 'k': shim_config.disk_path = optarg; break;
		case 't': shim_config.tcti = optarg; break;
		case 'r': shim_config.run_dir = optarg; break;
		case 'D': dump_only = 1; break;
		case O_XSM:
			if (strcmp(optarg, "flask") && strcmp(optarg, "none"))
				usage();
			shim_config.xsm = !strcmp(optarg, "flask");
			break;
		case O_LABEL: shim_config.xsm_label = optarg; break;
		case O_UNPROVISIONED: unprovisioned = 1; break;
		case O_RACE: {
			char *end;
			double s = strtod(optarg, &end);
			if (end == optarg || *end || !(s >= 0 && s <= 3600))
				usage();
			shim_config.release_delay_ms = (unsigned int)(s * 1000 + 0.5);
			break;
		}
		case O_CRASH:
			shim_config.crash_nth = 1;
			if (sscanf(optarg, "%" SCNx32 ":%u", &shim_config.crash_cc, &shim_config.crash_nth) < 1 ||
			    !shim_config.crash_cc || !shim_config.crash_nth)
				usage();
			break;
		default: usage();
		}
	}
	if (!shim_config.disk_path || !shim_config.tcti || (!dump_only && !shim_config.run_dir))
		usage();

	/* The domain's own command line: argv[0] then the extra= words, as mini-os passes them. */
	dom_argv = calloc((size_t)(argc - optind + 2), sizeof(*dom_argv));
	if (!dom_argv)
		abort();
	dom_argv[0] = argv[0];
	for (i = optind, n = 1; i < argc; i++)
		if (!(unprovisioned && is_provisioning_word(argv[i])))
			dom_argv[n++] = argv[i];
	if (dump_only && n == 1)
		dom_argv[n++] = default_hw;
	dom_argc = n;

	if (dump_only)
		return dump(dom_argc, dom_argv);

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	pthread_create(&tid, NULL, signal_thread, &set);
	pthread_detach(tid);

	if (shim_xenbus_init()) {
		printk("xenbus: cannot connect to xenstored (XENSTORED_PATH)\n");
		return 1;
	}
	if (!shim_config.xsm)
		printk("xsm: no XSM module (dummy): tpmback_get_peercontext fails for every frontend\n");
	if (shim_config.release_delay_ms)
		printk("tpmback: a frontend's release (close callback, OPEN cleared) runs %u ms after it went away\n",
		       shim_config.release_delay_ms);
	return vtpmmgr_stubdom_main(dom_argc, dom_argv) ? 1 : 0;
}
