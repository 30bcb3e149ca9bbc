# The code sandbox's harness (fusechat-data, score/code.rs). Runs in a fresh
# scratch directory as its working directory, under `unshare -n -p -f` when
# the machine allows it (no network, own pid namespace), with a wall clock
# kept by the caller. Here: resource limits, dropping root where the Python
# install allows it, then an audit hook that refuses files outside the
# scratch directory and the Python install, sockets, new processes and
# ctypes, before the untrusted code runs. The result goes to the real stdout
# as one line prefixed with a nonce read from stdin.
import copy
import io
import json
import math
import os
import resource
import sys
import traceback

# Common modules the solutions use, imported while the install is readable.
import collections, functools, itertools, heapq, bisect, re, string, operator  # noqa: E401,F401
import fractions, decimal, statistics, random, datetime, typing, array, cmath  # noqa: E401,F401


def main():
    nonce = sys.stdin.readline().strip()
    out = os.fdopen(os.dup(1), "w")
    scratch = os.path.realpath(os.getcwd())
    def floats(d):
        if len(d) == 1 and "$float" in d:
            return float(d["$float"])
        return d

    with open("task.json") as f:
        task = json.load(f, object_hook=floats)
    os.remove("task.json")
    try:
        os.remove(os.path.abspath(sys.argv[0]))
    except OSError:
        pass

    def finish(passed, reason, detail="", **extra):
        d = {"passed": passed, "reason": reason, "detail": str(detail)[-2000:]}
        d.update(extra)
        out.write(nonce + json.dumps(d) + "\n")
        out.flush()
        os._exit(0)

    mem = int(task["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = int(task["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    atol = float(task.get("atol") or 0.0)
    entry = task.get("entry_point")
    inputs = task.get("inputs") or []

    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            try:
                if a != a and b != b:
                    return True
                return math.isclose(a, b, rel_tol=1e-6, abs_tol=max(atol, 1e-9))
            except TypeError:
                return False
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        try:
            return bool(a == b)
        except Exception:
            return False

    # Expected outputs from the task's own solution (trusted), before the
    # untrusted code is loaded. Inputs the reference rejects are skipped.
    expected = []
    if entry and task.get("canonical_solution") and inputs:
        ref = {"__name__": "reference"}
        exec(compile(task["canonical_solution"], "reference.py", "exec"), ref)
        fn = ref[entry]
        for args in inputs:
            try:
                expected.append((args, fn(*copy.deepcopy(args))))
            except Exception:
                pass

    if task.get("drop_privileges") and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass

    read_ok = set()
    for p in sys.path + [sys.prefix, sys.base_prefix, sys.exec_prefix]:
        if p:
            read_ok.add(os.path.realpath(p))
    read_ok.discard("/")
    read_ok.discard(scratch)
    dev_ok = {"/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(p, root):
        return p == root or p.startswith(root + os.sep)

    def real(path):
        if isinstance(path, int):
            return None
        try:
            return os.path.realpath(os.fsdecode(path))
        except Exception:
            return "?"

    blocked_events = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.PyObj_FromPtr",
        "sys.addaudithook", "resource.setrlimit", "resource.prlimit", "os.setuid",
        "os.setgid", "webbrowser.open", "urllib.Request", "http.client.connect",
        "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open", "telnetlib.Telnet.open",
    }
    blocked_modules = {"_ctypes", "ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_socket", "socket", "pty"}
    path_events = {
        "os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown", "os.link", "os.symlink",
        "os.mkdir", "os.truncate", "os.utime", "os.chdir", "os.listdir", "os.scandir",
        "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags", "os.mkfifo", "os.mknod",
    }
    armed = [False]

    def hook(event, args):
        if not armed[0]:
            return
        if event == "open":
            p = real(args[0])
            if p is None:
                return
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            writing = bool(flags & write_flags) or any(c in mode for c in "wax+")
            if inside(p, scratch) or p in dev_ok:
                return
            if not writing and any(inside(p, r) for r in read_ok):
                return
            raise PermissionError(f"sandbox: opening {p} is not allowed")
        if event in blocked_events or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in blocked_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event in path_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    p = real(a)
                    if p and not inside(p, scratch):
                        if event in ("os.listdir", "os.scandir") and any(inside(p, r) for r in read_ok):
                            continue
                        raise PermissionError(f"sandbox: {event} on {p} is not allowed")

    sys.addaudithook(hook)
    # Modules imported from here on come from the untrusted code.
    for m in list(blocked_modules):
        sys.modules.pop(m, None)
    sys.stdout = io.StringIO()
    sys.stdin = io.StringIO("")
    armed[0] = True

    ns = {"__name__": "solution"}
    try:
        exec(compile(task["code"], "solution.py", "exec"), ns)
    except MemoryError:
        finish(False, "memory", "MemoryError while loading the code")
    except PermissionError as e:
        finish(False, "blocked", e)
    except BaseException as e:  # noqa: BLE001 (SystemExit, KeyboardInterrupt too)
        finish(False, "error", "".join(traceback.format_exception_only(type(e), e)).strip())

    tests = 0
    try:
        if entry:
            if not callable(ns.get(entry)):
                finish(False, "no_function", f"the code defines no function `{entry}`")
            fn = ns[entry]
            for i, (args, want) in enumerate(expected):
                tests += 1
                got = fn(*copy.deepcopy(args))
                if not same(got, want):
                    finish(False, "wrong_answer",
                           f"input {i}: {repr(args)[:300]} gave {repr(got)[:300]}, expected {repr(want)[:300]}",
                           tests=tests)
        if task.get("test"):
            tests += 1
            exec(compile(task["test"], "test.py", "exec"), ns)
    except AssertionError as e:
        finish(False, "wrong_answer", f"assertion failed: {task.get('test', '')[:300]} {e}", tests=tests)
    except MemoryError:
        finish(False, "memory", "MemoryError", tests=tests)
    except PermissionError as e:
        finish(False, "blocked", e, tests=tests)
    except RecursionError as e:
        finish(False, "error", f"RecursionError: {e}", tests=tests)
    except BaseException as e:  # noqa: BLE001
        finish(False, "error", "".join(traceback.format_exception_only(type(e), e)).strip(), tests=tests)
    if tests == 0:
        finish(False, "no_tests", "the task has no tests that the reference solution passes")
    finish(True, "pass", f"{tests} test(s) passed", tests=tests)


try:
    main()
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.exit(3)
