"""Operations: /healthz, /readyz, /metrics and the JSON status API (aiohttp)."""
