"""Task families. Importing this package registers every built-in family.

Adding a family means adding a folder here (with its `register(...)` calls reached from its
`__init__`), its line below, and its configs under `podium/conf`, nothing else.
"""

from podium.tasks import classification, landmarks  # noqa: F401
