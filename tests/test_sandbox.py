"""nemotron3.sandbox: the escape battery of issue 19 (each attempt must fail), a benign program that must work,
the seccomp program checked by a small classic-BPF interpreter, and failing closed without bubblewrap.

Each attack snippet prints `ESCAPED ...` if it got through and `BLOCKED ...` where the kernel stopped it; a
test asserts no `ESCAPED` and that the snippet ran to its end (so a snippet that dies early cannot pass)."""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from nemotron3 import sandbox
from nemotron3.sandbox import SandboxUnavailable, run_python, sandbox_problem, seccomp_program

PROBLEM = sandbox_problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no sandbox on this machine: {PROBLEM}")


def attack(code: str, **kw) -> str:
    """Run an attack snippet (dedented, with `import os, sys, ctypes, errno` and a `libc`); its stdout after
    checking it ran to the end and that nothing got through."""
    pre = ("import os, sys, ctypes, errno\nlibc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
           "def err():\n    return errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())\n")
    r = run_python(pre + textwrap.dedent(code) + "\nprint('END')\n", **{"timeout": 10.0, **kw})
    assert r.sandboxed and r.exit_code == 0 and r.stdout.endswith("END\n"), r
    assert "ESCAPED" not in r.stdout, r.stdout
    return r.stdout


def test_the_sandbox_runs_where_bubblewrap_does():
    """A regression in our bwrap command line must fail here, not turn the battery into skips."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    plain = subprocess.run([bwrap, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"],
                           capture_output=True, text=True)
    if plain.returncode != 0:
        pytest.skip(f"bwrap cannot create namespaces on this machine: {plain.stderr.strip()}")
    assert PROBLEM is None


# ---- the escape battery ---------------------------------------------------------------------------------

@needs_sandbox
def test_host_files_are_invisible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    paths = ["/etc/passwd", "/etc/shadow", "/etc/hostname", os.path.expanduser("~/.bashrc"), "/root/.bashrc",
             "/home", str(secret), __file__, str(Path(sandbox.__file__).parent), "/work", "/sys/kernel"]
    out = attack(f"""
        for p in {paths!r}:
            try:
                data = open(p).read() if not os.path.isdir(p) else os.listdir(p)
                print('ESCAPED read', p, str(data)[:40])
            except OSError as e:
                print('BLOCKED', p, type(e).__name__)
        """)
    assert out.count("BLOCKED") == len(paths)


@needs_sandbox
def test_only_the_interpreter_and_its_libraries_are_listed():
    exe, dirs, hidden, libs = sandbox._layout()
    allowed = {exe, *dirs, *(dest for _, dest in libs), "/dev", "/proc", "/tmp"}
    out = attack("""
        for root, ds, fs in os.walk('/'):
            if root.startswith(('/proc', '/dev')):
                ds[:] = []
                continue
            for f in fs:
                print('FILE', os.path.join(root, f))
        for d in %r:
            print('SITE', os.listdir(d))
        """ % (hidden,), max_output=16 << 20)
    files = [ln[5:] for ln in out.splitlines() if ln.startswith("FILE ")]
    assert files and exe in files
    for f in files:
        assert any(f == a or f.startswith(a.rstrip("/") + "/") for a in allowed), f
    assert out.count("SITE []") == len(hidden)                 # the base site-packages is hidden


@needs_sandbox
def test_no_writes_outside_the_workdir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    stdlib_os = os.path.join(sandbox._layout()[1][0], "os.py")
    out = attack(f"""
        import posix
        tries = [
            ('truncate host file', lambda: os.truncate({str(victim)!r}, 0)),
            ('truncate stdlib', lambda: os.truncate({stdlib_os!r}, 0)),
            ('posix.unlink host file', lambda: posix.unlink({str(victim)!r})),
            ('posix.unlink stdlib', lambda: posix.unlink({stdlib_os!r})),
            ('mkdir /evil', lambda: os.mkdir('/evil')),
            ('mkdir in stdlib', lambda: os.mkdir(os.path.dirname({stdlib_os!r}) + '/evil')),
            ('create /evil.txt', lambda: open('/evil.txt', 'w')),
            ('create in /dev', lambda: open('/dev/evil', 'w')),
            ('create in /dev/shm', lambda: open('/dev/shm/evil', 'w')),
            ('create in /proc', lambda: open('/proc/evil', 'w')),
            ('chmod stdlib', lambda: os.chmod({stdlib_os!r}, 0o777)),
            ('rename stdlib', lambda: os.rename({stdlib_os!r}, '/tmp/os.py')),
            ('symlink in /', lambda: os.symlink('/tmp', '/evil-link')),
        ]
        for what, f in tries:
            try:
                f()
                print('ESCAPED', what)
            except OSError as e:
                print('BLOCKED', what, type(e).__name__)
        open('inside.txt', 'w').write('fine')                  # the workdir (/tmp) is writable
        os.mkdir('sub')
        print('WORKDIR', open('inside.txt').read(), os.getcwd())
        """)
    assert out.count("BLOCKED") == 13 and "WORKDIR fine /tmp" in out
    assert victim.read_text() == "keep me" and os.path.getsize(stdlib_os) > 0


@pytest.fixture
def listener():
    """A TCP listener on the host's 127.0.0.1 (non-blocking, so the test can check nobody connected)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def _nobody_connected(s: socket.socket) -> bool:
    try:
        s.accept()[0].close()
        return False
    except BlockingIOError:
        return True


@needs_sandbox
def test_network_is_unreachable(listener):
    port = listener.getsockname()[1]
    out = attack(f"""
        import _socket, socket
        try:
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(('127.0.0.1', {port}))
            print('ESCAPED _socket connect')
        except OSError as e:
            print('BLOCKED _socket', type(e).__name__)
        fd = libc.socket(2, 1, 0)
        addr = (2).to_bytes(2, 'little') + ({port}).to_bytes(2, 'big') + bytes([127, 0, 0, 1]) + bytes(8)  # sockaddr_in
        rc = libc.connect(fd, ctypes.c_char_p(addr), 16)
        print('ESCAPED ctypes connect' if rc == 0 else 'BLOCKED ctypes connect ' + str(err()))
        for host in ('10.0.0.1', '8.8.8.8'):
            try:
                socket.create_connection((host, 53), timeout=1)
                print('ESCAPED', host)
            except OSError as e:
                print('BLOCKED', host, type(e).__name__)
        try:
            socket.getaddrinfo('example.com', 80)
            print('ESCAPED dns')
        except OSError as e:
            print('BLOCKED dns', type(e).__name__)
        print('IFACES', [n for _, n in socket.if_nameindex()])
        """)
    assert out.count("BLOCKED") == 5 and "IFACES ['lo']" in out
    assert _nobody_connected(listener)


@needs_sandbox
def test_no_new_processes():
    out = attack(f"""
        import subprocess, posix
        try:
            subprocess.run([sys.executable, '-c', 'print(1)'])
            print('ESCAPED subprocess')
        except OSError as e:
            print('BLOCKED subprocess', type(e).__name__)
        try:
            subprocess.run(['id'])
            print('ESCAPED subprocess id')
        except OSError as e:
            print('BLOCKED subprocess id', type(e).__name__)
        rc = posix.system('echo pwned > /tmp/system')
        print('BLOCKED posix.system' if rc != 0 and not os.path.exists('/tmp/system') else 'ESCAPED posix.system')
        rc = libc.system(b'echo pwned > /tmp/csystem')
        print('BLOCKED ctypes system' if rc != 0 and not os.path.exists('/tmp/csystem') else 'ESCAPED ctypes system')
        forks = 0
        for _ in range(20):
            try:
                if os.fork() == 0:
                    os._exit(0)
                forks += 1
            except OSError:
                pass
        print('ESCAPED forks' if forks else 'BLOCKED 20 forks')
        pid = libc.syscall(57 if os.uname().machine == 'x86_64' else 220, 17, 0, 0, 0, 0)   # raw fork / clone(SIGCHLD)
        if pid == 0:
            os._exit(0)
        print('ESCAPED raw fork' if pid > 0 else 'BLOCKED raw fork ' + str(err()))
        try:
            os.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {{}})
            print('ESCAPED posix_spawn')
        except OSError as e:
            print('BLOCKED posix_spawn', type(e).__name__)
        import threading
        t = threading.Thread(target=print, args=('THREADS work',))
        t.start(); t.join()
        """)
    assert out.count("BLOCKED") == 7 and "THREADS work" in out


@needs_sandbox
def test_fork_and_thread_bombs_are_bounded():
    t0 = time.monotonic()
    out = attack("""
        n = 0
        try:
            while True:
                os.fork()
                n += 1
        except OSError as e:
            print('BLOCKED fork bomb after', n, type(e).__name__)
        import threading
        ev, threads = threading.Event(), []
        try:
            while len(threads) < 100000:
                t = threading.Thread(target=ev.wait)
                t.start()
                threads.append(t)
        except (RuntimeError, MemoryError) as e:
            print('BLOCKED thread bomb at', len(threads))
        ev.set()
        """, memory_mb=256)
    assert "BLOCKED fork bomb after 0" in out and "BLOCKED thread bomb at" in out
    assert int(out.split("thread bomb at ")[1].split()[0]) < 1000 and time.monotonic() - t0 < 10


@needs_sandbox
def test_secrets_in_the_environment_and_other_processes_stay_hidden(monkeypatch):
    monkeypatch.setenv("NEMOTRON3_API_KEY", "sk-parent-secret-1234")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret-5678")
    out = attack(f"""
        print('ENV', sorted(os.environ))
        print('PIDS', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
        for pid in (os.getppid(), {os.getpid()}, {os.getppid()}, 1, 'self'):
            try:
                data = open(f'/proc/{{pid}}/environ', 'rb').read()
                print('READ', pid, data)
            except OSError as e:
                print('BLOCKED', pid, type(e).__name__)
        """)
    assert "sk-parent-secret" not in out and "sk-openai-secret" not in out
    assert "ENV ['HOME', 'LANG', 'PWD']" in out and "PIDS [1]" in out


@needs_sandbox
def test_ptrace_and_kernel_attack_surface_fail_with_eperm():
    machine = os.uname().machine
    if machine not in sandbox._SYSCALLS:
        pytest.skip(f"no syscall table for {machine}")
    nr = sandbox._SYSCALLS[machine][1]
    names = ["ptrace", "mount", "umount2", "bpf", "keyctl", "add_key", "request_key", "unshare", "setns",
             "pivot_root", "chroot", "kexec_load", "init_module", "finit_module", "delete_module", "perf_event_open",
             "userfaultfd", "personality", "process_vm_readv", "process_vm_writev", "io_uring_setup", "open_tree"]
    out = attack(f"""
        ppid = os.getppid()
        for pid in (ppid, 1, {os.getpid()}):
            rc = libc.ptrace(16, pid, 0, 0)                              # PTRACE_ATTACH
            print('ESCAPED ptrace attach' if rc == 0 else f'BLOCKED ptrace {{pid}} {{err()}}')
        rc = libc.ptrace(0, 0, 0, 0)                                     # PTRACE_TRACEME
        print('ESCAPED traceme' if rc == 0 else f'BLOCKED traceme {{err()}}')
        for name, nr in {[(n, nr[n]) for n in names]!r}:
            rc = libc.syscall(nr, 0, 0, 0, 0, 0, 0)
            print(f'ESCAPED {{name}}' if rc >= 0 else f'BLOCKED {{name}} {{err()}}')
        rc = libc.unshare(0x10000000)                                    # CLONE_NEWUSER
        print('ESCAPED unshare' if rc == 0 else f'BLOCKED unshare {{err()}}')
        st = open('/proc/self/status').read()
        print('UID', os.getuid(), 'CAPS', [ln.split()[1] for ln in st.splitlines() if ln.startswith('CapEff')])
        """)
    blocked = [ln for ln in out.splitlines() if ln.startswith("BLOCKED")]
    assert len(blocked) == 3 + 1 + len(names) + 1
    assert all(ln.endswith("EPERM") for ln in blocked), blocked          # the seccomp filter's answer
    assert "UID 65534 CAPS ['0000000000000000']" in out


@needs_sandbox
def test_dev_is_minimal():
    out = attack("""
        print('DEV', sorted(os.listdir('/dev')))
        for p in ('/dev/mem', '/dev/kmem', '/dev/kmsg', '/dev/sda', '/dev/vda', '/dev/nvme0n1', '/dev/tty',
                  '/dev/port', '/dev/fuse', '/dev/net/tun'):
            try:
                open(p, 'rb').close()
                print('ESCAPED open', p)
            except OSError as e:
                print('BLOCKED', p, type(e).__name__)
        try:
            os.mknod('/tmp/mem', 0o600 | 0o020000, os.makedev(1, 1))
            print('ESCAPED mknod')
        except OSError as e:
            print('BLOCKED mknod', type(e).__name__)
        open('/dev/null', 'w').write('x')
        print('URANDOM', len(open('/dev/urandom', 'rb').read(16)))
        """)
    assert out.count("BLOCKED") == 11 and "URANDOM 16" in out
    devs = eval(out.split("DEV ", 1)[1].splitlines()[0])
    assert set(devs) <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin",
                         "stdout", "stderr", "core"}, devs


@needs_sandbox
def test_tmpfs_and_file_size_limits():
    out = attack("""
        for name, size in (('one', 3 << 20), ('two', 3 << 20), ('three', 8 << 20)):
            try:
                with open(name, 'wb') as f:
                    f.write(b'x' * size)
                print('WROTE', name)
            except OSError as e:
                print('BLOCKED', name, errno.errorcode[e.errno])
        """, disk_mb=4)
    assert "WROTE one" in out and "BLOCKED two" in out and "BLOCKED three" in out


@needs_sandbox
def test_rlimits_cannot_be_raised():
    out = attack("""
        import resource
        for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_NPROC'):
            lim = getattr(resource, name)
            try:
                resource.setrlimit(lim, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print('ESCAPED', name)
            except (ValueError, OSError):
                print('BLOCKED', name, resource.getrlimit(lim))
        """, memory_mb=300)
    assert out.count("BLOCKED") == 5 and f"BLOCKED RLIMIT_AS ({300 << 20}, {300 << 20})" in out


def _pids_in_namespace(ns: str) -> list[str]:
    alive = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.readlink(f"/proc/{p}/ns/pid") == ns:
                alive.append(p)
        except OSError:
            pass
    return alive


@needs_sandbox
@pytest.mark.parametrize("loop", ["time.sleep(1)", "pass", "print('x' * 4096)"])
def test_timeout_and_output_cap_leave_nothing_running(loop):
    code = textwrap.dedent(f"""
        import os, time
        print(os.readlink('/proc/self/ns/pid'), flush=True)
        try:
            if os.fork() == 0:
                os.setsid()
                while True:
                    time.sleep(1)
        except OSError:
            pass
        while True:
            {loop}
        """)
    r = run_python(code, timeout=1.0)
    assert (r.timed_out or r.truncated) and not r.ok and r.exit_code is None
    assert len(r.stdout) <= sandbox.MAX_OUTPUT_BYTES and r.seconds < 5
    assert r.stdout.startswith("pid:[") and _pids_in_namespace(r.stdout.split()[0]) == []


@needs_sandbox
def test_memory_and_cpu_limits():
    r = run_python("x = bytearray(20 << 30)", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr
    r = run_python("while True: pass", timeout=0.5)
    assert r.timed_out and r.text().endswith("error: timed out after 0.5s")


# ---- what must keep working -----------------------------------------------------------------------------

@needs_sandbox
def test_benign_program_works():
    code = textwrap.dedent("""
        import json, re, math, collections, itertools, functools, decimal, fractions, datetime, random, hashlib
        import statistics, string, textwrap, heapq, bisect, dataclasses, typing, sqlite3, zlib, ctypes, threading
        xs = [0] * (50 * 2**20 // 8)                 # a 50 MB list
        ys = list(range(1_000_000))
        db = sqlite3.connect(':memory:')
        print(len(xs), sum(ys), math.factorial(20), round(math.pi, 5), json.dumps({'a': [1, 2]}))
        print(hashlib.sha256(b'abc').hexdigest()[:8], decimal.Decimal('0.1') + decimal.Decimal('0.2'))
        print(db.execute('select 6 * 7').fetchone()[0], open('data.txt').read().strip(), input.__name__)
        print('ünïcödé ✓')
        """)
    r = run_python(code, files={"data.txt": "from files", "sub/dir/x.bin": b"\x00\x01"})
    assert r.ok, r
    assert r.stdout.splitlines() == [f"{50 * 2**20 // 8} 499999500000 2432902008176640000 3.14159 "
                                     '{"a": [1, 2]}', "ba7816bf 0.3", "42 from files input", "ünïcödé ✓"]
    r = run_python("import sys\nprint('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    r = run_python("print(input())")                           # stdin is empty
    assert not r.ok and "EOFError" in r.stderr


def test_file_names_must_stay_inside_the_workdir():
    for bad in ("/etc/x", "../x", "a/../../x", "."):
        with pytest.raises(ValueError):
            run_python("pass", files={bad: "x"})


# ---- the seccomp program, interpreted (runs everywhere) ---------------------------------------------------

def _bpf_run(prog: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """Classic BPF over seccomp_data(nr, arch, ip=0, args[0]=arg0): the return value."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ins = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x45):
            hit = acc == k if code == 0x15 else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_decisions(machine):
    prog = seccomp_program(machine)
    arch, nr = sandbox._SYSCALLS[machine]
    allow, eperm, enosys, kill = 0x7FFF0000, 0x50001, 0x50026, 0x80000000
    for name in ("ptrace", "mount", "bpf", "keyctl", "unshare", "setns", "init_module", "perf_event_open",
                 "userfaultfd", "process_vm_readv", "io_uring_setup", "kexec_load", "chroot", "pivot_root"):
        assert _bpf_run(prog, nr[name], arch) == eperm, name
    assert _bpf_run(prog, nr["clone3"], arch) == enosys
    assert _bpf_run(prog, nr["clone"], arch, arg0=0x3D0F00) == allow          # glibc's pthread_create flags
    assert _bpf_run(prog, nr["clone"], arch, arg0=0x11) == eperm              # fork: SIGCHLD
    assert _bpf_run(prog, nr["clone"], arch, arg0=0x4111) == eperm            # vfork-style posix_spawn
    for ordinary in (0, 1, 3, 9, 63):                                         # read, write, mmap, ...
        assert _bpf_run(prog, ordinary, arch) == allow
    assert _bpf_run(prog, 0, 0x40000003) == kill                              # i386 (int 0x80)
    if machine == "x86_64":
        assert _bpf_run(prog, 0x40000000 | 1, arch) == eperm                  # x32 ABI
        assert _bpf_run(prog, nr["fork"], arch) == eperm


# ---- failing closed -------------------------------------------------------------------------------------

@pytest.fixture
def fresh_probe():
    """Forget the cached probe / command line before and after a test that fakes the machine."""
    for f in (sandbox_problem, sandbox._bwrap_prefix, sandbox._warn_unsandboxed):
        f.cache_clear()
    yield
    for f in (sandbox_problem, sandbox._bwrap_prefix, sandbox._warn_unsandboxed):
        f.cache_clear()


def test_fails_closed_without_bubblewrap(monkeypatch, fresh_probe, capsys):
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda n: None if n == "bwrap" else real_which(n))
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*--unsafe-no-sandbox"):
        run_python("print(1)")
    r = run_python("import os\nprint(6 * 7)", allow_unsandboxed=True)
    assert r.ok and r.stdout == "42\n" and not r.sandboxed
    assert "UNSANDBOXED" in capsys.readouterr().err
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    r = run_python("while True: pass", timeout=0.5)
    assert r.timed_out and not r.sandboxed
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)")


def test_fails_closed_when_namespaces_are_refused(monkeypatch, fresh_probe, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda n: str(fake) if n == "bwrap" else real_which(n))
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*user namespaces"):
        run_python("print(1)")
    fake.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\n")
    for f in (sandbox_problem, sandbox._bwrap_prefix):
        f.cache_clear()
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap 0\.6\.1 is too old.*>= 0\.7"):
        run_python("print(1)")


def test_cli_flag_sets_the_opt_in(monkeypatch):
    from nemotron3 import cli
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")              # restored (unset) after the test
    seen = {}
    monkeypatch.setattr(cli, "cmd_chat", lambda args: seen.setdefault("env", os.environ.get(sandbox.UNSAFE_ENV)))
    cli.main(["chat", "--unsafe-no-sandbox"])
    assert seen["env"] == "1"
