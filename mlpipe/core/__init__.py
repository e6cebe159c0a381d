"""What every component stands on: typed errors and exit codes, settings, the MLflow adapter,
process trees, tables and environment tags. Imports nothing from the other subpackages."""
