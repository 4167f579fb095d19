"""`python -m llmsup.supervisor` is the `llmsup` command; the daemon runs as this."""

from llmsup.supervisor.cli import main

main()
