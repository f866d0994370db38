"""
Parts for running several hammal instances as one mirror: a per-digest fill
lease in Redis (L{hammal.cluster.lease}) and authenticated streaming of a
growing blob between instances (L{hammal.cluster.peer}).
"""
