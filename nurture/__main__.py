"""`python -m nurture` is the `nurture` command."""

from nurture.cli import main

main()
