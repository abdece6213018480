"""Nightshift's Modal provider: provider contract v1 (docs/provider-contract.md) on Modal Sandboxes."""
