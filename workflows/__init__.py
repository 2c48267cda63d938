"""surveypipe: workflows."""
