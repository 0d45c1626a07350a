"""The tollway command, the admin CLI and the worker supervisor."""
