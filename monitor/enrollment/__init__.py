"""Adding normal sound to a bank: from recordings on disk, and live from the daemon's audio."""
