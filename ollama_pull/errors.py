"""The one exception hierarchy of ollama-pull.

Every error a user can meet in normal operation is one of these, with a message that says what failed and,
where there is one, what to do about it::

    OllamaPullError
    ├── InvalidReference        the model reference cannot be parsed
    ├── RegistryError           the registry answered something we cannot use
    │   ├── ModelNotFound       404 on the manifest
    │   ├── AuthenticationError 401/403 even with a token
    │   ├── TokenServiceError   the token service is down for now (429, 5xx): retried like a failed request
    │   ├── ClientTooOld        412: the registry wants a newer client
    │   └── InvalidManifest     the manifest is malformed or unsafe
    ├── BlobError               one blob could not be downloaded after every retry
    │   └── IntegrityError      ... because its bytes never matched the digest
    │       └── TamperedBlob    a blob of a bundle being imported does not match its digest
    ├── CorruptModel            a model in the store does not match its manifest (found by verify)
    │   └── IncompleteModel     a model to export lacks blobs in the store
    ├── NotInStore              verify was asked for a model the store does not hold
    ├── InvalidBundle           a bundle to import or push is not a safe OCI image layout
    └── StorageError            the local store cannot be read or written

Foreign exceptions (httpx2, OSError) are translated once, where they happen, and chained with ``from``.
The CLI alone maps these classes to exit codes.
"""

from __future__ import annotations


class OllamaPullError(Exception):
    """Base class of every error ollama-pull raises on purpose.

    Each one pickles whole (its class, message and attributes), whatever its constructor takes: a helper process
    of a pull sends its error to the parent, which raises it as its own (:mod:`ollama_pull.processes`)."""

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(kind: type[OllamaPullError], args: tuple[object, ...], state: dict[str, object]) -> OllamaPullError:
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidReference(OllamaPullError, ValueError):
    """A model reference that Ollama would not accept either."""

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"invalid model reference {reference!r}: {reason}")


class RegistryError(OllamaPullError):
    """The registry could not be reached or answered something unusable."""


class ModelNotFound(RegistryError):
    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model {model!r} not found: check the name and tag, or the registry host")


class AuthenticationError(RegistryError):
    """The registry refused us even after answering its challenge."""


class TokenServiceError(RegistryError):
    """The token service failed in a way that another try may not (429, 5xx); network failures and stalls of a
    token request are retried the same way."""


class ClientTooOld(RegistryError):
    def __init__(self, model: str) -> None:
        super().__init__(f"the registry says {model!r} needs a newer client (HTTP 412): upgrade ollama-pull or Ollama")


class InvalidManifest(RegistryError):
    def __init__(self, model: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid manifest for {model!r}: {reason}; nothing was written")


class BlobError(OllamaPullError):
    """A blob failed for good: every attempt was used."""

    def __init__(self, digest: str, reason: str, attempts: int) -> None:
        self.digest = digest
        self.reason = reason
        self.attempts = attempts
        super().__init__(f"blob {digest} failed after {attempts} attempts: {reason}")


class IntegrityError(BlobError):
    """The blob's bytes never matched its digest or size."""


class TamperedBlob(IntegrityError):
    """A blob read from a bundle whose bytes are not its digest's: nothing of its model is installed."""

    def __init__(self, bundle: str, model: str, digest: str, reason: str) -> None:
        self.digest = digest
        self.reason = reason
        self.attempts = 1
        OllamaPullError.__init__(
            self,
            f"blob {digest} of {model} in {bundle} is damaged ({reason}); nothing of {model} was installed: "
            "copy the bundle again, or export it again from a store that passes verify",
        )


class CorruptModel(OllamaPullError):
    """Blobs in the store whose bytes are missing or differ from what the manifest names."""

    def __init__(self, model: str, problems: dict[str, str]) -> None:
        self.problems = problems
        listed = "; ".join(f"blob {digest}: {reason}" for digest, reason in problems.items())
        super().__init__(
            f"{model} is corrupt in the store ({listed}); the bad blobs were removed: pull the model again to repair it"
        )


class IncompleteModel(CorruptModel):
    """Blobs a model's manifest names that the store does not hold (an interrupted pull, a manual removal)."""

    def __init__(self, model: str, missing: tuple[str, ...]) -> None:
        self.problems = dict.fromkeys(missing, "missing")
        OllamaPullError.__init__(
            self,
            f"{model} lacks {len(missing)} blob(s) in the store ({', '.join(missing)}); nothing was written: "
            f"pull {model} again first",
        )


class InvalidBundle(OllamaPullError):
    """A bundle that is not an OCI image layout we can trust: refused before anything is installed."""

    def __init__(self, bundle: str, reason: str) -> None:
        self.bundle = bundle
        self.reason = reason
        super().__init__(
            f"{bundle} is not a usable model bundle: {reason}; nothing was installed: "
            "make it with `ollama-pull export MODEL... -o FILE.tar`"
        )


class NotInStore(OllamaPullError):
    def __init__(self, model: str, path: str) -> None:
        super().__init__(f"{model} is not in the store: no manifest at {path}")


class StorageError(OllamaPullError):
    """The model store cannot be written: a full disk, missing permissions, a read-only filesystem."""
