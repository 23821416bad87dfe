"""The one place model-written code runs: `run_python` in a bubblewrap sandbox, failing closed.

Python-level hooks cannot contain Python, so the isolation is the kernel's (bubblewrap, Debian `bubblewrap`):

* Namespaces: `--unshare-all --unshare-user` (user, PID, network with only a loopback, IPC, UTS, cgroup;
  none nested: seccomp refuses unshare and clone without CLONE_THREAD), uid/gid 65534 inside,
  `--cap-drop ALL`, `--new-session` (no TIOCSTI into our terminal), `--die-with-parent`, `--as-pid-1` (no
  unfiltered bwrap init inside: the snippet's interpreter is PID 1, so its death ends the namespace).
* Filesystem: an empty read-only root holding only the interpreter binary, its standard library (the base
  `site-packages` hidden under an empty read-only tmpfs) and the shared libraries `ldd` names for the
  interpreter and `lib-dynload`, each bound read-only at its own path; nothing of the host's /etc, /home,
  /tmp or the project. Its own /proc, bwrap's minimal /dev (null, zero, full, random, urandom, tty; the
  /dev tmpfs read-only), and a size-limited tmpfs (`--size`: bwrap >= 0.7, checked) at /tmp as the working
  directory. `--clearenv`; only HOME and LANG are set. The interpreter runs `-I -S`.
* seccomp: a classic-BPF program built here (`seccomp_program`; no kept Python binding installs into a
  venv: pyseccomp is not on the index, Debian's python3-seccomp binds the system Python only), passed with
  `--seccomp FD`. It kills any other ABI (i386 via int 0x80, x32), makes ptrace, mount, bpf, keyctl,
  unshare, setns, module loading, kexec, perf, userfaultfd, io_uring, process_vm_* and the like fail with
  EPERM, and forbids new processes: fork/vfork and clone without CLONE_THREAD fail with EPERM and clone3
  with ENOSYS (glibc then creates threads with clone). A snippet is one process, so fork bombs and
  `setsid` children cannot exist; threads stay possible and are bounded by the address-space limit.
* rlimits (address space, CPU seconds, file size, open files, processes, core) are set by a small prelude,
  soft = hard, before the snippet runs in the same interpreter: without CAP_SYS_RESOURCE they cannot be
  raised. (RLIMIT_NPROC is not enforced for the host's root uid; the seccomp rule above is what bounds forks.)
* Timeout: a wall-clock deadline, then SIGKILL to the sandbox's PID 1 (through a pidfd, its host pid from
  bwrap's `--json-status-fd`) and to bwrap; the kernel kills everything else in the PID namespace, and
  `run_python` returns only once PID 1 is gone (`--die-with-parent` covers our own death). Output is
  capped per stream; a snippet that prints past the cap is stopped (`truncated`).
* Fail closed: without bwrap or user namespaces `run_python` raises `SandboxUnavailable` saying why and how
  to fix it. Running unsandboxed needs `allow_unsandboxed=True` or NEMOTRON3_UNSAFE_NO_SANDBOX=1 (the CLI's
  `--unsafe-no-sandbox`), and then only where the sandbox cannot start, with a warning on stderr.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import marshal
import math
import os
import platform
import re
import resource
import select
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

UNSAFE_ENV = "NEMOTRON3_UNSAFE_NO_SANDBOX"
MAX_OUTPUT_BYTES = 64 * 1024
WORKDIR = "/tmp"
_MARKER = b"\x00nemotron3-sandbox-ready\x00"

# ---- seccomp ------------------------------------------------------------------------------------------

_DENIED = ("ptrace mount umount2 bpf keyctl add_key request_key unshare setns pivot_root chroot kexec_load "
           "kexec_file_load init_module finit_module delete_module perf_event_open userfaultfd personality "
           "process_vm_readv process_vm_writev open_by_handle_at name_to_handle_at fsopen fsconfig fsmount "
           "fspick move_mount open_tree mount_setattr swapon swapoff reboot acct quotactl quotactl_fd syslog "
           "lookup_dcookie settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname vhangup "
           "nfsservctl kcmp pidfd_getfd io_uring_setup io_uring_enter io_uring_register fanotify_init "
           "iopl ioperm uselib ustat sysfs _sysctl fork vfork").split()
# syscall numbers (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h); absent names do not exist there
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(
        ptrace=101, mount=165, umount2=166, bpf=321, keyctl=250, add_key=248, request_key=249, unshare=272,
        setns=308, pivot_root=155, chroot=161, kexec_load=246, kexec_file_load=320, init_module=175,
        finit_module=313, delete_module=176, perf_event_open=298, userfaultfd=323, personality=135,
        process_vm_readv=310, process_vm_writev=311, open_by_handle_at=304, name_to_handle_at=303, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, move_mount=429, open_tree=428, mount_setattr=442, swapon=167,
        swapoff=168, reboot=169, acct=163, quotactl=179, quotactl_fd=443, syslog=103, lookup_dcookie=212,
        settimeofday=164, clock_settime=227, clock_adjtime=305, adjtimex=159, sethostname=170,
        setdomainname=171, vhangup=153, nfsservctl=180, kcmp=312, pidfd_getfd=438, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, fanotify_init=300, iopl=172, ioperm=173, uselib=134,
        ustat=136, sysfs=139, _sysctl=156, fork=57, vfork=58, clone=56, clone3=435)),
    "aarch64": (0xC00000B7, dict(
        ptrace=117, mount=40, umount2=39, bpf=280, keyctl=219, add_key=217, request_key=218, unshare=97,
        setns=268, pivot_root=41, chroot=51, kexec_load=104, kexec_file_load=294, init_module=105,
        finit_module=273, delete_module=106, perf_event_open=241, userfaultfd=282, personality=92,
        process_vm_readv=270, process_vm_writev=271, open_by_handle_at=265, name_to_handle_at=264, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, move_mount=429, open_tree=428, mount_setattr=442, swapon=224,
        swapoff=225, reboot=142, acct=89, quotactl=60, quotactl_fd=443, syslog=116, lookup_dcookie=18,
        settimeofday=170, clock_settime=112, clock_adjtime=266, adjtimex=171, sethostname=161,
        setdomainname=162, vhangup=58, nfsservctl=42, kcmp=272, pidfd_getfd=438, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, fanotify_init=262, clone=220, clone3=435)),
}
_LD_W_ABS, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06           # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JMP|JSET|K, RET|K
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS, _CLONE_THREAD, _X32_BIT = 1, 38, 0x00010000, 0x40000000


def seccomp_program(machine: str | None = None) -> bytes:
    """The filter as `struct sock_filter[]` bytes for bwrap `--seccomp` (see the module docstring).

    seccomp_data: nr at offset 0, arch at 4, args[0] at 16 (its low 32 bits: both ABIs are little-endian).
    Jumps are symbolic labels resolved in a second pass (classic BPF jumps forward only, 8-bit offsets)."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise SandboxUnavailable(f"no seccomp syscall table for {machine!r} (supported: {', '.join(_SYSCALLS)})")
    arch, nr = _SYSCALLS[machine]
    prog: list[tuple] = [(_LD_W_ABS, 0, 0, 4), (_JEQ, None, "kill", arch), (_LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((_JSET, "eperm", None, _X32_BIT))
    prog += [(_JEQ, "eperm", None, nr[name]) for name in _DENIED if name in nr]
    prog += [(_JEQ, "enosys", None, nr["clone3"]), (_JEQ, None, "allow", nr["clone"]),
             (_LD_W_ABS, 0, 0, 16), (_JSET, "allow", "eperm", _CLONE_THREAD)]
    labels = {"allow": _RET_ALLOW, "eperm": _RET_ERRNO | _EPERM, "enosys": _RET_ERRNO | _ENOSYS,
              "kill": _RET_KILL_PROCESS}
    at = {name: len(prog) + i for i, name in enumerate(labels)}
    prog += [(_RET, 0, 0, k) for k in labels.values()]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt, jf = (0 if j is None else j if isinstance(j, int) else at[j] - i - 1 for j in (jt, jf))
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)


# ---- the sandbox ---------------------------------------------------------------------------------------

class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine; the message says why and how to fix it."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None               # None when the run was stopped (timeout, output cap)
    timed_out: bool = False
    truncated: bool = False             # printed past the cap: stopped, output cut at the cap
    sandboxed: bool = True
    seconds: float = 0.0                # wall-clock time of the run
    timeout: float = 0.0                # the limit it ran under

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.truncated

    def text(self) -> str:
        """stdout when ok; otherwise stdout followed by stderr (the traceback) or an `error: ...` line."""
        if self.ok:
            return self.stdout
        if self.timed_out:
            return self.stdout + f"error: timed out after {self.timeout:g}s"
        if self.truncated:
            return self.stdout + "error: output limit reached, stopped"
        err = self.stderr
        if not err and self.exit_code and self.exit_code > 128:
            err = f"error: killed by signal {self.exit_code - 128}"
        return self.stdout + err


_PRELUDE = r"""
import marshal, os, resource, sys
code, files, limits = marshal.loads(sys.stdin.buffer.read())
sys.stdin.close()
sys.stdin = open(os.devnull)
for res, val in limits:
    hard = resource.getrlimit(res)[1]
    val = val if hard == resource.RLIM_INFINITY else min(val, hard)
    resource.setrlimit(res, (val, val))
os.write(2, MARKER)
for name, data in files:
    os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
    with open(name, "wb") as f:
        f.write(data)
sys.argv = ["<snippet>"]
del marshal, resource, files, limits
exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
""".replace("MARKER", repr(_MARKER))
_PYTHON_ARGS = ("-I", "-S", "-B", "-X", "utf8", "-c", _PRELUDE)


@functools.cache
def _interpreter() -> str:
    """The real binary of this Python (a venv's base interpreter: the snippet gets no site-packages)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.cache
def _layout() -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(interpreter, stdlib dirs, hidden dirs, (source, dest) shared-library binds) for this Python."""
    exe = _interpreter()
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix}
    dirs = sorted({os.path.realpath(sysconfig.get_path(k, vars=base)) for k in ("stdlib", "platstdlib")})
    hidden = sorted({p for p in (os.path.realpath(sysconfig.get_path(k, vars=base)) for k in ("purelib", "platlib"))
                     if os.path.isdir(p) and any(p.startswith(d + os.sep) for d in dirs)})
    dynload = [f for d in dirs for f in glob.glob(os.path.join(d, "lib-dynload", "*.so"))
               if not os.path.basename(f).startswith("_tkinter")]       # no display in here: no X11 libraries
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("`ldd` (Debian: libc-bin) is needed to find the interpreter's shared libraries")
    out = subprocess.run([ldd, exe, *dynload], capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        if not line.startswith("\t"):
            continue
        path = line.split("=>", 1)[1].split()[0] if "=>" in line else line.split()[0]
        if path.startswith("/"):
            libs.add((os.path.realpath(path), path))
    return exe, tuple(dirs), tuple(hidden), tuple(sorted(libs))


@functools.cache
def _bwrap_prefix() -> tuple[str, ...]:
    """The bwrap command line up to the per-call part (workdir size, seccomp and status fds)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap is not installed: `apt-get install bubblewrap` (Debian/Ubuntu; "
                                 "`dnf install bubblewrap` on Fedora), or see README 'Sandbox'")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    m = re.search(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < (0, 7):
        raise SandboxUnavailable(f"{version or 'bwrap'} is too old: the sandbox needs bubblewrap >= 0.7 (its tmpfs "
                                 "--size); install a newer bubblewrap (Debian 12 / Ubuntu 24.04 ship 0.8)")
    exe, dirs, hidden, libs = _layout()
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            "--hostname", "sandbox", "--cap-drop", "ALL", "--new-session", "--die-with-parent", "--as-pid-1",
            "--clearenv", "--setenv", "HOME", WORKDIR, "--setenv", "LANG", "C.UTF-8",
            "--ro-bind", exe, exe]
    for d in dirs:
        argv += ["--ro-bind", d, d]
    for d in hidden:
        argv += ["--tmpfs", d, "--remount-ro", d]
    for src, dest in libs:
        argv += ["--ro-bind", src, dest]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    return tuple(argv)


@functools.cache
def sandbox_problem() -> str | None:
    """Why the sandbox cannot run here (with how to fix it), or None when it works. Probed once per process."""
    try:
        r = _run("print(1)", timeout=30.0, memory_mb=256, disk_mb=1, files=None, max_output=1024, sandboxed=True)
    except SandboxUnavailable as e:
        return str(e)
    return None if r.stdout == "1\n" else f"the sandbox's probe printed {r.stdout!r}, stderr {r.stderr!r}"


@functools.cache
def _warn_unsandboxed(problem: str) -> None:
    """Once per process (a training run may execute thousands of snippets); each result says `sandboxed`."""
    sys.stderr.write(f"WARNING: {UNSAFE_ENV}: running model-written code UNSANDBOXED with this user's rights "
                     f"(sandbox unavailable: {problem})\n")


def _unsafe_allowed(allow_unsandboxed: bool) -> bool:
    return allow_unsandboxed or os.environ.get(UNSAFE_ENV, "") not in ("", "0")


def run_python(code: str, *, timeout: float = 2.0, memory_mb: int = 512, disk_mb: int = 16,
               files: dict[str, str | bytes] | None = None, max_output: int = MAX_OUTPUT_BYTES,
               allow_unsandboxed: bool = False) -> SandboxResult:
    """Run `code` with `python -I -S` in the sandbox; `files` (relative path -> content) are written to its
    working directory first. Limits: `timeout` wall-clock seconds (CPU: that rounded up, + 1), `memory_mb`
    of address space, `disk_mb` of tmpfs (also the largest file), `max_output` bytes per stream.

    Raises SandboxUnavailable where the sandbox cannot run, unless `allow_unsandboxed` (or the environment
    variable NEMOTRON3_UNSAFE_NO_SANDBOX=1) explicitly accepts running the code with this user's rights."""
    for name in files or {}:
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm.startswith("..") or norm == ".":
            raise ValueError(f"sandbox file names must be relative and stay inside the workdir: {name!r}")
    problem = sandbox_problem()
    if problem is None:
        return _run(code, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb, files=files,
                    max_output=max_output, sandboxed=True)
    if not _unsafe_allowed(allow_unsandboxed):
        raise SandboxUnavailable(f"cannot run model-written code: {problem}. Running it unsandboxed needs an "
                                 f"explicit opt-in: --unsafe-no-sandbox or {UNSAFE_ENV}=1")
    _warn_unsandboxed(problem)
    return _run(code, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb, files=files,
                max_output=max_output, sandboxed=False)


def _run(code, *, timeout, memory_mb, disk_mb, files, max_output, sandboxed) -> SandboxResult:
    limits = [("RLIMIT_AS", memory_mb << 20), ("RLIMIT_CPU", math.ceil(timeout) + 1),
              ("RLIMIT_FSIZE", disk_mb << 20), ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", 64), ("RLIMIT_CORE", 0)]
    blob = _blob(code, files, [(getattr(resource, n), v) for n, v in limits])
    start = time.monotonic()
    workdir = contextlib.nullcontext() if sandboxed else tempfile.TemporaryDirectory(prefix="nemotron3-unsafe-")
    with workdir as cwd:
        run = _Run(disk_mb, cwd)
        out, err, stopped = run.communicate(blob, start + timeout, max_output + len(_MARKER))
    ready = err.startswith(_MARKER)
    if sandboxed and not ready and stopped != "timeout":
        raise SandboxUnavailable("bubblewrap could not start the sandbox: " + err.decode("utf-8", "replace").strip()
                                 + " (user namespaces must be allowed: sysctl user.max_user_namespaces > 0, "
                                 "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns"
                                 "=0; in Docker run with --security-opt seccomp=unconfined or --privileged)")
    err = err[len(_MARKER):] if ready else err
    return SandboxResult(stdout=out[:max_output].decode("utf-8", "replace"),
                         stderr=err[:max_output].decode("utf-8", "replace"),
                         exit_code=None if stopped else run.proc.returncode, timed_out=stopped == "timeout",
                         truncated=stopped == "output", sandboxed=sandboxed, seconds=time.monotonic() - start,
                         timeout=timeout)


def _blob(code: str, files, limits) -> bytes:
    """What the prelude reads from stdin: (code, [(name, bytes)], [(rlimit, value)])."""
    items = [(n, d.encode("utf-8") if isinstance(d, str) else bytes(d)) for n, d in (files or {}).items()]
    return marshal.dumps((code, items, limits))


class _Run:
    """One sandboxed (cwd None) or unsandboxed (cwd: a temporary directory) interpreter process.

    bwrap's `--json-status-fd` names the sandbox's PID 1 (its host pid); a pidfd on it lets `stop` kill it
    directly and wait until it has exited, which the kernel allows only once every other process of its
    PID namespace is gone: when `communicate` returns after a stop, nothing of the sandbox is left."""

    def __init__(self, disk_mb: int, cwd: str | None):
        self.status, self.pidfd, self.status_fd = bytearray(), None, None
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if cwd is not None:
            self.proc = subprocess.Popen([_interpreter(), *_PYTHON_ARGS], cwd=cwd, env={"HOME": cwd}, **pipes)
            return
        prefix, program = _bwrap_prefix(), seccomp_program()       # these raise before any fd is opened
        sec_r, sec_w = os.pipe()
        try:
            os.write(sec_w, program)
        finally:
            os.close(sec_w)
        self.status_fd, st_w = os.pipe()
        try:
            self.proc = subprocess.Popen([*prefix, "--size", str(disk_mb << 20), "--tmpfs", WORKDIR,
                                          "--remount-ro", "/", "--chdir", WORKDIR, "--seccomp", str(sec_r),
                                          "--json-status-fd", str(st_w), _layout()[0], *_PYTHON_ARGS],
                                         pass_fds=(sec_r, st_w), **pipes)
        except BaseException:
            os.close(self.status_fd)
            raise
        finally:
            os.close(sec_r)
            os.close(st_w)

    def _read_status(self) -> bytes:
        """Read bwrap's status lines; on the first, open a pidfd on the sandbox's PID 1 (checked to be bwrap's
        child, so a pid reused by another process is never signalled)."""
        chunk = os.read(self.status_fd, 4096)
        self.status += chunk
        if self.pidfd is None and b"\n" in self.status:
            pid = json.loads(self.status.split(b"\n", 1)[0]).get("child-pid")
            try:
                fd = os.pidfd_open(pid)
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    self.pidfd = fd
                else:
                    os.close(fd)
            except (OSError, TypeError, ValueError):
                pass
        return chunk

    def communicate(self, blob: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
        """Feed stdin, read both pipes until EOF, the deadline or the cap (then `stop`).
        Returns (stdout, stderr, "" | "timeout" | "output")."""
        proc = self.proc
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        sel = selectors.DefaultSelector()
        for f in bufs:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        if self.status_fd is not None:
            sel.register(self.status_fd, selectors.EVENT_READ)
        view, stopped, open_outputs = memoryview(blob), "", 2
        try:
            while open_outputs and not stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    stopped = "timeout"
                    break
                for key, _ in sel.select(left):
                    f = key.fileobj
                    if f is proc.stdin:
                        try:
                            view = view[os.write(f.fileno(), view[:65536]):]
                        except OSError:             # the sandbox did not start or stopped reading
                            view = view[:0]
                        if not view:
                            sel.unregister(f)
                            f.close()
                    elif f is self.status_fd:
                        if not self._read_status():
                            sel.unregister(f)
                    elif chunk := os.read(f.fileno(), 65536):
                        bufs[f] += chunk
                        if len(bufs[f]) > cap:
                            stopped = "output"
                    else:
                        sel.unregister(f)
                        open_outputs -= 1
        finally:
            sel.close()
            if stopped:
                self.stop()
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
            for fd in (self.status_fd, self.pidfd):
                if fd is not None:
                    os.close(fd)
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), stopped

    def stop(self) -> None:
        """SIGKILL the sandbox's PID 1 (the kernel then kills its whole PID namespace), wait until it is gone
        and bwrap has exited after it; SIGKILL bwrap's process group where that does not happen (then
        `--die-with-parent` ends PID 1). Unsandboxed: SIGKILL the interpreter's process group."""
        if self.status_fd is not None and self.pidfd is None:
            os.set_blocking(self.status_fd, False)
            with contextlib.suppress(OSError):
                while self._read_status():
                    pass
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            select.select([self.pidfd], [], [], 10.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
