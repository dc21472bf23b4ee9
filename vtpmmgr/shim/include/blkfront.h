/* mini-os blkfront: the manager's disk (cfg disk=) as a file; blkfront_open returns a file descriptor
 * that disk_io.c reads and writes with lseek/read/write like the mini-os one. */
#ifndef SHIM_BLKFRONT_H
#define SHIM_BLKFRONT_H
struct blkfront_dev;
struct blkfront_info {
	unsigned long sectors;
	unsigned sector_size;
	int mode;
};
struct blkfront_dev *init_blkfront(char *nodename, struct blkfront_info *info);
int blkfront_open(struct blkfront_dev *dev);
void blkfront_sync(struct blkfront_dev *dev);
#endif
