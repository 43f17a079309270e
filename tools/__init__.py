"""Repository tools (documentation generators): run from a checkout, never installed; they may import every stage."""
