"""`python -m streammf.cli ...`, as the `streammf` script."""

from streammf.cli import main

main()
