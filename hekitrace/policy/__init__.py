"""Findings from state changes: the rule catalogue, the rules, request/apply pairing, storm control."""
