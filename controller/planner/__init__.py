"""Pure planning: desired node state from specs and facts; names; port and IP allocation.
Imports only controller.models and the standard library (no I/O, no clock, no randomness)."""
