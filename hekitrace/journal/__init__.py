"""The daemon's journal: event segments, checkpoints, and recovery at start-up."""
