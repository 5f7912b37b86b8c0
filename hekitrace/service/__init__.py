"""The running daemon: its loop, the HTTP endpoint, the control socket, sd_notify, alerts, metrics."""
