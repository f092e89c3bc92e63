"""``python -m allo_batch`` runs the command line."""

from allo_batch.cli import main

main()
