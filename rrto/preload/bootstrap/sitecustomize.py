"""rrto's preload bootstrap, imported by every Python process started under librrto_preload.so.

The shim puts this folder first on PYTHONPATH, so Python imports this file at start-up in place
of the environment's own sitecustomize, which it then runs (it must: distributions and users
keep set-up code there). The rules, in order:

* Nothing happens until the process imports torch, so pip, roslaunch and the other Python tools
  under a launcher stay as they are and pay about a millisecond.
* rrto's own processes are never offloaded: ``rrto``/``python -m rrto`` (it enables rrto
  itself) and ``rrto-server``/``python -m server`` (the server, embedded ones included).
  Nor is a program named in ``RRTO_EXCLUDE`` (comma-separated script names, like
  ``camera.py``, or module names run with ``-m``).
* With ``RRTO_TRACE_CUDA=1`` nothing is offloaded: the process runs on its own GPU and its
  CUDA driver calls are counted (``rrto trace``).
* Otherwise, when torch has been imported, ``rrto.enable()`` runs from the ``RRTO_*``
  variables: every process opens its own session. Without ``RRTO_SERVER`` each process
  starts its own embedded server; ``rrto run`` starts one for the whole tree instead.
  ``RRTO_STATS`` is per process: ``{pid}`` in it is replaced by the process id, and a path
  without ``{pid}`` gets ``.PID`` before its extension (``stats.json`` -> ``stats.4242.json``).
  A line of counters goes to stderr at exit unless ``RRTO_QUIET=1``.

Runs in any Python 3 that inherits PYTHONPATH, also ones without rrto: keep it small, and
import nothing heavy before torch is.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _TorchWatcher:
    """A meta path finder that finds nothing itself: it runs ``_on_torch`` right after torch
    has finished importing, before the app's next statement."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # once only; it also keeps the search below from finding us
        import importlib.util

        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            del loader.exec_module  # torch's loader is torch's alone: put it back as it was
            _on_torch()

        loader.exec_module = exec_module
        return spec


def _program(main) -> str:
    """The name RRTO_EXCLUDE matches: the script's file name, or the module run with -m."""
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name not in ("__main__", "__mp_main__"):
        return spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "python")
    return os.path.basename(path)


def _is_rrto_itself(main) -> bool:
    if sys.argv and os.path.basename(sys.argv[0]) in ("rrto", "rrto-server"):
        return True
    try:
        import rrto
    except ImportError:
        return False
    root = os.path.dirname(os.path.dirname(os.path.realpath(rrto.__file__)))
    main_file = os.path.realpath(getattr(main, "__file__", None) or "")
    return main_file in (os.path.join(root, "rrto", "__main__.py"), os.path.join(root, "server", "__main__.py"))


def _on_torch() -> None:
    main = sys.modules.get("__main__")
    if os.environ.get("RRTO_TRACE_CUDA") == "1":
        if _tracer is not None:
            _tracer.watch_torch()
        return
    program = _program(main)
    excluded = [p.strip() for p in os.environ.get("RRTO_EXCLUDE", "").split(",") if p.strip()]
    if program in excluded or _is_rrto_itself(main):
        return
    _offload(program)


def _stats_path(program: str):
    path = os.environ.get("RRTO_STATS")
    if not path:
        return None
    pid = str(os.getpid())
    if "{pid}" in path:
        return path.replace("{pid}", pid)
    root, ext = os.path.splitext(path)
    return f"{root}.{pid}{ext}"


def _offload(program: str) -> None:
    try:
        import rrto
        from rrto.__main__ import summary
    except ImportError as e:
        print(f"rrto: {program} runs without offload: this Python ({sys.executable}) cannot import rrto ({e})",
              file=sys.stderr)
        return
    try:
        rrto.enable(stats=_stats_path(program))
    except (rrto.RrtoError, ValueError) as e:
        print(f"rrto: cannot offload {program} (pid {os.getpid()}): {e}", file=sys.stderr)
        raise SystemExit(2) from None  # the app would fail later, less clearly, on a machine without CUDA
    offload = rrto.current()
    quiet = os.environ.get("RRTO_QUIET", "").lower() not in ("", "0", "false", "no")

    def finish():
        stats = offload.stats
        rrto.disable()  # closes the session and writes the stats file; a no-op if the app did it
        if not quiet:
            line = summary(stats.snapshot())
            print(f"rrto[{program} {os.getpid()}]{line[len('rrto'):]}", file=sys.stderr)

    import atexit

    atexit.register(finish)  # registered after rrto's own exit handler, so it runs before it


def _start_trace():
    try:
        from rrto.preload.trace import Tracer
        return Tracer()
    except Exception as e:  # noqa: BLE001 - tracing must never stop the app
        print(f"rrto: CUDA tracing is off in this process: {e}", file=sys.stderr)
        return None


def _chain() -> None:
    """Run the sitecustomize this one shadows, as Python would have run it."""
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_tracer = None
if __name__ == "sitecustomize":  # not when a documentation tool walks rrto's files
    # The app should see the sys.path it would have had; children still get the folder from PYTHONPATH.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    if os.environ.get("RRTO_TRACE_CUDA") == "1":
        _tracer = _start_trace()
    sys.meta_path.insert(0, _TorchWatcher())
    _chain()
