#!/usr/bin/env python3
"""The least work any user-space TCP relay can do, as a reference for bench/run.sh.

    python3 bench/relay.py LISTEN_PORT UPSTREAM_PORT

Each connection gets two blocking threads, one per direction, that move bytes socket
to socket with splice(2) through a pipe: no copy into the process, no event loop, no
counters, no timeouts. Whatever throughput it loses against a direct connection is the
kernel's cost of a second TCP connection plus the scheduling of a third process on the
machine's cores, a floor that no proxy on this machine can go under. It is a
benchmark peer only; it has none of wasmbassador's features.
"""
import fcntl
import os
import socket
import sys
import threading

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


def pump(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only means smaller chunks
    try:
        while True:
            n = os.splice(src.fileno(), w, PIPE_SIZE)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    os.close(r)
    os.close(w)


def main() -> None:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    server = socket.create_server(("127.0.0.1", listen_port))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
