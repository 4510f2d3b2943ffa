"""Who may write to the feedback path, and how much: API keys, user-id pseudonyms, rate limits.

The loop turns what users send into training data, so whoever can write feedback can steer the
next model. Every writing endpoint therefore takes a bearer token (`Authorization: Bearer
TOKEN`) whose key carries scopes:

    chat      POST /v1/chat/completions, GET /v1/models (gateway)
    feedback  POST /v1/feedback
    events    POST /v1/kserve-events (KServe's payload logger)
    admin     /admin/* (reload, fault injection, correction review)
    trusted   corrections sent with this key count as trusted (`deploy.auth.trust_corrections:
              trusted_keys`); a key without it still writes feedback, flagged untrusted

A missing or unknown token is 401 (JSON error, `WWW-Authenticate: Bearer`); a known token
without the scope is 403. /healthz and /metrics stay open (probes and Prometheus).

Keys at rest. A key file line is `NAME SCOPES sha256:HEX` (`tuneloop api-key` prints one); the
token itself is 32 random bytes (256 bits) that only its holder keeps. The server stores and
compares sha256(token). A slow KDF (bcrypt, scrypt, argon2) defends low-entropy passwords
against offline guessing; against a uniformly random 256-bit secret there is nothing to guess -
inverting sha256 costs 2^256 whatever the hash speed - so a fast hash gives the same protection
and keeps authentication at about a microsecond on the serving path. The digest is compared
with `hmac.compare_digest` against every key (no early exit), so timing says nothing about
which bytes matched.

KServe's payload logger cannot send headers, only POST to a URL, so the events endpoint also
takes the token as the `access_token` query parameter (RFC 6750 section 2.3); give that sender a
key with the `events` scope only.

User ids are stored as HMAC-SHA256(secret, id), truncated to 128 bits: pseudonyms that are
stable while the secret is (per-user counts, distinct users, per-user rate limits and SPC
slices, a user's history) but that nobody without the secret can turn back into an id or an IP
address, nor join with another system's ids. Rotating the secret starts new pseudonyms.

Rate limits are token buckets per process: with N replicas a client gets up to N times the
configured rate; the buckets are bounded (idle, refilled ones are forgotten).

This module is the ground floor's HTTP helper: it imports nothing of tuneloop.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneloop.auth")

SCOPES = ("chat", "feedback", "events", "admin", "trusted")
LOCAL_SCOPES = ("chat", "feedback", "admin", "trusted")  # the local gateway's generated key
TOKEN_ENV = "TUNELOOP_API_TOKEN"  # what in-repo clients send when set (else the local token file)
KEY_CHECK_S = 5.0  # a key file is re-read (when changed) at most this often


class Problem(Exception):
    """An HTTP error with a JSON body `{"error": {"message", "code"}}` (the services' handler renders it)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class AuthNotConfigured(RuntimeError):
    """Authentication is on but there is no key (or no user-id secret) to work with."""


# -- tokens and keys --
def new_token() -> str:
    """A fresh API token: 256 random bits, URL-safe."""
    return "tl_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_line(name: str, scopes: list[str] | tuple[str, ...], token: str) -> str:
    """The key-file line for a token (what the Secret holds; the token itself is not in it)."""
    return f"{name} {','.join(scopes)} sha256:{hash_token(token)}"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's name and scopes (`anonymous` with every scope when auth is off)."""

    name: str
    scopes: frozenset[str]

    @property
    def trusted(self) -> bool:
        return "trusted" in self.scopes


@dataclass(frozen=True)
class _Key:
    principal: Principal
    digest: bytes


def parse_keys(text: str, where: str) -> list[_Key]:
    """Key lines (`NAME SCOPES sha256:HEX`; `#` comments, blank lines; `;` also separates) -> keys.
    ValueError naming `where` and the line for anything else."""
    keys: list[_Key] = []
    names: set[str] = set()
    for i, line in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{where}: line {i}: expected `NAME SCOPES sha256:HEX`, got {len(parts)} fields")
        name, scopes, digest = parts
        digest = digest.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: line {i} ({name}): the hash must be sha256:<64 hex digits>; store "
                             "hashes, never tokens (`tuneloop api-key` prints the line)")
        wanted = {s for s in scopes.split(",") if s}
        unknown = wanted - set(SCOPES)
        if unknown or not wanted:
            raise ValueError(f"{where}: line {i} ({name}): unknown scope(s) {sorted(unknown) or '(none)'}; "
                             f"use {', '.join(SCOPES)}")
        if name in names:
            raise ValueError(f"{where}: line {i}: key name {name!r} appears twice")
        names.add(name)
        keys.append(_Key(Principal(name, frozenset(wanted)), bytes.fromhex(digest)))
    return keys


class KeyRing:
    """The known keys: from a file (re-read when it changes, so a rotated Secret takes effect without a
    restart), an environment variable's text, and keys added in code (the local gateway's own)."""

    def __init__(self, keys_file: str | Path | None = None, env_text: str | None = None,
                 extra: list[_Key] | None = None) -> None:
        self.keys_file = Path(keys_file) if keys_file else None
        self._static = (parse_keys(env_text, "API keys from the environment") if env_text else []) + (extra or [])
        self._file_keys: list[_Key] = []
        self._file_stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.keys_file is not None:
            self._reload_file(force=True)
        self.keys = self._file_keys + self._static

    def __len__(self) -> int:
        return len(self.keys)

    def _reload_file(self, force: bool = False) -> None:
        assert self.keys_file is not None
        try:
            st = self.keys_file.stat()
        except OSError as e:
            if force:
                raise ValueError(f"{self.keys_file}: cannot read the API-key file: {e.strerror}") from None
            log.error("API-key file %s unreadable (%s); keeping the keys read before", self.keys_file, e)
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._file_stamp and not force:
            return
        try:
            self._file_keys = parse_keys(self.keys_file.read_text(encoding="utf-8"), str(self.keys_file))
        except ValueError as e:
            if force:
                raise
            log.error("API-key file changed but is invalid (%s); keeping the keys read before", e)
            return
        self._file_stamp = stamp
        self.keys = self._file_keys + self._static

    def lookup(self, token: str, now: float | None = None) -> Principal | None:
        if self.keys_file is not None:
            now = time.monotonic() if now is None else now
            if now - self._checked > KEY_CHECK_S:
                with self._lock:
                    self._checked = now
                    self._reload_file()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for k in self.keys:  # every key, no early exit: constant time in the token's content
            if hmac.compare_digest(k.digest, digest):
                found = k.principal
        return found


# -- user ids --
class UserHasher:
    """User id -> keyed pseudonym `u_<32 hex>` (HMAC-SHA256 under a server secret, 128 bits)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the user-id secret must be at least 32 bytes")
        self._secret = secret

    def __call__(self, user_id: str) -> str:
        if not user_id:
            return ""
        return "u_" + hmac.new(self._secret, user_id.encode(), hashlib.sha256).hexdigest()[:32]


# -- rate limits --
class RateLimiter:
    """Token buckets by key: `rate` per second, `burst` at most. `take(key)` -> 0 when allowed, else the
    seconds until one more is (Retry-After). Buckets that have refilled are forgotten past `max_keys`."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = per_minute / 60.0, float(burst), max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


def limiter(cfg: Any) -> RateLimiter | None:
    """A RateLimiter from a `RateLimit` config section; None when it has no rate."""
    return RateLimiter(cfg.per_minute, cfg.burst) if cfg is not None and cfg.per_minute else None


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# -- local credentials (the `tuneloop serve` gateway without configured keys) --
def local_auth_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "auth"


def _private_file(path: Path, make: Any) -> str:
    """The content of a 0600 file, created with make() if missing (atomically: a concurrent starter
    never reads half a file)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem: an exclusive rename-free create instead
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
        finally:
            tmp.unlink()
    return path.read_text(encoding="utf-8").strip()


def local_token(state_dir: str | Path, create: bool = False) -> str | None:
    """The local gateway's generated token (admin, feedback, chat, trusted) in <state_dir>/auth/token;
    None if there is none and `create` is false."""
    path = local_auth_dir(state_dir) / "token"
    if not create and not path.exists():
        return None
    return _private_file(path, new_token)


def client_token(state_dir: str | Path) -> str | None:
    """What an in-repo client (canary replay, reload, benchmarks) sends: $TUNELOOP_API_TOKEN, else the
    local gateway's token file."""
    return os.environ.get(TOKEN_ENV) or local_token(state_dir)


def client_headers(state_dir: str | Path) -> dict[str, str]:
    token = client_token(state_dir)
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- the guard: everything above, from the config sections --
@dataclass
class Guard:
    """What the services check before they touch a body or the store. `keys` None: authentication off."""

    keys: KeyRing | None
    users: UserHasher
    trust_corrections: str = "trusted_keys"
    max_body_bytes: int = 256 * 1024
    limits: dict[str, RateLimiter | None] = field(default_factory=dict)

    @classmethod
    def from_config(cls, auth: Any, limits: Any, state_dir: str | Path | None = None) -> Guard:
        """From `deploy.auth` and `deploy.limits`. With `state_dir` (the local gateway) a missing key set or
        user-id secret is generated there; without it (the feedback service) it is an AuthNotConfigured."""
        if not auth.enabled:
            log.warning("*** AUTHENTICATION IS OFF (deploy.auth.enabled: false): anyone who can reach this "
                        "port can write training data and call the admin endpoints. Development only. ***")
            keys = None
        else:
            env_text = os.environ.get(auth.keys_env, "") if auth.keys_env else ""
            keys = KeyRing(auth.keys_file, env_text)
            if not len(keys):
                if state_dir is None:
                    raise AuthNotConfigured(
                        f"no API keys: set {auth.keys_env or 'deploy.auth.keys_env'} (from a Secret) or "
                        "deploy.auth.keys_file; `tuneloop api-key NAME --scopes ...` makes one")
                token = local_token(state_dir, create=True)
                assert token is not None
                keys = KeyRing(extra=parse_keys(key_line("local", LOCAL_SCOPES, token), "local key"))
                log.info("no API keys configured: using the local token in %s (scopes %s)",
                         local_auth_dir(state_dir) / "token", ",".join(LOCAL_SCOPES))
        secret = os.environ.get(auth.user_id_secret_env, "")
        if not secret:
            if state_dir is None:
                raise AuthNotConfigured(f"no user-id secret: set {auth.user_id_secret_env} (from a Secret, >= 32 "
                                        "characters); user ids are stored as HMACs under it")
            secret = _private_file(local_auth_dir(state_dir) / "user-id-secret", lambda: secrets.token_hex(32))
        if len(secret.encode()) < 32:
            raise AuthNotConfigured(f"{auth.user_id_secret_env}: the user-id secret must be at least 32 characters")
        return cls(keys=keys, users=UserHasher(secret.encode()), trust_corrections=auth.trust_corrections,
                   max_body_bytes=limits.max_body_bytes,
                   limits={name: limiter(getattr(limits, name)) for name in
                           ("feedback_per_user", "feedback_per_key", "chat_per_user", "chat_per_key")})

    def authorize(self, request: Any, scope: str, query_token: bool = False) -> Principal:
        """The request's principal if its token carries `scope`; Problem(401/403) otherwise."""
        if self.keys is None:
            return ANONYMOUS
        token = ""
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        elif query_token:
            token = request.query_params.get("access_token", "")
        if not token:
            raise Problem(401, "authentication required: send `Authorization: Bearer <token>`",
                          {"WWW-Authenticate": "Bearer"})
        who = self.keys.lookup(token)
        if who is None:
            raise Problem(401, "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if scope not in who.scopes:
            raise Problem(403, f"key {who.name!r} lacks the `{scope}` scope",
                          {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})
        return who

    def limit(self, name: str, key: str) -> None:
        """Problem(429) with Retry-After when `key` is over the `name` rate limit."""
        lim = self.limits.get(name)
        if lim is not None:
            wait = lim.take(key)
            if wait > 0:
                what = name.replace("_per_", " per ")
                raise Problem(429, f"rate limit: too many {what} requests; retry in {math.ceil(wait)} s",
                              retry_after(wait))

    def trusted(self, who: Principal) -> bool:
        """Whether a correction sent by `who` is trusted at write time under the configured policy."""
        if self.trust_corrections == "all":
            return True
        if self.trust_corrections == "trusted_keys":
            return who.trusted
        return False  # reviewed: only a review makes it trusted


# auth off: every endpoint open, but nobody's corrections are trusted unless the policy is `all`
ANONYMOUS = Principal("anonymous", frozenset(SCOPES) - {"trusted"})
