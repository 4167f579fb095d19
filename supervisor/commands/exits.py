"""The exit statuses of `llmsup` commands (docs/operations.md lists them). Imports nothing,
so any command can name them without loading the supervisor's event loop."""

EXIT_OK = 0  # done; for a supervisor: every request drained
EXIT_NOT_RUNNING = 1  # no supervisor runs there (also: any other error with its message)
EXIT_START_FAILED = 2  # start failed (a worker could not load, a bind refused; click usage)
EXIT_FORCED = 3  # requests in flight at the drain timeout were failed
EXIT_KILLED = 4  # stop --kill: the supervisor was killed, not drained
EXIT_UNSAFE = 5  # the state dir (or the pid in it) is not safe to trust: nothing was done
EXIT_DISK = 6  # a file of the state dir could not be written (full, read-only, I/O error)
