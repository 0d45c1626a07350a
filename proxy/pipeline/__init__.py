"""handle(): the stages in order, the snapshot a request reads."""
