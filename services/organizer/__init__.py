"""The organizer service: runs submitted episodes from the problems stream (see ``service``)."""
