"""Helpers shared by test files in several layer folders (tests/ is on sys.path via pyproject's
`pythonpath`, so they import them as `support.<module>`)."""
