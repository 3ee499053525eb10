"""The floor everything stands on: options, config files, the Part, its run files and disk format."""
