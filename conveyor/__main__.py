"""`python -m conveyor ...` runs the `conveyor` command."""
from conveyor.cli import entry

entry()
