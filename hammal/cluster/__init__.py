"""
Parts for running several hammal instances as one mirror: a per-digest fill
lease in Redis (L{hammal.cluster.lease}) and authenticated streaming of a
growing blob between instances (L{hammal.cluster.peer}, signed with the
cluster key by L{hammal.cluster.peerauth}). L{hammal.cluster.fill} puts the
lease holder among the blob cache's fill sources (storage, peer, upstream);
L{hammal.cluster.setup} builds these parts for the composition root.
"""
