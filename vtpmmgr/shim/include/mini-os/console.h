/* mini-os console: printk writes a line to the domain's console (here: the process's stdout). */
#ifndef SHIM_MINIOS_CONSOLE_H
#define SHIM_MINIOS_CONSOLE_H
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#endif
