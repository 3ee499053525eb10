"""Talking to a running guest: ssh and scp."""
