"""
Client access control: who may pull through hammal.

- L{users}: user directories for HTTP Basic credentials (a single user, an
  htpasswd file, an allow list) and the C{Authorization: Basic} parser.
- L{tokens}: hammal's own pull-only bearer tokens (C{--auth token}).
- L{rules}: request rules by client address, user agent, path and region.
- L{checks}: password checks at a bounded cost (own thread pool, bounded
  queue, successes remembered under an HMAC).
- L{throttle}: C{429} for addresses after repeated failed logins.
- L{passthrough}: upstream's confirmations of clients' own tokens, per
  object, and who logged in with which token (C{--allow-users}).

The web layer decides when to call them and turns their L{Denied} and
L{Unauthorized} errors into responses; nothing here knows about HTTP
requests.
"""

from hammal.access.rules import AccessRules
from hammal.access.tokens import TokenIssuer, parse_scopes
from hammal.access.users import (
    AllowList,
    HtpasswdFile,
    SingleUser,
    ThreadedUserDirectory,
    UserDirectory,
    check_in_thread,
    parse_basic,
    parse_user_list,
)

__all__ = [
    "AccessRules",
    "AllowList",
    "HtpasswdFile",
    "SingleUser",
    "ThreadedUserDirectory",
    "TokenIssuer",
    "UserDirectory",
    "check_in_thread",
    "parse_basic",
    "parse_scopes",
    "parse_user_list",
]
