#!/usr/bin/env python3
"""One job of the concurrency workloads of scripts/bench.sh.

    fsjob.py READ_DIR WRITE_DIR PREFIX N

Reads every file below READ_DIR (a lower-backed tree of its own), then in
WRITE_DIR creates N files PREFIX<k> of 4 KiB, stats each, reads each back
and unlinks them all. WRITE_DIR is the job's own dir or one shared by all
jobs (contention on one directory). Plain syscalls, no per-file process.
"""

import os
import sys


def main():
    read_dir, write_dir, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    total = 0
    for root, _dirs, files in os.walk(read_dir):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                total += len(b)
            os.close(fd)
    data = os.urandom(4096)
    os.makedirs(write_dir, exist_ok=True)
    dfd = os.open(write_dir, os.O_RDONLY | os.O_DIRECTORY)
    names = [f"{prefix}{k:06d}" for k in range(n)]
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
        os.write(fd, data)
        os.close(fd)
    for name in names:
        if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size != 4096:
            sys.exit(f"fsjob: {write_dir}/{name}: wrong size")
    for name in names:
        fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
        if os.read(fd, 8192) != data:
            sys.exit(f"fsjob: {write_dir}/{name}: wrong content")
        os.close(fd)
    for name in names:
        os.unlink(name, dir_fd=dfd)
    os.close(dfd)
    # One write: the jobs share stdout, and print() makes two writes (the
    # number, then the newline) when Python runs unbuffered
    # (PYTHONUNBUFFERED), which interleaved two jobs' lines into one.
    os.write(1, f"{total}\n".encode())


if __name__ == "__main__":
    main()
