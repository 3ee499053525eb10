"""Provisioning: download, decompress, verify, with digests recorded while streaming."""
