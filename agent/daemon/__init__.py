"""The daemon: seal as a long-running service.

- ``config``: ``DaemonConfig``, the ``[daemon]`` settings;
- ``loop``: ``Daemon``, the loop (``step``, ``run_burst``, ``serve`` as APScheduler jobs);
- ``inbox``: files dropped in <home>/inbox, ingested and moved;
- ``process``: one daemon per home (lock, pidfile), start, stop, status, the log file;
- ``cli``: `seal daemon start|stop|status|run`.

What a caller outside the daemon needs to find, stop or read about a running daemon
(``process``, which loads no model) is re-exported here.
"""

from .process import (
    AlreadyRunning,
    DaemonError,
    DaemonLock,
    daemon_status,
    pid_info,
    read_pidfile,
    running,
    stop_daemon,
)

__all__ = ["AlreadyRunning", "DaemonError", "DaemonLock", "daemon_status", "pid_info", "read_pidfile", "running",
           "stop_daemon"]
