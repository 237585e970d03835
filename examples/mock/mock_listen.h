/* Listening helpers shared by sluice-mock and sluice-mock-stt (mock_listen.c). */
#ifndef MOCK_LISTEN_H
#define MOCK_LISTEN_H

#include <sys/socket.h>
#include <uv.h>

/* Resolves "HOST:PORT" ("[v6]:PORT" too) into *ss; non-numeric hosts are looked up. Returns 0
 * or a negative libuv error. */
int mock_resolve_listen(uv_loop_t *loop, const char *spec, struct sockaddr_storage *ss);
/* Writes "port\n" to path via a temporary file and rename, so readers never see half of it.
 * Returns 0 or -1. */
int mock_write_port_file(const char *path, int port);

#endif
