"""Models bundled with tokentrail."""
