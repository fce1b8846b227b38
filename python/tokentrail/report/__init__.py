"""Ways to show a journey: the terminal (rich) and one self-contained HTML page."""
