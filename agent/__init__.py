"""EdgeLoop agent (see docs/architecture.md)."""
