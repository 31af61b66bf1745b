"""Jobs the `metaopt` command runs (the embedded default job and its pieces)."""
