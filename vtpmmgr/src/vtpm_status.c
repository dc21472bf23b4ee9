/*
 * vtpmmgr status nodes for dom0 tools.  See vtpm_status.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <mini-os/xenbus.h>

#include "log.h"
#include "vtpm_manager.h"
#include "uuid.h"
#include "vtpmmgr.h"
#include "vtpm_disk.h"
#include "vtpm_status.h"

#ifndef VTPMMGR_BUILD
#define VTPMMGR_BUILD "stubdom xen-4.17 vtpmmgr"
#endif
#ifndef XEN_VTPM_SERIES
#define XEN_VTPM_SERIES "unknown"
#endif

#define STATUS_DIR "data/vtpmmgr/"

static int last_persistent = -1;
static uint32_t last_counter = ~0u;

static void put(const char *node, const char *value)
{
	char *err = xenbus_write(XBT_NIL, node, value);
	if (err) {
		printk("vtpmmgr: cannot write %s (%s)\n", node, err);
		free(err);
	}
}

static int persistent(void)
{
	struct mem_group *group0 = g_mgr ? g_mgr->groups[0].v : NULL;
	return group0 && group0->nr_seals;   /* vtpm_sync_disk writes nothing before */
}

void vtpm_status_refresh(void)
{
	uint32_t counter = g_mgr ? be32_native(g_mgr->counter_index) : 0;
	int now = persistent();
	char text[32];

	if (now != last_persistent) {
		put(STATUS_DIR "persistent", now ? "1" : "0");
		last_persistent = now;
	}
	if (counter != last_counter) {
		if (counter)
			snprintf(text, sizeof(text), "nv-counter 0x%08" PRIx32, counter);
		else
			snprintf(text, sizeof(text), "none");
		put(STATUS_DIR "anti-rollback", text);
		last_counter = counter;
	}
}

void vtpm_status_publish(void)
{
	put(STATUS_DIR "build", VTPMMGR_BUILD ", xen-vtpm patches " XEN_VTPM_SERIES);
	put(STATUS_DIR "tpm", hw_is_tpm2() ? "2.0" : "1.2");
	vtpm_status_refresh();
}
