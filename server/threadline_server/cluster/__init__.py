"""State shared by the nodes of a cluster through Redis (cluster.redis_url)."""
