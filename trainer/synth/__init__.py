"""Cold-start trace synthesis: skeletons (structure initialization), teachers, checked SFT records."""
