"""Guest setup as a cached chain of disk layers: keys, the store, the builder."""
