"""People in the loop, on the engine's side: the human worker endpoint (a queue in the store), the human
organizer (a backend whose organizer text a person writes), plans in the organizer's context, proposals."""
