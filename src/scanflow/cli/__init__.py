"""The `scanflow` command."""
