"""The test suite, laid out by the package layer each test exercises (docs/design.md)."""
