"""Local mode: sites on plain hosts, exports from YAML, imports as local listeners."""
