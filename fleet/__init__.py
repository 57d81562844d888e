"""EdgeLoop fleet (see docs/architecture.md)."""
