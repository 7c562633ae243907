#!/usr/bin/env python3
"""Layer sets for scripts/bench.sh, generated deterministically (fixed seed).

    gen.py tree OUT --files N --dirs D --big-mib M --copyup K --rm-files R
                    --conc-files C --src PYLIB --src-copies S --repo-copies G
    gen.py diffset OUT --files N --changes C
    gen.py memtree OUT --files N

Each command builds into OUT.tmp and renames it to OUT at the end, so an
interrupted run never leaves a half-built set behind. Must run as root
(whiteouts are char devices 0/0, opaque dirs use trusted.* xattrs).

tree: three lowers OUT/l1 (top) .. OUT/l3 (bottom), kernel overlayfs format:
  /tree/...          N files (over the three lowers) in D dirs: sizes 0..128 KiB
                     (mostly small), some symlinks and hard links, files shadowed
                     by a higher layer, char 0/0 whiteouts of files and dirs,
                     opaque dirs (trusted.overlay.opaque=y) in l1 and l2
  /bench/big.bin     M MiB in l3 (fio reads, 1 GiB copy-up)
  /bench/src.tar.gz  in l2: a source tree (the Python stdlib from the Debian
                     layers, S copies)
  /bench/repo        a git repo in l2 (G copies of the stdlib, committed); l1
                     modifies 5 files, whites out 2, adds 3 untracked ones
  /bench/rmtree      R files over the three lowers (rm -rf through the mount)
  /conc/j0../j3      C files each, /conc/shared: concurrent jobs
  OUT/copyup.txt     K visible small regular files (paths relative to the root)
  OUT/createdirs.txt 100 visible lower dirs to create files in
  OUT/manifest.json  counts
diffset: OUT/l1..l3 (N files) and OUT/upper with C changes (modified, chmod-ed,
  added files and dirs, whiteouts of files and dirs, opaque dirs).
memtree: OUT/l1 with N empty files, 100 per dir.
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

OPAQUE = "trusted.overlay.opaque"


def whiteout(path):
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def makedirs(path):
    os.makedirs(path, mode=0o755, exist_ok=True)


class Blob:
    """Pseudo-random file contents without generating bytes per file."""

    def __init__(self, rng, size=8 << 20):
        self.buf = rng.randbytes(size)
        self.rng = rng

    def get(self, n):
        off = self.rng.randrange(0, len(self.buf) - n)
        return self.buf[off:off + n]


def write_file(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def small_size(rng):
    r = rng.random()
    if r < 0.50:
        return rng.randrange(0, 2048)
    if r < 0.90:
        return rng.randrange(2048, 8192)
    if r < 0.99:
        return rng.randrange(8192, 32768)
    return rng.randrange(32768, 131072)


def finish(tmp, out):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


def start(out):
    tmp = out + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


# ---------------------------------------------------------------------------
# tree


def make_dirs(rng, n, prefix):
    """n directory paths (relative), a random tree at most 6 deep."""
    dirs = []
    depth = {}
    top = max(10, n // 200)
    for i in range(n):
        if i < top:
            parent = prefix
            d = 1
        else:
            # prefer parents created recently (bushy, not a chain)
            while True:
                p = dirs[rng.randrange(max(0, len(dirs) - 2000), len(dirs))]
                if depth[p] < 6:
                    break
            parent, d = p, depth[p] + 1
        name = f"{parent}/d{i:05d}"
        dirs.append(name)
        depth[name] = d
    return dirs


def ancestors(path):
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def gen_tree(a):
    rng = random.Random(20240601)
    blob = Blob(rng)
    out = os.path.abspath(a.out)
    tmp = start(out)
    L = [os.path.join(tmp, f"l{i}") for i in (1, 2, 3)]
    for p in L:
        makedirs(p)
    counts = {"files": [0, 0, 0], "symlinks": 0, "hardlinks": 0,
              "shadowed": 0, "file_whiteouts": 0, "dir_whiteouts": 0, "opaque_dirs": 0}

    dirs = make_dirs(rng, a.dirs, "tree")
    dirset = set(dirs)
    # Dirs whited out in l1 (hide l2/l3 content), opaque in l1 or in l2.
    cand = [d for d in dirs if d.count("/") >= 2]
    rng.shuffle(cand)
    nsp = max(3, a.dirs // 400)

    def under(path, s):
        return any(x in s for x in ancestors(path)) or path in s

    # not nested in each other; opaque dirs not below a whited-out one
    wh_dirs, opq1, opq2 = set(), set(), set()
    for d in cand:
        if len(wh_dirs) < nsp:
            if not under(d, wh_dirs) and not any(w.startswith(d + "/") for w in wh_dirs):
                wh_dirs.add(d)
        elif len(opq1) < nsp:
            # a whiteout inside an opaque dir of the same layer is meaningless
            # (the kernel lists it as a char device it cannot look up)
            if not under(d, wh_dirs) and not any(w.startswith(d + "/") for w in wh_dirs):
                opq1.add(d)
        elif len(opq2) < nsp:
            if not under(d, wh_dirs) and d not in opq1:
                opq2.add(d)
        else:
            break

    # Layer dirs: every dir exists in l3; higher layers get theirs on demand.
    for d in dirs:
        makedirs(os.path.join(L[2], d))
    made = [set(), set(), set(dirs)]

    def ensure_dir(layer, d):
        if d in made[layer]:
            return
        for anc in reversed(list(ancestors(d))):
            if anc and anc not in made[layer]:
                makedirs(os.path.join(L[layer], anc))
                made[layer].add(anc)
        makedirs(os.path.join(L[layer], d))
        made[layer].add(d)

    # l1 marks: whiteouts of dirs, opaque dirs (created first so no file of
    # l1 is put below a dir whiteout).
    for d in sorted(wh_dirs):
        parent = d.rsplit("/", 1)[0]
        ensure_dir(0, parent)
        whiteout(os.path.join(L[0], d))
        counts["dir_whiteouts"] += 1
    for layer, s in ((0, opq1), (1, opq2)):
        for d in sorted(s):
            ensure_dir(layer, d)
            os.setxattr(os.path.join(L[layer], d), OPAQUE, b"y")
            counts["opaque_dirs"] += 1

    visible = []        # (relpath, size) of regular files visible in the merged view
    files_by_layer = [[], [], []]
    hidden_by = {}
    for i in range(a.files):
        d = dirs[rng.randrange(len(dirs))]
        r = rng.random()
        layer = 2 if r < 0.5 else (1 if r < 0.8 else 0)
        if layer == 0 and under(d, wh_dirs):
            layer = 1
        rel = f"{d}/f{i:06d}" + (".txt" if i % 3 else ".bin")
        kind = rng.random()
        if kind < 0.02 and files_by_layer[layer]:
            ensure_dir(layer, d)
            os.symlink(f"../f{i - 1:06d}", os.path.join(L[layer], rel))
            counts["symlinks"] += 1
            counts["files"][layer] += 1
            continue
        if kind < 0.025 and files_by_layer[layer]:
            src = files_by_layer[layer][rng.randrange(len(files_by_layer[layer]))]
            ensure_dir(layer, d)
            os.link(os.path.join(L[layer], src), os.path.join(L[layer], rel))
            counts["hardlinks"] += 1
            counts["files"][layer] += 1
            continue
        ensure_dir(layer, d)
        size = small_size(rng)
        write_file(os.path.join(L[layer], rel), blob.get(size), 0o755 if i % 17 == 0 else 0o644)
        files_by_layer[layer].append(rel)
        counts["files"][layer] += 1
        # hidden in the merged view?
        hidden = False
        if layer > 0 and under(rel, wh_dirs):
            hidden = True
        if layer > 0 and any(x in opq1 for x in ancestors(rel)):
            hidden = True
        if layer > 1 and any(x in opq2 for x in ancestors(rel)):
            hidden = True
        if hidden:
            continue
        # shadowed by a higher layer (a different version) or whited out
        s = rng.random()
        if layer > 0 and s < 0.06:
            up = rng.randrange(0, layer)
            if up == 0 and under(rel, wh_dirs):
                up = None
            if up is not None:
                ensure_dir(up, d)
                write_file(os.path.join(L[up], rel), blob.get(small_size(rng)))
                counts["files"][up] += 1
                counts["shadowed"] += 1
                visible.append(rel)
                continue
        if layer > 0 and s > 0.97:
            up = rng.randrange(0, layer)
            if up == 0 and under(rel, wh_dirs):
                up = 1 if layer == 2 else None
            if up is not None:
                ensure_dir(up, d)
                whiteout(os.path.join(L[up], rel))
                counts["file_whiteouts"] += 1
                continue
        if size < 65536:
            visible.append(rel)

    # copy-up targets and dirs to create files in
    rng.shuffle(visible)
    copyup = sorted(visible[:a.copyup])
    with open(os.path.join(tmp, "copyup.txt"), "w") as f:
        f.write("".join(p + "\n" for p in copyup))
    okdirs = [d for d in dirs if not under(d, wh_dirs) and not under(d, opq1) and not under(d, opq2)]
    rng.shuffle(okdirs)
    with open(os.path.join(tmp, "createdirs.txt"), "w") as f:
        f.write("".join(p + "\n" for p in sorted(okdirs[:100])))

    # /bench/big.bin in l3
    makedirs(os.path.join(L[2], "bench"))
    chunk = rng.randbytes(1 << 20)
    with open(os.path.join(L[2], "bench", "big.bin"), "wb") as f:
        for i in range(a.big_mib):
            f.write(chunk[i % 4096:] + chunk[:i % 4096])
    print(f"big.bin: {a.big_mib} MiB", file=sys.stderr)

    # source tree from the Python stdlib (real code)
    def src_members(copies):
        for c in range(copies):
            for root, dnames, fnames in os.walk(a.src):
                dnames.sort()
                for fn in sorted(fnames):
                    full = os.path.join(root, fn)
                    if os.path.islink(full) or not os.path.isfile(full):
                        continue
                    yield full, f"mod{c}/" + os.path.relpath(full, a.src)

    makedirs(os.path.join(L[1], "bench"))
    nsrc = 0
    with tarfile.open(os.path.join(L[1], "bench", "src.tar.gz"), "w:gz", compresslevel=6) as tf:
        for full, name in src_members(a.src_copies):
            ti = tf.gettarinfo(full, arcname="project/" + name)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            with open(full, "rb") as fh:
                tf.addfile(ti, fh)
            nsrc += 1
    counts["src_tar_files"] = nsrc

    # git repo in l2, changed by l1
    repo = os.path.join(L[1], "bench", "repo")
    makedirs(repo)
    nrepo = 0
    for full, name in src_members(a.repo_copies):
        dst = os.path.join(repo, name)
        makedirs(os.path.dirname(dst))
        shutil.copyfile(full, dst)
        nrepo += 1
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=tmp,
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost",
               GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "import"], ["git", "gc", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, env=env, check=True,
                             capture_output=True, text=True).stdout.split()
    counts["repo_files"] = nrepo
    up_repo = os.path.join(L[0], "bench", "repo")
    pick = rng.sample(tracked, 7)
    for p in pick[:5]:
        makedirs(os.path.dirname(os.path.join(up_repo, p)))
        with open(os.path.join(repo, p), "rb") as fh:
            data = fh.read()
        write_file(os.path.join(up_repo, p), data + b"\n# changed in l1\n")
    for p in pick[5:]:
        makedirs(os.path.dirname(os.path.join(up_repo, p)))
        whiteout(os.path.join(up_repo, p))
    for i in range(3):
        write_file(os.path.join(up_repo, f"untracked{i}.txt"), b"new\n")

    # /bench/rmtree over the three lowers
    rmdirs = [f"bench/rmtree/r{i // 10:03d}/s{i % 10}" for i in range(max(10, a.rm_files // 10))]
    for i in range(a.rm_files):
        d = rmdirs[i % len(rmdirs)]
        layer = i % 3
        ensure_dir(layer, d)
        write_file(os.path.join(L[layer], d, f"x{i:05d}"), blob.get(rng.randrange(0, 4096)))
        counts["files"][layer] += 1

    # /conc: per-job dirs and a shared one
    for j in range(4):
        for i in range(a.conc_files):
            layer = i % 3
            d = f"conc/j{j}/s{i % 8}"
            ensure_dir(layer, d)
            write_file(os.path.join(L[layer], d, f"c{i:05d}"), blob.get(4096))
            counts["files"][layer] += 1
    for i in range(100):
        layer = i % 3
        ensure_dir(layer, "conc/shared")
        write_file(os.path.join(L[layer], "conc/shared", f"s{i:03d}"), blob.get(1024))
        counts["files"][layer] += 1

    counts["merged_dirs_tree"] = len(dirs)
    counts["layer_dirs"] = [len(m) for m in made]
    counts["copyup_candidates"] = len(copyup)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(counts, f, indent=1)
    finish(tmp, out)
    print(json.dumps(counts), file=sys.stderr)


# ---------------------------------------------------------------------------
# diffset


def gen_diffset(a):
    rng = random.Random(424242)
    blob = Blob(rng, 1 << 20)
    out = os.path.abspath(a.out)
    tmp = start(out)
    L = [os.path.join(tmp, f"l{i}") for i in (1, 2, 3)]
    U = os.path.join(tmp, "upper")
    for p in L + [U]:
        makedirs(p)
    ndirs = max(10, a.files // 25)
    dirs = make_dirs(rng, ndirs, "data")
    for d in dirs:
        makedirs(os.path.join(L[2], d))
    made = [set(), set(), set(dirs)]
    made_u = set()

    def ensure(root, madeset, d):
        if d in madeset:
            return
        parts = d.split("/")
        for k in range(1, len(parts) + 1):
            sub = "/".join(parts[:k])
            if sub not in madeset:
                makedirs(os.path.join(root, sub))
                madeset.add(sub)

    files = {}  # rel -> topmost layer
    for i in range(a.files):
        d = dirs[rng.randrange(ndirs)]
        r = rng.random()
        layer = 2 if r < 0.5 else (1 if r < 0.8 else 0)
        rel = f"{d}/f{i:06d}"
        ensure(L[layer], made[layer], d)
        write_file(os.path.join(L[layer], rel), blob.get(rng.randrange(0, 512)))
        files[rel] = layer
    rels = sorted(files)
    rng.shuffle(rels)
    c = a.changes
    n_mod, n_chmod, n_add, n_newdir, n_del, n_deldir, n_opq = (
        int(c * 0.30), int(c * 0.10), int(c * 0.25), int(c * 0.10), int(c * 0.20), int(c * 0.03), int(c * 0.02))
    it = iter(rels)
    done = 0
    for _ in range(n_mod):
        rel = next(it)
        ensure(U, made_u, rel.rsplit("/", 1)[0])
        write_file(os.path.join(U, rel), blob.get(rng.randrange(512, 1024)))
        done += 1
    for _ in range(n_chmod):
        rel = next(it)
        src = os.path.join(L[files[rel]], rel)
        ensure(U, made_u, rel.rsplit("/", 1)[0])
        shutil.copyfile(src, os.path.join(U, rel))
        os.chmod(os.path.join(U, rel), 0o600)
        st = os.stat(src)
        os.utime(os.path.join(U, rel), ns=(st.st_atime_ns, st.st_mtime_ns))
        done += 1
    for _ in range(n_del):
        rel = next(it)
        ensure(U, made_u, rel.rsplit("/", 1)[0])
        whiteout(os.path.join(U, rel))
        done += 1
    for i in range(n_add):
        d = dirs[rng.randrange(ndirs)]
        ensure(U, made_u, d)
        write_file(os.path.join(U, d, f"added{i:06d}"), blob.get(rng.randrange(0, 512)))
        done += 1
    i = 0
    while i < n_newdir:
        d = f"{dirs[rng.randrange(ndirs)]}/newdir{i:05d}"
        ensure(U, made_u, d)
        for k in range(min(10, n_newdir - i)):
            write_file(os.path.join(U, d, f"n{k}"), b"new\n")
            i += 1
            done += 1
    # whole dirs deleted / made opaque: leaf-most dirs not touched above
    # made_u holds every upper dir and its ancestors: a dir not in it has no
    # upper content below it
    leafy = [d for d in dirs if d not in made_u and d.count("/") >= 2]
    rng.shuffle(leafy)
    k = 0
    deleted = []
    for d in leafy:
        if k >= n_deldir:
            break
        if d in made_u or any(x in deleted for x in ancestors(d)):
            continue
        ensure(U, made_u, d.rsplit("/", 1)[0])
        whiteout(os.path.join(U, d))
        deleted.append(d)
        k += 1
        done += 1
    k = 0
    for d in leafy[n_deldir * 2:]:
        if k >= n_opq:
            break
        if d in deleted or any(x in deleted for x in ancestors(d)) or d in made_u:
            continue
        ensure(U, made_u, d)
        os.setxattr(os.path.join(U, d), OPAQUE, b"y")
        write_file(os.path.join(U, d, "only"), b"opaque\n")
        k += 1
        done += 1
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"files": a.files, "dirs": ndirs, "changes": done}, f)
    finish(tmp, out)
    print(f"diffset: {a.files} files in {ndirs} dirs, {done} changes", file=sys.stderr)


# ---------------------------------------------------------------------------
# memtree


def gen_memtree(a):
    out = os.path.abspath(a.out)
    tmp = start(out)
    root = os.path.join(tmp, "l1")
    makedirs(root)
    per = 100
    ndirs = (a.files + per - 1) // per
    n = 0
    for d in range(ndirs):
        dp = os.path.join(root, f"a{d // 100:04d}", f"b{d % 100:02d}")
        os.makedirs(dp)
        fd_dir = os.open(dp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(per, a.files - n)):
                os.close(os.open(f"file{i:03d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd_dir))
                n += 1
        finally:
            os.close(fd_dir)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"files": n, "dirs": ndirs}, f)
    finish(tmp, out)
    print(f"memtree: {n} files in {ndirs} dirs", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tree")
    t.add_argument("out")
    t.add_argument("--files", type=int, required=True)
    t.add_argument("--dirs", type=int, required=True)
    t.add_argument("--big-mib", type=int, required=True)
    t.add_argument("--copyup", type=int, required=True)
    t.add_argument("--rm-files", type=int, required=True)
    t.add_argument("--conc-files", type=int, required=True)
    t.add_argument("--src", required=True)
    t.add_argument("--src-copies", type=int, required=True)
    t.add_argument("--repo-copies", type=int, required=True)
    d = sub.add_parser("diffset")
    d.add_argument("out")
    d.add_argument("--files", type=int, required=True)
    d.add_argument("--changes", type=int, required=True)
    m = sub.add_parser("memtree")
    m.add_argument("out")
    m.add_argument("--files", type=int, required=True)
    a = p.parse_args()
    t0 = time.time()
    {"tree": gen_tree, "diffset": gen_diffset, "memtree": gen_memtree}[a.cmd](a)
    print(f"gen {a.cmd}: {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
