#include <mini-os/xenbus.h>
