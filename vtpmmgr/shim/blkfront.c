/* mini-os blkfront for a native build: the manager's disk is the image file named on the command
 * line; disk_io.c then does its own lseek/read/write on the descriptor, as it does in mini-os. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <blkfront.h>
#include <mini-os/console.h>

#include "shim.h"

struct blkfront_dev {
	int fd;
};

static struct blkfront_dev disk = { -1 };

struct blkfront_dev *init_blkfront(char *nodename, struct blkfront_info *info)
{
	struct stat st;
	(void)nodename;
	disk.fd = open(shim_config.disk_path, O_RDWR | O_CLOEXEC);
	if (disk.fd < 0 || fstat(disk.fd, &st)) {
		printk("blkfront: cannot open %s\n", shim_config.disk_path);
		return NULL;
	}
	info->sector_size = 512;
	info->sectors = (unsigned long)(st.st_size / 512);
	info->mode = O_RDWR;
	return &disk;
}

int blkfront_open(struct blkfront_dev *dev)
{
	return dev->fd;
}

void blkfront_sync(struct blkfront_dev *dev)
{
	/* The write barrier of disk_write_all: a failed flush is a failed write (mini-os would BUG). */
	if (fdatasync(dev->fd))
		abort();
}
