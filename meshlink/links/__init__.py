"""Links between sites: link tokens, the grant endpoint, link and peer records on disk."""
