"""The doit boundary: task dicts, the actions doit runs, the reporter, config loading for dodo.py."""
