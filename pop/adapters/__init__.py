"""Adapters make the desired state true: each takes the whole desired set and applies the difference."""
