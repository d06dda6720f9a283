"""Test helpers shared by the core's tests."""
