"""twistd plugin: ``twistd -n hammal --help``."""

from twisted.application.service import ServiceMaker

hammal = ServiceMaker(
    "hammal",
    "hammal.tap",
    "A high-concurrency Docker/OCI registry pull-through mirror.",
    "hammal",
)
