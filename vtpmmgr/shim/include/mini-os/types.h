#include <xen/xen.h>
