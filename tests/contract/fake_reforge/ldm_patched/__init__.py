"""Only its presence matters: it tells reForge apart."""
