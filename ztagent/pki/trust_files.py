"""``TrustFiles``: the IO edge that reads the client CA bundle and CRL from disk."""

from __future__ import annotations

from pathlib import Path

from ztagent.errors import ConfigError
from ztagent.files import FileStamp, file_stamp
from ztagent.pki.trust import TrustMaterial

_Stamp = FileStamp | None  # None: file missing


class TrustFiles:
    """Loads ``TrustMaterial`` from files and tells when they changed since the last load.

    The server polls ``changed()`` and calls ``checker.replace_trust(files.load())``. A load
    that fails raises ``ConfigError`` (the caller keeps its old trust) and still records the
    files' stamps, so ``changed()`` stays False until they are written again.
    """

    def __init__(self, bundle_path: Path, crl_path: Path | None) -> None:
        self.bundle_path = bundle_path
        self.crl_path = crl_path
        self._loaded: tuple[_Stamp, _Stamp] | None = None

    def _stamps(self) -> tuple[_Stamp, _Stamp]:
        crl = file_stamp(self.crl_path) if self.crl_path is not None else None
        return (file_stamp(self.bundle_path), crl)

    def changed(self) -> bool:
        """True if a file's (mtime_ns, size, inode) differs from the last ``load()``."""
        return self._loaded is None or self._stamps() != self._loaded

    def load(self) -> TrustMaterial:
        """Read and parse both files; ``ConfigError`` naming the file on any problem."""
        self._loaded = self._stamps()  # stamp before reading: a racing write shows as changed
        bundle = _read(self.bundle_path)
        crl = _read(self.crl_path) if self.crl_path is not None else None
        try:
            return TrustMaterial.from_pem(bundle, crl)
        except ConfigError as exc:
            path = self.crl_path if exc.key == "crl" else self.bundle_path
            raise ConfigError(str(path), exc.message.removeprefix(f"{exc.key}: ")) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
