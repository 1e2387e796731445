"""Data for the workbench: tasks (synthetic long-memory problems, digits, text) and their sources."""
