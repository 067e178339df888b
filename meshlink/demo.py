"""`meshlink demo`: three local sites on loopback, linked by real tokens, a service 2 hops away."""
