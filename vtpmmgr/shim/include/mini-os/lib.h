#ifndef SHIM_MINIOS_LIB_H
#define SHIM_MINIOS_LIB_H
#include <stddef.h>
#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif
#endif
