"""The enrolled normal sound: the bank model, its versioned on-disk store (and archives), and
compaction of large conditions."""
