"""Integration tests of the organizer and worker services (real Redis where marked)."""
