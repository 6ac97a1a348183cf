"""Sandbox launcher: namespaces, read-only mounts, rlimits, uid drop, then exec of the harness.

Runs as root (or the calling user) under `python -I -S -c`. "reap" mode instead becomes the
sandbox uid and kills every process of it. Standard library only (see package docstring).
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys

NEWNS, NEWNET, NEWPID, NEWUSER = 0x20000, 0x40000000, 0x20000000, 0x10000000
spec = json.loads(sys.argv[1])
if spec["mode"] == "reap":
    uid = spec["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    os._exit(0)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "prop", "userns")]


def call(fn, *args):
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setattr_mount(path, flags, set_=0, clr=0):  # mount_setattr(2), Linux >= 5.12
    attr = MountAttr(set_, clr, 0, 0)
    call(libc.syscall, 442, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))


out = spec["status_fd"]


def send(obj):
    os.write(out, (json.dumps(obj) + "\n").encode())


uid, work, root = spec["uid"], spec["workdir"], os.geteuid() == 0
prot = {
    "uid_drop": False,
    "uid": None,
    "net_ns": False,
    "mount_ns_readonly": False,
    "pid_ns": False,
    "no_new_privs": False,
    "rlimits": spec["rlimits"],
    "notes": [],
}
try:
    flags = 0
    if spec["isolate"]:
        tries = (
            [NEWNS | NEWNET | NEWPID, NEWNET | NEWPID, NEWNET]
            if root
            else [NEWUSER | NEWNS | NEWNET | NEWPID, NEWUSER | NEWNET | NEWPID, NEWUSER | NEWNET]
        )
        for option in tries:
            if libc.unshare(option) == 0:
                flags = option
                break
            prot["notes"].append(f"unshare {option:#x}: {os.strerror(ctypes.get_errno())}")
    if flags & NEWUSER:  # map our own ids into the new user namespace
        outer_uid, outer_gid = os.getuid(), os.getgid()
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{outer_uid} {outer_uid} 1"),
            ("gid_map", f"{outer_gid} {outer_gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    prot["net_ns"] = bool(flags & NEWNET)
    if flags & NEWNS:
        try:
            call(libc.mount, None, b"/", None, 16384 | (1 << 18), None)  # MS_REC|MS_PRIVATE
            call(libc.mount, work.encode(), work.encode(), None, 4096, None)  # MS_BIND
            setattr_mount("/", 0x8000, set_=1 | 2)  # AT_RECURSIVE: RDONLY|NOSUID everywhere
            setattr_mount(work, 0, clr=1)  # ...except the run's own directory
            prot["mount_ns_readonly"] = True
        except OSError as exc:
            prot["notes"].append(f"read-only mounts: {exc}")
    child = os.fork() if flags & NEWPID else 0
    if child:  # stays outside as the pid namespace's parent and relays how it ended
        os.close(0)
        _, status = os.waitpid(child, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        send({"wait": True, "exit": code, "signal": sig})
        os._exit(code if code is not None else 128 + sig)
    prot["pid_ns"] = bool(flags & NEWPID)
    for name, limits in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(limits))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise OSError("uid drop did not take")
        prot["uid_drop"], prot["uid"] = True, uid
    call(libc.prctl, 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
    prot["no_new_privs"] = True
    call(libc.prctl, 1, signal.SIGKILL, 0, 0, 0)  # PDEATHSIG, after the uid change cleared it
    if not prot["pid_ns"] and os.getppid() != spec["parent_pid"]:
        os._exit(125)  # the grader died before we got here
    send({"protections": prot})
    os.close(out)
    os.chdir(work)
    os.execve(spec["python"], [spec["python"], "-I", "-B", "-c", spec["harness"]], spec["env"])
except BaseException as exc:
    send({"error": f"sandbox launcher: {type(exc).__name__}: {exc}", "protections": prot})
    os._exit(125)
