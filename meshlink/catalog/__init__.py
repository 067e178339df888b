"""The replicated catalog of exports: records, their validation, and the sans-IO sync logic."""
