#ifndef SHIM_MINIOS_ENDIAN_H
#define SHIM_MINIOS_ENDIAN_H
#include <endian.h>
#endif
