"""`python -m threadline_server` runs the CLI."""

from threadline_server.cli import main

main()
