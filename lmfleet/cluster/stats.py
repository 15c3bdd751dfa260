"""Routing decisions counted in the process that routes (the ingress replica). A module of its
own: Ray Serve ships the router class by value, so a counter defined next to it would be a copy."""

from collections import Counter

DECISIONS: Counter = Counter()  # prefix_hit, prefix_overloaded, new_key, no_key, retried
