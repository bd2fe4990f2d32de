"""Engine fixtures: filled in by the lead."""
