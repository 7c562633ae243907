#!/usr/bin/env python3
"""The naive way to get `docker diff`: walk two merged views in full and compare.

    naive_diff.py NEW_ROOT OLD_ROOT

NEW_ROOT is the merged view of upper+lowers, OLD_ROOT the lowers alone (here
two read-only kernel overlay mounts). Every entry of both trees is lstat-ed;
the changes follow moby's go-archive ChangesDirs/addChanges/statDifferent
(the rules `layerfs diff` implements without a mount), printed as `K /path`
sorted by path bytes. It is the baseline that `layerfs diff` is timed against.
"""

import os
import stat
import sys


def walk(root):
    """{relpath(bytes): (stat, [child names])} for every entry below root."""
    tree = {}
    stack = [b""]
    rootb = os.fsencode(root)
    st = os.lstat(rootb)
    tree[b""] = (st, [])
    while stack:
        rel = stack.pop()
        names = tree[rel][1]
        with os.scandir(rootb + b"/" + rel if rel else rootb) as it:
            for e in it:
                crel = rel + b"/" + e.name if rel else e.name
                cst = e.stat(follow_symlinks=False)
                tree[crel] = (cst, [])
                names.append(e.name)
                if stat.S_ISDIR(cst.st_mode):
                    stack.append(crel)
    return tree


def same_fs_time(a, b):
    return a == b or (a // 10**9 == b // 10**9 and (a % 10**9 == 0 or b % 10**9 == 0))


def stat_different(old, new):
    return (old.st_mode != new.st_mode or old.st_uid != new.st_uid or old.st_gid != new.st_gid
            or old.st_rdev != new.st_rdev
            or (not stat.S_ISDIR(old.st_mode)
                and (not same_fs_time(old.st_mtime_ns, new.st_mtime_ns) or old.st_size != new.st_size)))


def changes(new, old):
    out = []

    def add(rel, old_exists, added):
        """moby addChanges for the new entry rel."""
        size_at_entry = len(out)
        st, names = new[rel]
        if not old_exists:
            if rel:
                out.append((b"A", rel))
            added = True
        old_children = set(old[rel][1]) if old_exists and stat.S_ISDIR(old[rel][0].st_mode) else set()
        for name in names:
            crel = rel + b"/" + name if rel else name
            child_added = False
            if name in old_children:
                if stat_different(old[crel][0], new[crel][0]):
                    out.append((b"C", crel))
                    child_added = True
                old_children.discard(name)
                add(crel, True, child_added)
            else:
                add(crel, False, False)
        for name in old_children:
            out.append((b"D", rel + b"/" + name if rel else name))
        if len(out) > size_at_entry and stat.S_ISDIR(st.st_mode) and not added and rel:
            out.insert(size_at_entry, (b"C", rel))

    sys.setrecursionlimit(100000)
    add(b"", True, False)
    return out


def main():
    new = walk(sys.argv[1])
    old = walk(sys.argv[2])
    res = sorted(set(changes(new, old)), key=lambda kc: kc[1])
    w = sys.stdout.buffer
    for k, p in res:
        w.write(k + b" /" + p + b"\n")


if __name__ == "__main__":
    main()
