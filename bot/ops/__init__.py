"""Running loopbot unattended: health, metrics, backups, retention, logs, webhook."""
