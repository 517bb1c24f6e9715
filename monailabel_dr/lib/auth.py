"""MONAI Label's auth option (``MONAI_LABEL_AUTH_ENABLE``), made to accept valid tokens.

With auth on, MONAI Label 0.8.5 checks every request's ``Authorization: Bearer <JWT>``
against the public key of a Keycloak realm (``MONAI_LABEL_AUTH_REALM_URI``, fetched once)
and the roles in the token (``MONAI_LABEL_AUTH_ROLE_*``); ``POST /auth/token`` passes a
user name and password on to the realm's token endpoint (what 3D Slicer's login does).

Its token check calls PyJWT 2 (``pyjwt>=2.8`` is MONAI Label's own requirement) without
``algorithms``, which PyJWT 2 refuses for every token, so with auth on every call is
answered 401, valid tokens included. :func:`fix_token_check` replaces that one function
(``monailabel.endpoints.user.auth.from_token``, looked up at call time by MONAI Label's
``get_current_user``) with the same check plus an explicit list of asymmetric algorithms
(Keycloak signs with RS256 by default). HMAC algorithms are never accepted: the key is the
realm's public key. It also removes MONAI Label's ``POST /reload`` (rebuild the app), the one
route MONAI Label leaves without authentication. Nothing changes when auth is off.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def _claim(payload: dict, path: str):
    """A claim by name, or nested with '#' (MONAI Label's convention, e.g. ``realm_access#roles``)."""
    value = payload
    for part in path.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def from_token(token: str):
    """MONAI Label's ``from_token`` with ``algorithms`` given to PyJWT (same claims, same user model)."""
    import jwt
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=list(ALGORITHMS),
                         options={"verify_signature": True, "verify_aud": False, "verify_exp": True})
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES) or []
    return auth.User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=list(roles) if isinstance(roles, (list, tuple)) else [],
    )


def fix_token_check() -> bool:
    """Install :func:`from_token` in MONAI Label when auth is on (the server process); True if installed."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    from monailabel.endpoints.user import auth

    if auth.from_token is not from_token:
        auth.from_token = from_token
        logger.info(f"auth: JWTs checked against the realm's public key with algorithms {', '.join(ALGORITHMS)}")
    import sys

    fastapi_app = getattr(sys.modules.get("monailabel.app"), "app", None)
    if fastapi_app is not None:   # the unauthenticated POST /reload: restart the server instead
        fastapi_app.router.routes[:] = [r for r in fastapi_app.router.routes if getattr(r, "path", None) != "/reload"]
    return True
