"""lllms on a Ray Serve cluster."""
