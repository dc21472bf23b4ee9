"""Shared pytest setup.  Area fixtures live in tests/fixtures/ modules listed here."""
