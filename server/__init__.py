"""rrto-server: the edge daemon that runs robots' operators on its GPU (or CPU)."""
