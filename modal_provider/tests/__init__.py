"""Tests of the Modal provider: stdlib unittest, run from the repository root with `-t modal_provider`."""
