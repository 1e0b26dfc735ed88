"""The exit statuses of every ``karma8`` command: 0 all went well, 1 it failed (an invariant,
a request, a check), 2 it was used wrongly, 3 it crashed (a bug, with a way to replay it)."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASHED = 0, 1, 2, 3
