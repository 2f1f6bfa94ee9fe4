"""Task-agnostic competition tools over runs, datasets and saved predictions (cv, tta, ensemble,
diff, augment, audit, sweep). They import the engine and reach a task only through the Task
interface and the registry, never by name."""
