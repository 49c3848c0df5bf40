"""`python -m worker` is `optrack`."""

from worker.cli import main

main()
