"""Guest setup as cached disk layers: the steps, their keys, the cache and the builder."""
