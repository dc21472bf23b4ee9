#ifndef SHIM_XEN_XEN_H
#define SHIM_XEN_XEN_H
#include <stdint.h>
typedef uint16_t domid_t;
#endif
