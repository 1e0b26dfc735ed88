"""The file engine: one file per part."""
