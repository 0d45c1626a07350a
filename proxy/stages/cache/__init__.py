"""The exact response cache: a stage that may answer a request itself."""
