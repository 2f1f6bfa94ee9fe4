"""Error types that map to the CLI's exit codes.

`UserError` is anything the user can fix (bad config, bad input, missing file): the CLI prints
its message as one paragraph, without a traceback, and exits with code 2. Everything else is an
internal failure (exit 1).
"""


class UserError(Exception):
    """A problem with the user's config or data; the message says what and where."""

    exit_code = 2


class TrainingDiverged(Exception):
    """The loss became NaN/Inf; the last good checkpoint is kept untouched."""

    exit_code = 1
