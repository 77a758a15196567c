"""`python -m roompay` is the `roompay` command."""

from roompay.cli import app

app(prog_name="roompay")
