"""`python -m graddyn.cli`: the same as the `graddyn` console script."""

from graddyn.cli.app import main

main()
