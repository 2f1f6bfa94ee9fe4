"""The Task interface every family implements. It lives in `podium.engine.task` (the engine runs
tasks and must not import this package); families import it from here or from there."""

from podium.engine.task import StepContext, Task  # noqa: F401
