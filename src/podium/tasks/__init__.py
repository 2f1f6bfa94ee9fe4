"""Task families, one folder each.

Adding a family means adding a folder here (with its `register(...)` calls reached from its
`__init__`), its line under `[project.entry-points."podium.tasks"]` in pyproject.toml (the
registry imports the families from there), and its configs under `podium/conf`.
"""
