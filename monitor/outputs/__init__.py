"""What the daemon tells the plant: typed messages, MQTT (through an on-disk outbox),
Prometheus metrics, the JSONL event log and saved alert clips."""
