"""The `tensord` command."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys

from . import ops
from .config import ConfigError, DaemonConfig, load_config
from .control import takeover

EXPORT_HELP = "export a Python model to TorchScript or torch.export"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="tensord", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--socket", help="Unix socket path (default: $TENSORD_SOCKET, "
                       "/run/tensord/tensord.sock or /tmp/tensord.sock)")
    serve.add_argument("--config", help="TOML config file")
    serve.add_argument("--log-level", default="INFO")
    # `export` imports torch: only when it is the command, so that the operator commands
    # (probes) start in milliseconds.
    export = None
    if next((a for a in argv if not a.startswith("-")), None) == "export":
        try:
            from . import export
        except ImportError as e:  # a client-only install (no `serve` extra)
            if e.name != "torch":
                raise
            print("tensord: `tensord export` needs torch, which is not installed here: "
                  "pip install 'tensord[serve]'", file=sys.stderr)
            return 1
        export.add_parser(sub)
    else:
        sub.add_parser("export", help=EXPORT_HELP)
    ops.add_parsers(sub)
    takeover.add_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(), stream=sys.stderr,
                        format=log_format(), datefmt="%Y-%m-%dT%H:%M:%S")
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "export" and export is not None:
        return export.run(args)
    if args.cmd == "upgrade":
        return takeover.run(args)
    if hasattr(args, "op"):
        return ops.run(args)
    return 2


def log_format() -> str:
    """Every line carries its time (ISO 8601, milliseconds, local time), except where stderr
    is the journal: journald stamps each line itself (JOURNAL_STREAM names the stream it
    connected to stderr, sd_journal_stream_fd(3))."""
    if _stderr_is_journal():
        return "tensord %(levelname)s %(name)s: %(message)s"
    return "%(asctime)s.%(msecs)03d tensord %(levelname)s %(name)s: %(message)s"


def _stderr_is_journal() -> bool:
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def _serve(args) -> int:
    try:
        from .control.server import AddressInUse, Server
        from .models.builtin import builtin_models
        from .models.loader import LoadError, load_model, warm_up
        from .models.registry import Registry
        from .sdnotify import listen_fds, notify
        from .serving.executor import Executor, set_cpu_threads
    except ImportError as e:  # a client-only install (no `serve` extra)
        if e.name not in ("torch", "prometheus_client"):
            raise
        logging.getLogger("tensord").error("`tensord serve` needs %s, which is not installed: "
                                           "pip install 'tensord[serve]'", e.name)
        return 1

    _raise_fd_limit()
    inherited = None
    # Started by a daemon being upgraded: its listening socket, taken over once ready.
    predecessor = takeover.Predecessor.from_env()
    try:
        # Socket activation (tensord.socket): the manager made the socket; clients that
        # connect while the models load wait in its queue.
        fds = listen_fds()
        if len(fds) > 1:
            raise ConfigError(f"the service manager passed {len(fds)} sockets; tensord takes "
                              "one (one ListenStream= in tensord.socket)")
        inherited = fds[0] if fds else None
        if predecessor is not None:
            inherited = predecessor.listener
        cfg = load_config(args.config) if args.config else DaemonConfig()
        if args.socket:
            cfg.socket = args.socket
        threads = set_cpu_threads(cfg.threads)
        logging.getLogger("tensord").info("CPU models use %d intra-op threads", threads)
        executor = Executor()
        # Loads run aside: this main thread must not keep an OpenMP pool (see executor.py).
        builtins = executor.aside(builtin_models) if cfg.builtin_models else []
        for m in builtins:
            executor.aside(warm_up, m)
        registry = Registry(builtins)
        for mc in cfg.models:
            notify(f"STATUS=loading model {mc.name}")
            registry.add(executor.aside(load_model, mc), mc)
        server = Server(cfg, registry, executor)
        # Before the socket exists: a client that connects and at once sends SIGTERM gets a
        # drain, never the default action (death without a word). Whichever thread the kernel
        # hands a signal to, the control loop wakes (server.py, issue 19.10).
        signal.set_wakeup_fd(server.signal_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        signal.signal(signal.SIGINT, lambda *_: server.shutdown())
        signal.signal(signal.SIGHUP, lambda *_: server.reload_config())
        signal.signal(signal.SIGUSR2, lambda *_: server.upgrade())  # `tensord upgrade`
        # Signals whose default would end the daemon without a word: ignored.
        for sig in (signal.SIGUSR1, signal.SIGALRM, signal.SIGIO):
            signal.signal(sig, signal.SIG_IGN)
        if predecessor is not None:
            predecessor.take_over()  # models loaded and warm: the old daemon stops accepting
        server.listen(inherited, owns_path=predecessor is not None and predecessor.owns_path)
    except (ConfigError, AddressInUse, LoadError, OSError) as e:
        logging.getLogger("tensord").error("%s", e)
        return 1
    if predecessor is not None:
        # MAINPID=: systemd follows the new daemon (NotifyAccess=all), whose watchdog this is
        # now; then the old one drains.
        predecessor.serving()
    notify("READY=1")
    server.serve_forever()  # tells the manager STOPPING=1 as it starts to shut down
    return 0


def _raise_fd_limit() -> None:
    """Each session holds six descriptors (its socket, a memfd until the client has its own,
    four eventfds): 200 sessions need more than the usual soft limit of 1024. Raise the soft
    limit to the hard one, as Go programs do at start-up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            logging.getLogger("tensord").warning("could not raise the open-files limit from %d "
                                                 "to %d: %s", soft, hard, e)
