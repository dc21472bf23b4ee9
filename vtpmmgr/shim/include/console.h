#include <mini-os/console.h>
