"""The `llmsup` command line: one module per command family, built on the settings declaration."""
