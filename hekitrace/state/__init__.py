"""The state rebuilt from events: the event vocabulary, AttrMap, Host and Guest, the Heki host model."""
