#!/usr/bin/env python3
"""The small_writes workload of scripts/bench.sh.

    smallwrites.py FILE N

Creates FILE and writes it with N write(2) calls of 100 bytes (a log, a
compiler's output); prints the seconds the writes took (without Python's
start-up) and the file's size.
"""

import os
import sys
import time


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    buf = b"x" * 99 + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(fd, buf)
    dt = time.perf_counter() - t0
    os.close(fd)
    os.write(1, f"{dt:.6f} {os.stat(path).st_size}\n".encode())


if __name__ == "__main__":
    main()
