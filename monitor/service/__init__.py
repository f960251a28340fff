"""The daemon: its lifecycle and threads, the per-window pipeline, each machine's state and
alerts, the commands it answers, and its ties to systemd."""
