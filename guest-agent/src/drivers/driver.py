"""airlock's Python driver: one warm interpreter, cells run in one persistent
namespace, like a notebook.

The guest agent starts this once, as the sandbox user, and talks to it over
two pipes: fd 3 carries commands in, fd 4 carries events out, one JSON object
per line each way. User output goes to fds 1 and 2, pipes the agent reads,
so output of subprocesses is captured too.

Commands: {"op": "run", "code": str} -> "done"; {"op": "reset"} and
{"op": "reseed"} -> "ok". Events: "ready" (once warm), "image" (a figure as
base64 PNG), "done" (status 0 or 1, and the exception if one escaped).

Everything expensive (numpy, pandas, matplotlib with its font cache) is
imported and exercised before "ready", so that a snapshot of a warm guest
holds it and the first cell pays nothing for it; so are the image's own
modules, named in $AIRLOCK_PYTHON_IMPORTS (comma-separated), which leaves
the environment before any user code runs. Each of these is optional: one
that fails to import is a note in "ready", not a failure.

Runs on Python 3.9 and later (a custom image brings its own Python).
"""

import os
import sys
import time

_T0 = time.monotonic()
CTL_IN, CTL_OUT = 3, 4
# airlock's plumbing, not the user's: out of os.environ (and so of every
# subprocess's environment) at once.
_IMPORTS = [m for m in os.environ.pop("AIRLOCK_PYTHON_IMPORTS", "").split(",") if m]

# Keep our control pipes out of user subprocesses.
for _fd in (CTL_IN, CTL_OUT):
    os.set_inheritable(_fd, False)
# Imports from the working directory, as in a REPL (not from our own directory).
if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = ""

import ast  # noqa: E402
import base64  # noqa: E402
import builtins  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import linecache  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

_notes = []


def _send(event):
    data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(CTL_OUT, view):]


_inbuf = b""
# Read into one buffer allocated once: os.read would map and unmap a fresh
# megabyte for every command.
_readbuf = bytearray(1 << 20)


def _recv():
    global _inbuf
    while b"\n" not in _inbuf:
        n = os.readv(CTL_IN, [_readbuf])
        if not n:
            # The agent closed the pipe: nothing more to do.
            os._exit(0)
        _inbuf += _readbuf[:n]
    line, _, _inbuf = _inbuf.partition(b"\n")
    return json.loads(line)


class _Stream(io.TextIOWrapper):
    """A buffered text stream on a pipe that flushes at a line end when
    50 ms have passed since the last flush (and at the end of each cell, and
    when 64 KiB are pending): few write system calls for bursts of prints,
    while the first line after a quiet spell goes out at once."""

    def write(self, s):
        n = super().write(s)
        if s.endswith("\n"):
            now = time.monotonic()
            if now - self._airlock_last >= 0.05:
                self.flush()
                self._airlock_last = now
        return n


def _stream(fd):
    raw = io.FileIO(fd, "w", closefd=False)
    s = _Stream(
        io.BufferedWriter(raw, 1 << 16),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=False,
        write_through=False,
    )
    s._airlock_last = 0.0
    return s


_stdout, _stderr = _stream(1), _stream(2)
sys.stdout, sys.stderr = _stdout, _stderr


def _warm():
    """Import the heavy libraries and run each once.

    Two imports would start a program (each a fork and exec, seconds on a
    software-nested guest): pandas asks platform for the processor, which
    runs `uname -p` (it says "unknown" on Linux, reported as ""), and
    matplotlib looks for fontconfig's fc-list, which the image lacks. Both
    answers are known, so they are given without the programs."""
    import platform
    import subprocess
    if hasattr(platform, "_Processor"):  # a private detail: other versions may lack it
        platform._Processor.get = classmethod(lambda cls: "")
    real_check_output = subprocess.check_output

    def check_output(args, *a, **kw):
        if isinstance(args, (list, tuple)) and args and args[0] == "fc-list":
            import shutil
            if shutil.which("fc-list") is None:
                raise FileNotFoundError(2, "No such file or directory", "fc-list")
        return real_check_output(args, *a, **kw)

    subprocess.check_output = check_output
    try:
        _warm_imports()
        _image_imports()
    finally:
        subprocess.check_output = real_check_output


def _warm_imports():
    for mod in ("json", "re", "math", "collections", "datetime", "itertools",
                "functools", "statistics", "csv", "pathlib", "subprocess",
                "asyncio", "decimal", "fractions", "textwrap", "string"):
        try:
            __import__(mod)
        except Exception as e:  # pragma: no cover - stdlib
            _notes.append(f"{mod}: {e}")
    try:
        import numpy
        numpy.arange(10).sum()
    except Exception as e:
        _notes.append(f"numpy: {e}")
    try:
        import pandas
        pandas.DataFrame({"a": [1, 2]}).describe().to_string()
    except Exception as e:
        _notes.append(f"pandas: {e}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.show = _show
        # Draw and encode once: builds the font cache and loads the PNG writer.
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [0, 1])
        ax.set_title("warm")
        fig.savefig(io.BytesIO(), format="png")
        plt.close("all")
    except Exception as e:
        _notes.append(f"matplotlib: {e}")


def _image_imports():
    """The image's python_imports. A module may exit or raise anything while
    importing; the driver must still come up."""
    import importlib
    for mod in _IMPORTS:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            _notes.append(f"{mod}: {e}")
        except BaseException as e:
            _notes.append(f"{mod}: {type(e).__name__}: {e}")


_figures_sent = 0


def _emit_figures():
    """Send every open figure as a PNG image, then close them."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        nums = plt.get_fignums()
    except Exception:
        return
    for num in nums:
        try:
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            png = buf.getvalue()
            _send({
                "ev": "image",
                "format": "png",
                "width": int.from_bytes(png[16:20], "big"),
                "height": int.from_bytes(png[20:24], "big"),
                "data": base64.b64encode(png).decode("ascii"),
            })
        except Exception as e:
            print(f"[airlock: figure {num} could not be rendered: {e}]", file=_stderr)
    try:
        plt.close("all")
    except Exception:
        pass


def _show(*args, **kwargs):
    """plt.show(): send the open figures now, as a notebook would."""
    _stdout.flush()
    _emit_figures()


_user_main = None
_ns = None


def _fresh_namespace():
    global _user_main, _ns
    _user_main = types.ModuleType("__main__")
    _user_main.__dict__["__builtins__"] = builtins
    # Pickling and multiprocessing look functions and classes up in __main__.
    sys.modules["__main__"] = _user_main
    _ns = _user_main.__dict__


_running = False
_cells = 0


def _on_sigint(signum, frame):
    # The agent interrupts only a running cell; a late signal is ignored.
    if _running:
        raise KeyboardInterrupt


def _user_tb(tb):
    """Drop this driver's own frames from the front of a traceback."""
    here = os.path.abspath(__file__)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == here:
        tb = tb.tb_next
    return tb


def _error(e):
    if isinstance(e, SyntaxError):
        text = "".join(traceback.format_exception_only(type(e), e))
    else:
        text = "".join(traceback.format_exception(type(e), e, _user_tb(e.__traceback__)))
    _stderr.write(text)
    return {"name": type(e).__name__, "value": str(e), "traceback": text}


_loop = None


def _run(code):
    global _running, _cells, _loop
    _cells += 1
    filename = f"<cell-{_cells}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    status, error = 0, None
    try:
        _running = True
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Interactive([tree.body.pop()])
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        for node, mode in ((tree, "exec"), (last, "single")):
            if node is None or (mode == "exec" and not node.body):
                continue
            compiled = compile(node, filename, mode, flags=flags)
            result = eval(compiled, _ns)
            if compiled.co_flags & 0x80:  # CO_COROUTINE: top-level await
                import asyncio
                if _loop is None or _loop.is_closed():
                    _loop = asyncio.new_event_loop()
                _loop.run_until_complete(result)
        _running = False
    except SystemExit as e:
        _running = False
        code_ = e.code
        status = code_ if isinstance(code_, int) else (0 if code_ is None else 1)
        if code_ is not None and not isinstance(code_, int):
            print(code_, file=_stderr)
        if status:
            error = {"name": "SystemExit", "value": str(code_),
                     "traceback": f"SystemExit: {code_}\n"}
    except BaseException as e:  # the interpreter must survive anything
        _running = False
        status, error = 1, _error(e)
    finally:
        _running = False
    # User code may have swapped the streams; put ours back.
    sys.stdout, sys.stderr = _stdout, _stderr
    for s in (_stdout, _stderr):
        try:
            s.flush()
        except Exception:
            pass
    _emit_figures()
    _send({"ev": "done", "status": status, "error": error})


def _reset():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")
    for name in list(linecache.cache):
        if name.startswith("<cell-"):
            del linecache.cache[name]
    _fresh_namespace()
    gc.collect()


def _reseed():
    """Fresh generator state after a snapshot restore (see Refresh)."""
    random.seed(os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        # OpenSSL's DRBG reseeds when the clock is behind its last seeding,
        # which the agent arranges while this runs.
        ssl.RAND_bytes(16)


def main():
    signal.signal(signal.SIGINT, _on_sigint)
    _fresh_namespace()
    _warm()
    # What an imported module may have taken over, back to the driver's.
    signal.signal(signal.SIGINT, _on_sigint)
    sys.stdout, sys.stderr = _stdout, _stderr
    for s in (_stdout, _stderr):
        s.flush()
    _send({
        "ev": "ready",
        "ms": int((time.monotonic() - _T0) * 1000),
        "detail": "; ".join(_notes) or None,
    })
    while True:
        cmd = _recv()
        op = cmd.get("op")
        if op == "run":
            _run(cmd.get("code", ""))
        elif op == "reset":
            _reset()
            _send({"ev": "ok"})
        elif op == "reseed":
            _reseed()
            _send({"ev": "ok"})
        else:
            _send({"ev": "error", "message": f"unknown op {op!r}"})


main()
