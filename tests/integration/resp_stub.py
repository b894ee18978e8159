"""A stand-in for the embedded Redis binary: speaks just enough RESP on 127.0.0.1:PORT to play a server that is
still loading (-LOADING to the first N PINGs, then +PONG; N < 0: loading forever) or one that accepts
connections and never answers (--silent). Run as `python resp_stub.py PORT [--loading N | --silent]`.
"""

from __future__ import annotations

import argparse
import socket
import threading
from typing import BinaryIO

LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"


class Stub:
    def __init__(self, loading: int, silent: bool) -> None:
        self.loading = loading
        self.silent = silent
        self._lock = threading.Lock()

    def answer(self, command: bytes) -> bytes:
        if command.upper() == b"HELLO":  # redis-py's RESP3 handshake (a real server answers it while loading)
            return b"%1\r\n$5\r\nproto\r\n:3\r\n"
        if command.upper() != b"PING":
            return b"+OK\r\n"
        with self._lock:
            if self.loading == 0:
                return b"+PONG\r\n"
            if self.loading > 0:
                self.loading -= 1
            return LOADING

    def serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as reader:
            while (command := _read_command(reader)) is not None:
                if not self.silent:
                    connection.sendall(self.answer(command))


def _read_command(reader: BinaryIO) -> bytes | None:
    """The name of the next command (a RESP array of bulk strings); None at end of stream."""
    header = reader.readline()
    if not header.startswith(b"*"):
        return None
    parts = []
    for _ in range(int(header[1:])):
        length = int(reader.readline()[1:])
        parts.append(reader.read(length + 2)[:-2])
    return parts[0] if parts else b""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--loading", type=int, default=0)
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args()
    stub = Stub(args.loading, args.silent)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        while True:
            connection, _ = listener.accept()
            threading.Thread(target=stub.serve, args=(connection,), daemon=True).start()


if __name__ == "__main__":
    main()
