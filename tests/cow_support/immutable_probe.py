#!/usr/bin/env python3
"""Probe immutable (+i) / append-only (+a) semantics on an overlay mount.

usage: immutable_probe.py MOUNT UPPER [--phase all|test|recheck]

Case A ("lo/"): objects that exist only in lower layers with the flags set on
  the lower inodes before mounting (set up by the test, `immutable_and_append_only_objects` in
  cow_differential.rs; overlay/075 style).
  Run only if MOUNT/lo exists.
Case B ("up/"): objects created through the mount, then flagged with
  FS_IOC_SETFLAGS through the mount (generic/079 / overlay/030 style).

Every check prints one line:  "<case> <path> <op> => OK [info]"
                           or "<case> <path> <op> => ERR <ERRNO>"
                           or "<case> <path> <op> => BAD <what>"  (data checks)
Phases: test    = setup B, all checks, upper report (flags left set)
        recheck = after a mount cycle: flags/brief checks, report, clear, report
        all     = test + clear + report (single mount)
"""
import ctypes, errno, fcntl, mmap, os, stat, struct, sys

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FL_IMM, FL_APP = 0x10, 0x20
FL_LETTERS = [(0x1, 's'), (0x2, 'u'), (0x8, 'S'), (0x10000, 'D'), (0x10, 'i'),
              (0x20, 'a'), (0x40, 'd'), (0x80, 'A'), (0x4, 'c'), (0x800, 'E'),
              (0x4000, 'j'), (0x1000, 'I'), (0x8000, 't'), (0x20000, 'T'),
              (0x80000, 'e'), (0x800000, 'C'), (0x10000000, 'F'),
              (0x20000000, 'P'), (0x100000, 'V'), (0x2000000, 'x'),
              (0x200000, 'N'), (0x40000000, 'm')]
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x1, 0x2, 0x10
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
U = 0xFFFFFFFF

IMM_DATA = b"This is an immutable file.\nIts contents cannot be altered.\n"
APP_DATA = (b"This is an append-only file.\nIts contents cannot be altered.\n"
            b"Data can only be appended.\n---\n")
SCR = b"scribbled by tester\n"

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                           ctypes.c_char_p, ctypes.c_uint]
libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _c(ret):
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def c_access(p, mode): _c(libc.access(p.encode(), mode))
def c_fallocate(fd, mode, off, ln): _c(libc.fallocate(fd, mode, off, ln))
def c_renameat2(a, b, fl): _c(libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), fl))


def acl_value(ents):
    return struct.pack('<I', 2) + b''.join(struct.pack('<HHI', t, p, i) for t, p, i in ents)


ACL_ADD = acl_value([(1, 7, U), (2, 7, 1), (4, 7, U), (0x10, 7, U), (0x20, 7, U)])
ACL_MIN = acl_value([(1, 6, U), (4, 6, U), (0x20, 6, U)])
ACL_FILE = acl_value([(1, 6, U), (2, 6, 65534), (4, 6, U), (0x10, 6, U), (0x20, 6, U)])
ACL_DIR = acl_value([(1, 7, U), (2, 7, 65534), (4, 7, U), (0x10, 7, U), (0x20, 7, U)])


def none(_):
    return None


class Bad(Exception):
    pass


def out(s):
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


def ename(e):
    return errno.errorcode.get(e, str(e))


def chk(name, fn):
    """Run fn; print '<name> => OK [info]' / 'ERR <ERRNO>' / 'BAD <what>'.
    Returns True on success."""
    try:
        r = fn()
    except OSError as e:
        out(f"{name} => ERR {ename(e.errno)}")
        return False
    except (Bad, ValueError) as e:
        out(f"{name} => BAD {e}")
        return False
    out(f"{name} => OK" + ("" if r is None else f" {r}"))
    return True


def quiet(fn, *a):
    try:
        fn(*a)
    except OSError:
        pass


def letters(fl):
    s = ''.join(ch for bit, ch in FL_LETTERS if fl & bit)
    rest = fl & ~sum(b for b, _ in FL_LETTERS)
    return (s or '-') + (f"+{rest:#x}" if rest else '')


def getflags(p):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        return struct.unpack_from('<i', buf)[0] & 0xFFFFFFFF
    finally:
        os.close(fd)


def setflags(p, add=0, rm=0):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        fl = (struct.unpack_from('<i', buf)[0] | add) & ~rm
        buf = bytearray(struct.pack('<i', fl) + b'\0' * 4)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, True)
    finally:
        os.close(fd)


def showflags(p):
    fl = getflags(p)
    ia = ('i' if fl & FL_IMM else '-') + ('a' if fl & FL_APP else '-')
    return f"[{ia}] all={letters(fl)}"


def readall(p):
    with open(p, 'rb') as f:
        return f.read()


def expect_prefix(p, prefix, total=None):
    def f():
        d = readall(p)
        if not d.startswith(prefix):
            raise Bad(f"prefix changed (size={len(d)})")
        if total is not None and d != total:
            raise Bad(f"content differs (size={len(d)}, want {len(total)})")
        return f"size={len(d)}"
    return f


def stinfo(p):
    st = os.lstat(p)
    t = {stat.S_IFREG: 'reg', stat.S_IFDIR: 'dir', stat.S_IFCHR: 'chr',
         stat.S_IFLNK: 'lnk', stat.S_IFIFO: 'fifo'}.get(stat.S_IFMT(st.st_mode), '?')
    sz = f" size={st.st_size}" if t == 'reg' else ''
    return f"{t}{sz} mode={stat.S_IMODE(st.st_mode):04o} uid={st.st_uid} gid={st.st_gid}"


def try_open(p, flags, mode=0o666):
    fd = os.open(p, flags, mode)
    os.close(fd)


OPEN_NAMES = [
    ("O_WRONLY", os.O_WRONLY), ("O_RDWR", os.O_RDWR),
    ("O_RDWR|O_APPEND", os.O_RDWR | os.O_APPEND),
    ("O_WRONLY|O_APPEND", os.O_WRONLY | os.O_APPEND),
    ("O_WRONLY|O_CREAT", os.O_WRONLY | os.O_CREAT),
    ("O_RDONLY|O_TRUNC", os.O_RDONLY | os.O_TRUNC),
    ("O_RDWR|O_TRUNC", os.O_RDWR | os.O_TRUNC),
    ("O_WRONLY|O_TRUNC", os.O_WRONLY | os.O_TRUNC),
    ("O_RDWR|O_APPEND|O_TRUNC", os.O_RDWR | os.O_APPEND | os.O_TRUNC),
    ("O_WRONLY|O_APPEND|O_TRUNC", os.O_WRONLY | os.O_APPEND | os.O_TRUNC),
]


class Ctx:
    def __init__(self, mnt, case, rel):
        self.mnt, self.case, self.rel = mnt, case, rel
        self.root = os.path.join(mnt, rel)
        self.scratch = os.path.join(self.root, 'scratch')
        self.n = 0

    def p(self, *parts):
        return os.path.join(self.root, *parts)

    def name(self, path, op):
        return f"{self.case} {os.path.relpath(path, self.mnt)} {op}"

    def tmpfile(self, tag):
        """fresh plain file in the unflagged scratch dir"""
        self.n += 1
        t = os.path.join(self.scratch, f"t{self.n:03d}-{tag}")
        with open(t, 'wb') as f:
            f.write(b"tmp\n")
        return t

    def tmpdir(self, tag):
        self.n += 1
        t = os.path.join(self.scratch, f"d{self.n:03d}-{tag}")
        os.mkdir(t, 0o777)
        return t


# ---------------------------------------------------------------- attrs
def attr_checks(c, p, isdir):
    """chmod/chown/utimes/xattr/ACL on the flagged object itself"""
    N = lambda op: c.name(p, op)
    chk(N("utimes(explicit 0,0)"), lambda: os.utime(p, (0, 0)))
    chk(N("utimes(NULL)"), lambda: os.utime(p))
    mode = 0o777 if isdir else 0o666
    chk(N(f"chmod({mode:04o})"), lambda: os.chmod(p, mode))
    if chk(N("chown(1,1)"), lambda: os.chown(p, 1, 1)):
        quiet(os.chown, p, 0, 0)
    chk(N("chown(-1,-1)"), lambda: os.chown(p, -1, -1))
    chk(N("getxattr(user.test)"), lambda: os.getxattr(p, 'user.test').decode())
    chk(N("listxattr"), lambda: ','.join(sorted(os.listxattr(p))))
    chk(N("setxattr(user.test,REPLACE)"),
        lambda: os.setxattr(p, 'user.test', b'scribble', os.XATTR_REPLACE))
    if chk(N("setxattr(user.scribble,CREATE)"),
           lambda: os.setxattr(p, 'user.scribble', b'scribble', os.XATTR_CREATE)):
        quiet(os.removexattr, p, 'user.scribble')
    if chk(N("removexattr(user.test)"), lambda: os.removexattr(p, 'user.test')):
        quiet(os.setxattr, p, 'user.test', b'readonly')
    chk(N("setxattr(trusted.test,REPLACE)"),
        lambda: os.setxattr(p, 'trusted.test', b'scribble', os.XATTR_REPLACE))
    if chk(N("setxattr(trusted.scribble,CREATE)"),
           lambda: os.setxattr(p, 'trusted.scribble', b'scribble', os.XATTR_CREATE)):
        quiet(os.removexattr, p, 'trusted.scribble')
    if chk(N("removexattr(trusted.test)"), lambda: os.removexattr(p, 'trusted.test')):
        quiet(os.setxattr, p, 'trusted.test', b'readonly')
    acl0 = ACL_DIR if isdir else ACL_FILE
    if chk(N("set ACL u:daemon:rwx"),
           lambda: os.setxattr(p, 'system.posix_acl_access', ACL_ADD)):
        quiet(os.setxattr, p, 'system.posix_acl_access', acl0)
    if chk(N("set minimal ACL"),
           lambda: os.setxattr(p, 'system.posix_acl_access', ACL_MIN)):
        quiet(os.setxattr, p, 'system.posix_acl_access', acl0)
    if chk(N("removexattr(system.posix_acl_access)"),
           lambda: os.removexattr(p, 'system.posix_acl_access')):
        quiet(os.setxattr, p, 'system.posix_acl_access', acl0)
    if isdir:
        if chk(N("set default ACL"),
               lambda: os.setxattr(p, 'system.posix_acl_default', ACL_DIR)):
            quiet(os.removexattr, p, 'system.posix_acl_default')
    chk(N("stat"), lambda: stinfo(p))


def mmap_check(fd, shared, prot):
    m = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE, prot=prot)
    m.close()


def name_checks(c, p, parent):
    """link/rename/exchange of the flagged object (non-destructive if denied)"""
    N = lambda op: c.name(p, op)
    base = os.path.basename(p)
    hl = os.path.join(parent, base + ".hardlink")
    if chk(N("link(-> same dir)"), lambda: os.link(p, hl)):
        quiet(os.unlink, hl)
    new = os.path.join(parent, base + ".newname")
    if chk(N("rename(-> same dir)"), lambda: os.rename(p, new)):
        quiet(os.rename, new, p)
    other = os.path.join(c.scratch, base + ".moved")
    if chk(N("rename(-> other dir)"), lambda: os.rename(p, other)):
        quiet(os.rename, other, p)
    t = c.tmpfile("xchg") if not os.path.isdir(p) else c.tmpdir("xchg")
    if chk(N("renameat2(EXCHANGE with scratch)"), lambda: c_renameat2(p, t, RENAME_EXCHANGE)):
        quiet(c_renameat2, p, t, RENAME_EXCHANGE)


# ---------------------------------------------------------------- files
def test_imm_file(c, p, pre_fd=None):
    N = lambda op: c.name(p, op)
    out(f"# {c.case} immutable file {os.path.relpath(p, c.mnt)}")
    chk(N("getflags"), lambda: showflags(p))
    chk(N("content"), expect_prefix(p, IMM_DATA, IMM_DATA))
    chk(N("access(R_OK)"), lambda: c_access(p, os.R_OK))
    chk(N("access(W_OK)"), lambda: c_access(p, os.W_OK))
    chk(N("open(O_RDONLY)"), lambda: try_open(p, os.O_RDONLY))
    for nm, fl in OPEN_NAMES:
        chk(N(f"open({nm})"), lambda fl=fl: try_open(p, fl))
    size = len(IMM_DATA)
    chk(N("truncate(same size)"), lambda: os.truncate(p, size))
    chk(N("truncate(0)"), lambda: os.truncate(p, 0))
    attr_checks(c, p, False)
    fd = os.open(p, os.O_RDONLY)
    chk(N("mmap(PRIVATE,RW) on O_RDONLY fd"),
        lambda: mmap_check(fd, False, mmap.PROT_READ | mmap.PROT_WRITE))
    chk(N("mmap(SHARED,R) on O_RDONLY fd"), lambda: mmap_check(fd, True, mmap.PROT_READ))
    os.close(fd)
    if pre_fd is not None:
        # fd opened O_RDWR before chattr +i
        chk(N("pre-opened fd: pwrite(at EOF)"), lambda: none(os.pwrite(pre_fd, b"X", size)))
        chk(N("pre-opened fd: ftruncate(same size)"),
            lambda: os.ftruncate(pre_fd, os.fstat(pre_fd).st_size))
        chk(N("pre-opened fd: fallocate(KEEP_SIZE)"),
            lambda: c_fallocate(pre_fd, FALLOC_KEEP_SIZE, 0, 4096))
        chk(N("pre-opened fd: mmap(SHARED,RW)"),
            lambda: mmap_check(pre_fd, True, mmap.PROT_READ | mmap.PROT_WRITE))
        chk(N("pre-opened fd: fchmod(0666)"), lambda: os.chmod(pre_fd, 0o666))
        chk(N("pre-opened fd: futimens(0,0)"), lambda: os.utime(pre_fd, (0, 0)))
        chk(N("pre-opened fd: fsetxattr(user.test)"),
            lambda: os.setxattr(pre_fd, 'user.test', b'scribble'))
        chk(N("pre-opened fd: fsync"), lambda: os.fsync(pre_fd))
        os.close(pre_fd)
    name_checks(c, p, os.path.dirname(p))
    t = c.tmpfile("over")
    chk(N("rename(scratch file over it)"), lambda: os.rename(t, p))
    chk(N("content (end)"), expect_prefix(p, IMM_DATA))
    chk(N("unlink"), lambda: os.unlink(p))


def test_app_file(c, p, pre_fd=None):
    N = lambda op: c.name(p, op)
    out(f"# {c.case} append-only file {os.path.relpath(p, c.mnt)}")
    chk(N("getflags"), lambda: showflags(p))
    chk(N("content"), expect_prefix(p, APP_DATA, APP_DATA))
    chk(N("access(R_OK)"), lambda: c_access(p, os.R_OK))
    chk(N("access(W_OK)"), lambda: c_access(p, os.W_OK))
    chk(N("open(O_RDONLY)"), lambda: try_open(p, os.O_RDONLY))
    for nm, fl in OPEN_NAMES:
        if fl & os.O_APPEND and not fl & os.O_TRUNC:
            continue  # the allowed ones are tested below with writes
        chk(N(f"open({nm})"), lambda fl=fl: try_open(p, fl))
    chk(N("truncate(same size)"), lambda: os.truncate(p, os.stat(p).st_size))
    attr_checks(c, p, False)
    name_checks(c, p, os.path.dirname(p))
    t = c.tmpfile("over")
    chk(N("rename(scratch file over it)"), lambda: os.rename(t, p))
    # appending
    exp = APP_DATA
    fd = -1

    def op_wa():
        nonlocal fd
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    if chk(N("open(O_WRONLY|O_APPEND)"), op_wa):
        os.lseek(fd, 0, os.SEEK_SET)
        if chk(N("  write after lseek(0)"), lambda: none(os.write(fd, SCR))):
            exp += SCR
        if chk(N("  pwrite(off 0)"), lambda: none(os.pwrite(fd, SCR, 0))):
            exp += SCR
        os.close(fd)
    chk(N("content after O_WRONLY|O_APPEND writes"), expect_prefix(p, APP_DATA, exp))

    def op_rwa():
        nonlocal fd
        fd = os.open(p, os.O_RDWR | os.O_APPEND)
    if chk(N("open(O_RDWR|O_APPEND)"), op_rwa):
        if chk(N("  write"), lambda: none(os.write(fd, SCR))):
            exp += SCR
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        chk(N("  fcntl(F_SETFL clear O_APPEND)"),
            lambda: none(fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_APPEND)))
        chk(N("  fcntl(F_GETFL) has O_APPEND"),
            lambda: "yes" if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND else "no")
        os.lseek(fd, 0, os.SEEK_SET)
        chk(N("  write after F_SETFL+lseek(0)"), lambda: none(os.write(fd, SCR)))
        chk(N("  content prefix intact"), expect_prefix(p, APP_DATA))
        chk(N("  ftruncate(same size)"), lambda: os.ftruncate(fd, os.fstat(fd).st_size))
        chk(N("  ftruncate(0)"), lambda: os.ftruncate(fd, 0))
        chk(N("  mmap(SHARED,RW)"), lambda: mmap_check(fd, True, mmap.PROT_READ | mmap.PROT_WRITE))
        chk(N("  mmap(SHARED,R) on writable fd"), lambda: mmap_check(fd, True, mmap.PROT_READ))
        chk(N("  mmap(PRIVATE,RW)"), lambda: mmap_check(fd, False, mmap.PROT_READ | mmap.PROT_WRITE))
        chk(N("  fallocate(PUNCH_HOLE|KEEP_SIZE)"),
            lambda: c_fallocate(fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 0, 4096))
        chk(N("  fallocate(ZERO_RANGE)"), lambda: c_fallocate(fd, FALLOC_ZERO_RANGE, 0, 16))
        chk(N("  fallocate(KEEP_SIZE)"), lambda: c_fallocate(fd, FALLOC_KEEP_SIZE, 0, 8192))
        chk(N("  fallocate(0, extend at EOF)"),
            lambda: c_fallocate(fd, 0, os.fstat(fd).st_size, 16))
        chk(N("  fchmod(0666)"), lambda: os.chmod(fd, 0o666))
        os.close(fd)
    fd = os.open(p, os.O_RDONLY)
    chk(N("mmap(SHARED,R) on O_RDONLY fd"), lambda: mmap_check(fd, True, mmap.PROT_READ))
    os.close(fd)
    if pre_fd is not None:
        # fd opened O_RDWR (no O_APPEND) before chattr +a
        chk(N("pre-opened fd: pwrite(off 0, same byte)"), lambda: none(os.pwrite(pre_fd, APP_DATA[:1], 0)))
        chk(N("pre-opened fd: ftruncate(same size)"),
            lambda: os.ftruncate(pre_fd, os.fstat(pre_fd).st_size))
        chk(N("pre-opened fd: fallocate(PUNCH_HOLE|KEEP_SIZE)"),
            lambda: c_fallocate(pre_fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 0, 4096))
        chk(N("pre-opened fd: mmap(SHARED,RW)"),
            lambda: mmap_check(pre_fd, True, mmap.PROT_READ | mmap.PROT_WRITE))
        chk(N("pre-opened fd: fcntl(F_SETFL add O_APPEND)"),
            lambda: none(fcntl.fcntl(pre_fd, fcntl.F_SETFL, os.O_APPEND)))
        chk(N("pre-opened fd: F_SETFL remove O_APPEND again"),
            lambda: none(fcntl.fcntl(pre_fd, fcntl.F_SETFL, 0)))
        os.close(pre_fd)
    chk(N("content (end)"), expect_prefix(p, APP_DATA))
    chk(N("unlink"), lambda: os.unlink(p))


# ---------------------------------------------------------------- dirs
def test_imm_dir(c, d):
    N = lambda path, op: c.name(path, op)
    out(f"# {c.case} immutable dir {os.path.relpath(d, c.mnt)}")
    chk(N(d, "getflags"), lambda: showflags(d))
    chk(N(d, "readdir"), lambda: ','.join(sorted(os.listdir(d))))
    chk(N(d, "access(W_OK)"), lambda: c_access(d, os.W_OK))
    chk(N(d, "access(X_OK)"), lambda: c_access(d, os.X_OK))
    f = os.path.join(d, "file")
    sub = os.path.join(d, "dir")
    nf = os.path.join(d, "newfile")
    if chk(N(nf, "open(O_RDWR|O_CREAT)"), lambda: try_open(nf, os.O_RDWR | os.O_CREAT)):
        quiet(os.unlink, nf)
    nd = os.path.join(d, "newdev")
    rdev = os.stat('/dev/null').st_rdev
    if chk(N(nd, "mknod(S_IFCHR)"), lambda: os.mknod(nd, stat.S_IFCHR | 0o666, rdev)):
        quiet(os.unlink, nd)
    nfi = os.path.join(d, "newfifo")
    if chk(N(nfi, "mkfifo"), lambda: os.mkfifo(nfi, 0o666)):
        quiet(os.unlink, nfi)
    ndir = os.path.join(d, "newdir")
    if chk(N(ndir, "mkdir"), lambda: os.mkdir(ndir, 0o777)):
        quiet(os.rmdir, ndir)
    sl = os.path.join(d, "file.symlink")
    if chk(N(sl, "symlink"), lambda: os.symlink(f, sl)):
        quiet(os.unlink, sl)
    ln = os.path.join(d, "file.link")
    if chk(N(ln, "link(file -> same dir)"), lambda: os.link(f, ln)):
        quiet(os.unlink, ln)
    t = c.tmpfile("lnk")
    ln2 = os.path.join(d, "scratch.link")
    if chk(N(ln2, "link(scratch file -> into dir)"), lambda: os.link(t, ln2)):
        quiet(os.unlink, ln2)
    out_ln = os.path.join(c.scratch, "imm-file.link")
    if chk(N(f, "link(-> scratch dir)"), lambda: os.link(f, out_ln)):
        quiet(os.unlink, out_ln)
    nn = os.path.join(d, "file.newname")
    if chk(N(f, "rename(-> same dir)"), lambda: os.rename(f, nn)):
        quiet(os.rename, nn, f)
    mv = os.path.join(c.scratch, "imm-file.moved")
    if chk(N(f, "rename(-> scratch dir)"), lambda: os.rename(f, mv)):
        quiet(os.rename, mv, f)
    t = c.tmpfile("in")
    ti = os.path.join(d, "moved-in")
    if chk(N(ti, "rename(scratch file -> into dir)"), lambda: os.rename(t, ti)):
        quiet(os.rename, ti, t)
    t = c.tmpfile("xchg")
    if chk(N(f, "renameat2(EXCHANGE with scratch)"), lambda: c_renameat2(f, t, RENAME_EXCHANGE)):
        quiet(c_renameat2, f, t, RENAME_EXCHANGE)
    # the unflagged child file / subdir stay writable
    def wr():
        fd = os.open(f, os.O_RDWR)
        try:
            os.write(fd, SCR)
        finally:
            os.close(fd)
    chk(N(f, "open(O_RDWR)+write"), wr)
    chk(N(f, "chmod(0666)"), lambda: os.chmod(f, 0o666))
    if chk(N(f, "chown(1,1)"), lambda: os.chown(f, 1, 1)):
        quiet(os.chown, f, 0, 0)
    chk(N(f, "utimes(explicit)"), lambda: os.utime(f, (0, 0)))
    chk(N(f, "setxattr(user.child)"), lambda: os.setxattr(f, 'user.child', b'x'))
    sf = os.path.join(sub, "newfile-0")
    def cr():
        fd = os.open(sf, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.write(fd, SCR)
        finally:
            os.close(fd)
    chk(N(sf, "create+write in subdir"), cr)
    chk(N(sf, "chmod(0700)"), lambda: os.chmod(sf, 0o700))
    chk(N(sf, "chown(1,1)"), lambda: os.chown(sf, 1, 1))
    chk(N(sub, "chmod(0777)"), lambda: os.chmod(sub, 0o777))
    t = c.tmpfile("over")
    chk(N(f, "rename(scratch file over it)"), lambda: os.rename(t, f))
    chk(N(f, "unlink"), lambda: os.unlink(f))
    chk(N(sub, "rmdir(non-empty subdir)"), lambda: os.rmdir(sub))
    attr_checks(c, d, True)
    name_checks(c, d, os.path.dirname(d))
    t = c.tmpdir("over")
    chk(N(d, "rename(scratch empty dir over it)"), lambda: os.rename(t, d))
    chk(N(d, "rmdir"), lambda: os.rmdir(d))
    chk(N(d, "readdir (end)"), lambda: ','.join(sorted(os.listdir(d))))


def test_app_dir(c, d):
    N = lambda path, op: c.name(path, op)
    out(f"# {c.case} append-only dir {os.path.relpath(d, c.mnt)}")
    chk(N(d, "getflags"), lambda: showflags(d))
    chk(N(d, "readdir"), lambda: ','.join(sorted(os.listdir(d))))
    chk(N(d, "access(W_OK)"), lambda: c_access(d, os.W_OK))
    f = os.path.join(d, "file")
    sub = os.path.join(d, "dir")
    nf = os.path.join(d, "newfile-0")
    if chk(N(nf, "open(O_RDWR|O_CREAT)"), lambda: try_open(nf, os.O_RDWR | os.O_CREAT)):
        chk(N(nf, "unlink"), lambda: os.unlink(nf))
    nd = os.path.join(d, "newdev-0")
    rdev = os.stat('/dev/null').st_rdev
    if chk(N(nd, "mknod(S_IFCHR)"), lambda: os.mknod(nd, stat.S_IFCHR | 0o666, rdev)):
        chk(N(nd, "unlink"), lambda: os.unlink(nd))
    nfi = os.path.join(d, "newfifo-0")
    if chk(N(nfi, "mkfifo"), lambda: os.mkfifo(nfi, 0o666)):
        chk(N(nfi, "unlink"), lambda: os.unlink(nfi))
    ndir = os.path.join(d, "newdir-0")
    if chk(N(ndir, "mkdir"), lambda: os.mkdir(ndir, 0o777)):
        chk(N(ndir, "rmdir"), lambda: os.rmdir(ndir))
        nnf = os.path.join(ndir, "newfile-0")
        chk(N(nnf, "create in new subdir"), lambda: try_open(nnf, os.O_RDWR | os.O_CREAT))
        chk(N(nnf, "chmod(0700)"), lambda: os.chmod(nnf, 0o700))
        chk(N(nnf, "chown(1,1)"), lambda: os.chown(nnf, 1, 1))
        chk(N(nnf, "unlink (parent not flagged)"), lambda: os.unlink(nnf))
    sl = os.path.join(d, "file.symlink-0")
    if chk(N(sl, "symlink"), lambda: os.symlink(f, sl)):
        chk(N(sl, "unlink"), lambda: os.unlink(sl))
    ln = os.path.join(d, "file.link-0")
    if chk(N(ln, "link(file -> same dir)"), lambda: os.link(f, ln)):
        chk(N(ln, "unlink"), lambda: os.unlink(ln))
    t = c.tmpfile("lnk")
    ln2 = os.path.join(d, "scratch.link")
    if chk(N(ln2, "link(scratch file -> into dir)"), lambda: os.link(t, ln2)):
        chk(N(ln2, "unlink"), lambda: os.unlink(ln2))
    out_ln = os.path.join(c.scratch, "app-file.link")
    if chk(N(f, "link(-> scratch dir)"), lambda: os.link(f, out_ln)):
        quiet(os.unlink, out_ln)
    nn = os.path.join(d, "file.newname")
    if chk(N(f, "rename(-> same dir)"), lambda: os.rename(f, nn)):
        quiet(os.rename, nn, f)
    mv = os.path.join(c.scratch, "app-file.moved")
    if chk(N(f, "rename(-> scratch dir)"), lambda: os.rename(f, mv)):
        quiet(os.rename, mv, f)
    t = c.tmpfile("in")
    ti = os.path.join(d, "moved-in")
    if chk(N(ti, "rename(scratch file -> into dir)"), lambda: os.rename(t, ti)):
        ti2 = os.path.join(d, "moved-in.2")
        if chk(N(ti, "rename(moved-in -> same dir)"), lambda: os.rename(ti, ti2)):
            quiet(os.rename, ti2, ti)
        t2 = c.tmpfile("over2")
        chk(N(ti, "rename(scratch file over it)"), lambda: os.rename(t2, ti))
    t = c.tmpfile("xchg")
    if chk(N(f, "renameat2(EXCHANGE with scratch)"), lambda: c_renameat2(f, t, RENAME_EXCHANGE)):
        quiet(c_renameat2, f, t, RENAME_EXCHANGE)
    def wr():
        fd = os.open(f, os.O_RDWR)
        try:
            os.write(fd, SCR)
        finally:
            os.close(fd)
    chk(N(f, "open(O_RDWR)+write"), wr)
    chk(N(f, "chmod(0666)"), lambda: os.chmod(f, 0o666))
    if chk(N(f, "chown(1,1)"), lambda: os.chown(f, 1, 1)):
        quiet(os.chown, f, 0, 0)
    chk(N(f, "truncate(0)"), lambda: os.truncate(f, 0))
    sf = os.path.join(sub, "newfile-0")
    chk(N(sf, "create in subdir"), lambda: try_open(sf, os.O_RDWR | os.O_CREAT))
    chk(N(sf, "chmod(0700)"), lambda: os.chmod(sf, 0o700))
    t = c.tmpfile("over")
    chk(N(f, "rename(scratch file over it)"), lambda: os.rename(t, f))
    chk(N(f, "unlink"), lambda: os.unlink(f))
    chk(N(sub, "rmdir(non-empty subdir)"), lambda: os.rmdir(sub))
    attr_checks(c, d, True)
    name_checks(c, d, os.path.dirname(d))
    t = c.tmpdir("over")
    chk(N(d, "rename(scratch empty dir over it)"), lambda: os.rename(t, d))
    chk(N(d, "rmdir"), lambda: os.rmdir(d))
    chk(N(d, "readdir (end)"), lambda: ','.join(sorted(os.listdir(d))))


def test_empty_dir(c, d, imm):
    N = lambda path, op: c.name(path, op)
    out(f"# {c.case} empty {'immutable' if imm else 'append-only'} dir {os.path.relpath(d, c.mnt)}")
    chk(N(d, "getflags"), lambda: showflags(d))
    nf = os.path.join(d, "newfile")
    if chk(N(nf, "create"), lambda: try_open(nf, os.O_RDWR | os.O_CREAT)):
        if imm:
            quiet(os.unlink, nf)
    chk(N(d, "utimes(NULL)"), lambda: os.utime(d))
    chk(N(d, "chmod(0777)"), lambda: os.chmod(d, 0o777))
    nn = d + ".newname"
    if chk(N(d, "rename(-> same dir)"), lambda: os.rename(d, nn)):
        quiet(os.rename, nn, d)
    t = c.tmpdir("over")
    chk(N(d, "rename(scratch empty dir over it)"), lambda: os.rename(t, d))
    chk(N(d, "rmdir"), lambda: os.rmdir(d))


# ---------------------------------------------------------------- non-root
def nonroot_checks(c, objs):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            for kind, p in objs:
                N = lambda op: c.name(p, "[nobody] " + op)
                if kind == 'fi' or kind == 'fa':
                    chk(N("open(O_WRONLY)"), lambda: try_open(p, os.O_WRONLY))
                    chk(N("open(O_WRONLY|O_APPEND)"), lambda: try_open(p, os.O_WRONLY | os.O_APPEND))
                    chk(N("utimes(NULL)"), lambda: os.utime(p))
                    chk(N("utimes(explicit)"), lambda: os.utime(p, (0, 0)))
                    chk(N("truncate(same size)"), lambda: os.truncate(p, os.stat(p).st_size))
                    chk(N("setxattr(user.test)"), lambda: os.setxattr(p, 'user.test', b'x'))
                    chk(N("unlink"), lambda: os.unlink(p))
                else:
                    nf = os.path.join(p, "nobody-newfile")
                    if chk(N("create inside"), lambda: try_open(nf, os.O_RDWR | os.O_CREAT)):
                        chk(N("unlink created"), lambda: os.unlink(nf))
                    chk(N("unlink child file"), lambda: os.unlink(os.path.join(p, "file")))
                    chk(N("utimes(NULL)"), lambda: os.utime(p))
                    sf = os.path.join(p, "dir", "nobody-newfile")
                    chk(N("create in subdir"), lambda: try_open(sf, os.O_RDWR | os.O_CREAT))
            sys.stdout.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# ---------------------------------------------------------------- report
def upper_report(mnt, upper, rels, title):
    out(f"## upper layer {title}")
    for rel in rels:
        up = os.path.join(upper, rel)
        if not os.path.lexists(up):
            out(f"upper {rel}: absent")
            continue
        st = os.lstat(up)
        m = st.st_mode
        t = '-' if stat.S_ISREG(m) else 'd' if stat.S_ISDIR(m) else 'c' if stat.S_ISCHR(m) else '?'
        size = f" size={st.st_size}" if t == '-' else ''
        names = []
        try:
            names = sorted(os.listxattr(up, follow_symlinks=False))
        except OSError:
            pass
        pa = 'no'
        if 'trusted.overlay.protattr' in names:
            pa = repr(os.getxattr(up, 'trusted.overlay.protattr', follow_symlinks=False).decode(errors='replace'))
        origin = 'yes' if 'trusted.overlay.origin' in names else 'no'
        other = [n for n in names if '.overlay.' in n and n not in
                 ('trusted.overlay.protattr', 'trusted.overlay.origin')]
        try:
            fl = letters(getflags(up))
        except OSError as e:
            fl = 'ERR ' + ename(e.errno)
        line = (f"upper {rel}: {t}{stat.S_IMODE(m):04o}{size} protattr={pa} origin={origin} "
                f"lsattr={fl}")
        if other:
            line += " other_ovl_xattrs=" + ','.join(other)
        if t == 'd':
            ents = []
            for n in sorted(os.listdir(up)):
                s2 = os.lstat(os.path.join(up, n))
                if stat.S_ISCHR(s2.st_mode) and s2.st_rdev == 0:
                    ents.append(n + "(wh)")
                elif stat.S_ISDIR(s2.st_mode):
                    ents.append(n + "/")
                else:
                    ents.append(n)
            line += " entries=[" + ','.join(ents) + "]"
        out(line)


OBJS = [('fi', 'immutable.f'), ('fa', 'append-only.f'), ('di', 'immutable.d'),
        ('da', 'append-only.d'), ('ei', 'empty-immutable.d'), ('ea', 'empty-append-only.d')]


def flag_of(kind):
    return FL_IMM if kind[1] == 'i' else FL_APP


def setup_b(mnt):
    """create case B objects through the mount, chattr them through the mount;
    returns pre-opened fds"""
    c = Ctx(mnt, 'B', 'up')
    out("# B setup (through the mount)")
    os.mkdir(c.root, 0o777)
    os.mkdir(c.scratch, 0o777)
    for kind, n in OBJS:
        p = c.p(n)
        if kind[0] == 'f':
            with open(p, 'wb') as f:
                f.write(IMM_DATA if kind == 'fi' else APP_DATA)
            os.chmod(p, 0o666)
        else:
            os.mkdir(p, 0o777)
            if kind[0] == 'd':
                os.mkdir(os.path.join(p, 'dir'), 0o777)
                with open(os.path.join(p, 'file'), 'wb'):
                    pass
                os.chmod(os.path.join(p, 'file'), 0o666)
        if kind[0] in 'fd':
            acl = ACL_FILE if kind[0] == 'f' else ACL_DIR
            chk(c.name(p, "setup set ACL"), lambda: os.setxattr(p, 'system.posix_acl_access', acl))
            chk(c.name(p, "setup setxattr trusted.test"),
                lambda: os.setxattr(p, 'trusted.test', b'readonly', os.XATTR_CREATE))
            chk(c.name(p, "setup setxattr user.test"),
                lambda: os.setxattr(p, 'user.test', b'readonly', os.XATTR_CREATE))
    pre = {'fi': os.open(c.p('immutable.f'), os.O_RDWR),
           'fa': os.open(c.p('append-only.f'), os.O_RDWR)}
    for kind, n in OBJS:
        p = c.p(n)
        fl = flag_of(kind)
        chk(c.name(p, f"chattr +{'i' if fl == FL_IMM else 'a'} (FS_IOC_SETFLAGS)"),
            lambda: setflags(p, add=fl))
    return pre


def run_case(c, pre):
    if os.path.isdir(c.scratch) is False:
        os.mkdir(c.scratch, 0o777)
    out(f"# {c.case} getflags of all objects before tests")
    for kind, n in OBJS:
        chk(c.name(c.p(n), "getflags"), lambda: showflags(c.p(n)))
    test_imm_file(c, c.p('immutable.f'), pre.get('fi'))
    test_app_file(c, c.p('append-only.f'), pre.get('fa'))
    test_imm_dir(c, c.p('immutable.d'))
    test_app_dir(c, c.p('append-only.d'))
    test_empty_dir(c, c.p('empty-immutable.d'), True)
    test_empty_dir(c, c.p('empty-append-only.d'), False)
    out(f"# {c.case} non-root checks (uid 65534)")
    nonroot_checks(c, [(k, c.p(n)) for k, n in OBJS if k[0] in 'fd'])
    out(f"# {c.case} getflags of all objects after tests")
    for kind, n in OBJS:
        chk(c.name(c.p(n), "getflags (end)"), lambda: showflags(c.p(n)))


def recheck_case(c):
    out(f"# {c.case} after mount cycle")
    for kind, n in OBJS:
        p = c.p(n)
        chk(c.name(p, "getflags"), lambda: showflags(p))
        if kind[0] == 'f':
            chk(c.name(p, "open(O_WRONLY)"), lambda: try_open(p, os.O_WRONLY))
            chk(c.name(p, "chmod(0666)"), lambda: os.chmod(p, 0o666))
            chk(c.name(p, "unlink"), lambda: os.unlink(p))
        else:
            nf = os.path.join(p, "recheck-new")
            if chk(c.name(nf, "create"), lambda: try_open(nf, os.O_RDWR | os.O_CREAT)):
                if kind[1] == 'i':
                    quiet(os.unlink, nf)
            chk(c.name(p, "chmod(0777)"), lambda: os.chmod(p, 0o777))
            chk(c.name(p, "rmdir"), lambda: os.rmdir(p))


def clear_flags(c):
    out(f"# {c.case} clear flags through the mount (chattr -i -a)")
    for kind, n in OBJS:
        p = c.p(n)
        chk(c.name(p, "chattr -i -a"), lambda: setflags(p, rm=FL_IMM | FL_APP))
        chk(c.name(p, "getflags (after clear)"), lambda: showflags(p))


def fallback_clear_upper(upper, rels):
    """make sure nothing in the upper stays flagged (quiet, count only)"""
    n = 0
    for rel in rels:
        up = os.path.join(upper, rel)
        try:
            if getflags(up) & (FL_IMM | FL_APP):
                setflags(up, rm=FL_IMM | FL_APP)
                n += 1
        except OSError:
            pass
    out(f"# fallback: cleared flags directly on {n} upper inode(s)")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--phase')]
    phase = 'all'
    for i, a in enumerate(sys.argv):
        if a.startswith('--phase='):
            phase = a.split('=', 1)[1]
        elif a == '--phase':
            phase = sys.argv[i + 1]
            args.remove(phase)
    if len(args) != 2 or phase not in ('all', 'test', 'recheck'):
        sys.exit(__doc__)
    mnt, upper = args
    os.umask(0)
    cases = []
    if os.path.isdir(os.path.join(mnt, 'lo')):
        cases.append(Ctx(mnt, 'A', 'lo'))
    cases.append(Ctx(mnt, 'B', 'up'))
    rels = [f"{c.rel}/{n}" for c in cases for _, n in OBJS]
    if phase in ('all', 'test'):
        out(f"### phase test")
        pre = setup_b(mnt)
        for c in cases:
            run_case(c, pre if c.case == 'B' else {})
        upper_report(mnt, upper, rels, "after tests")
    if phase == 'recheck':
        out(f"### phase recheck (after mount cycle)")
        for c in cases:
            recheck_case(c)
        upper_report(mnt, upper, rels, "after mount cycle")
    if phase in ('all', 'recheck'):
        for c in cases:
            clear_flags(c)
        upper_report(mnt, upper, rels, "after clearing flags")
        fallback_clear_upper(upper, rels)


if __name__ == '__main__':
    main()
