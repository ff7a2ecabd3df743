"""`mmfm inspect`: packed rows as the trainer sees them, as a static HTML report."""
