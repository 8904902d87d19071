"""Test infrastructure shared by every test folder (fixtures register it in tests/conftest.py)."""
