"""Model fetching, verification and conversion (run at `make models` / `make engine` time, not in the loop)."""
