"""Revisions, oldest first: 0001_baseline is the schema at commit 15096dd."""
