"""graddyn command line."""
