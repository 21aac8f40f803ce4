"""``make bench``: the service measured against the two approaches a user would otherwise pick."""
