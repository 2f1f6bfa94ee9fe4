"""Task families. Importing this package registers every built-in family.

Adding a family means adding a folder here (with its `register(...)` calls in its `__init__`)
and its configs under `podium/conf`, nothing else.
"""

from podium.tasks import classification  # noqa: F401
