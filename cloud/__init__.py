"""EdgeLoop cloud (see docs/architecture.md)."""
