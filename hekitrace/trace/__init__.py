"""The trace file format: header and blocks, the binary record codec, the JSON Lines codec."""
