"""The semantic cache: a stage that answers a request whose meaning matches an earlier one."""
