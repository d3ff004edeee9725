"""Small reference data files shipped with pas (class-name lists for the concept-coverage metric)."""
