"""Finding and safely loading checkpoint files.

A checkpoint is untrusted input: it is read with ``torch.load(..., weights_only=True)`` (which refuses any
pickled object other than tensors and plain containers, so no code from the file ever runs) or with
safetensors. Every failure — a missing or unreachable file, an empty, truncated or unsafe file, a file
whose keys or shapes do not fit the model — ends in a :class:`~ovsam.errors.WeightsError` whose message
names the file and says what to do, never in a deep traceback.

Storage libraries (fsspec, huggingface_hub) are imported lazily inside :func:`resolve`, so that
``import ovsam`` does not pull them in.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import torch
from torch import nn

from .errors import WeightsError
from .redaction import redact_text, redact_uri

CACHE_DIR_ENV = "OVSAM_CACHE_DIR"
"""Environment variable naming the root of ovsam's on-disk caches (downloaded weights, vocabulary embeddings)."""

_DEFAULT_CACHE_ROOT = Path("~/.cache/ovsam")
_HUB_SCHEME = "hf://"
_LOCAL_SCHEMES = ("file://",)
# Wrapper keys under which training frameworks store the weights; the official loader accepts "state_dict".
_STATE_DICT_WRAPPERS = ("state_dict", "model")
# BatchNorm step counters: not needed for inference and absent from some CLIP checkpoints.
_OPTIONAL_KEY_SUFFIX = "num_batches_tracked"
# How many names of each kind of mismatch an error message lists before "and N more".
_MAX_LISTED = 8
_MAX_REASON_CHARS = 300
_COPY_CHUNK_BYTES = 8 << 20
HUB_PROBE_TIMEOUT_S = 5.0
"""Seconds the one request that finds out whether the Hugging Face hub answers may take (`resolve`): long
enough for a slow link or proxy, short enough that a machine without network learns it at once."""

_LOCAL_COPY_HINT = (
    "To run without network access, download the file on a machine that has it and point at the local copy "
    "with --weights NAME=PATH (e.g. --weights clip2sam=/data/clip2sam_coco_rn50x16.pth), or set "
    f"{CACHE_DIR_ENV} to a directory that already holds ovsam's cached downloads."
)


def cache_root() -> Path:
    """Root of ovsam's on-disk caches: ``$OVSAM_CACHE_DIR`` if set, else ``~/.cache/ovsam``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else _DEFAULT_CACHE_ROOT.expanduser()


def _short_reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    reason = redact_text(reason)
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def resolve(source: str, *, cache_dir: Path | None = None) -> Path:
    """Return a local path holding the weights file named by ``source``, downloading it if needed.

    ``source`` is one of:

    * a local path (``~`` expanded) or a ``file://`` URL: must exist;
    * an fsspec URL (``s3://``, ``gs://``, ``https://``, ...): downloaded once into
      ``cache_dir`` (default ``$OVSAM_CACHE_DIR/weights`` or ``~/.cache/ovsam/weights``) under a directory
      keyed by the URL, via a temporary file renamed into place, and reused afterwards without network;
    * ``hf://owner/repo[@revision]/path/in/repo``: fetched with ``huggingface_hub.hf_hub_download`` into the
      Hugging Face cache; ``HF_HUB_OFFLINE=1``, or a hub that does not answer one request within
      `HUB_PROBE_TIMEOUT_S`, makes it use only that cache (no retries against a hub that cannot be reached).

    Raises :class:`WeightsError` naming the file (credentials and query strings removed) when it does not
    exist or cannot be fetched.
    """
    return _resolve(source, cache_dir, _HubReach())


def resolve_roles(sources: Mapping[str, str], *, cache_dir: Path | None = None) -> dict[str, Path]:
    """`resolve` every ``role -> source``; the hub's reachability is found out once for all of them.

    Raises one :class:`WeightsError` for all the files that could not be had, each with its role, its source
    and why, and the ``--weights ROLE=PATH`` options that would give local copies instead.
    """
    hub = _HubReach()
    paths: dict[str, Path] = {}
    failures: dict[str, tuple[str, WeightsError]] = {}
    for role, source in sources.items():
        try:
            paths[role] = _resolve(source, cache_dir, hub)
        except WeightsError as error:
            failures[role] = (source, error)
    if not failures:
        return paths
    if len(failures) == 1:
        role, (_, error) = next(iter(failures.items()))
        raise WeightsError(f"{role} weights: {error}")
    listed = "; ".join(f"{role} = {getattr(error, 'reason', str(error))}" for role, (_, error) in failures.items())
    options = " ".join(f"--weights {role}=/PATH/{_file_name(source)}" for role, (source, _) in failures.items())
    raise WeightsError(
        f"{len(failures)} weight files of this model are not available here: {listed}. To run without network "
        f"access, download them on a machine that has it and give the local copies: {options} (or set "
        f"{CACHE_DIR_ENV} / HF_HOME to caches that hold them)."
    )


def _file_name(source: str) -> str:
    return Path(unquote(urlsplit(source).path if "://" in source else source)).name or "weights.pth"


def _unavailable(shown: str, reason: str, hint: str = _LOCAL_COPY_HINT) -> WeightsError:
    """A `WeightsError` for a file that cannot be had; ``reason`` (with ``shown``) is kept for `resolve_roles`."""
    error = WeightsError(f"weights file {shown} {reason}. {hint}")
    error.reason = f"{shown} ({reason})"
    return error


def _resolve(source: str, cache_dir: Path | None, hub: _HubReach) -> Path:
    if source.startswith(_HUB_SCHEME):
        return _resolve_hub(source, hub)
    if source.startswith(_LOCAL_SCHEMES):
        return _resolve_local(Path(unquote(urlsplit(source).path)), shown=redact_uri(source))
    if "://" in source:
        return _resolve_remote(source, cache_dir if cache_dir is not None else cache_root() / "weights")
    return _resolve_local(Path(source).expanduser(), shown=source)


def _resolve_local(path: Path, *, shown: str) -> Path:
    if not path.exists():
        raise _unavailable(shown, "does not exist", "Check the path, or point at the right file with --weights "
                                                    "NAME=PATH (e.g. --weights clip2sam=/data/clip2sam_coco_rn50x16.pth).")
    return path


def _resolve_remote(url: str, cache_dir: Path) -> Path:
    shown = redact_uri(url)
    parts = urlsplit(url)
    # Key on the URL without credentials, so the same object read with other credentials hits the cache,
    # while two URLs ending in the same file name never collide.
    key = hashlib.sha256(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).encode()).hexdigest()
    file_name = Path(unquote(parts.path)).name or "weights"
    cached = cache_dir / key[:32] / file_name
    if cached.is_file():
        return cached

    import fsspec

    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=f".{file_name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as destination, fsspec.open(url, "rb") as remote:
            shutil.copyfileobj(remote, destination, _COPY_CHUNK_BYTES)
        os.replace(tmp_name, cached)
    except Exception as error:  # network, auth and backend errors come in many library-specific types
        underlying = _first_non_missing_cause(error)
        if underlying is None:
            raise _unavailable(shown, "was not found (no such object or path)") from error
        raise _unavailable(shown, f"could not be downloaded: {_short_reason(underlying)}") from error
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return cached


def _first_non_missing_cause(error: BaseException) -> BaseException | None:
    """The first error in ``error``'s chain that is not "file not found", or None if it is really missing.

    fsspec's HTTP backend reports an unreachable host as FileNotFoundError; the cause tells them apart.
    """
    current: BaseException | None = error
    while current is not None:
        if not isinstance(current, FileNotFoundError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _parse_hub_reference(source: str) -> tuple[str, str | None, str]:
    owner, _, rest = source[len(_HUB_SCHEME) :].partition("/")
    repo_and_revision, _, filename = rest.partition("/")
    repo, _, revision = repo_and_revision.partition("@")
    if not (owner and repo and filename):
        raise WeightsError(
            f"hub reference {redact_uri(source)!r} is not of the form hf://owner/repo/path/in/repo "
            "(optionally hf://owner/repo@revision/path/in/repo)."
        )
    return f"{owner}/{repo}", unquote(revision) or None, filename


class _HubReach:
    """Whether the Hugging Face hub answers, found out by the first download that needs it: one request without
    retries (huggingface_hub retries a file it cannot find in its cache with backoff, ~25 s per file offline)."""

    def __init__(self) -> None:
        self.reachable: bool | None = None

    def check(self, repo_id: str, filename: str, revision: str | None) -> bool:
        if self.reachable is None:
            from huggingface_hub import get_hf_file_metadata, hf_hub_url
            from huggingface_hub.errors import HfHubHTTPError

            try:
                get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=HUB_PROBE_TIMEOUT_S)
                self.reachable = True
            except HfHubHTTPError:
                self.reachable = True  # it answered (404, 401...): the download says what the answer means
            except Exception:  # noqa: BLE001 - DNS, connection, proxy, TLS, timeout: no hub from here
                self.reachable = False
        return self.reachable


def _resolve_hub(source: str, hub: _HubReach) -> Path:
    repo_id, revision, filename = _parse_hub_reference(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Read the switch at call time: huggingface_hub itself reads it once, when it is first imported.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    shown = redact_uri(source)
    if offline or not hub.check(repo_id, filename, revision):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            situation = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached"
            raise _unavailable(shown, f"is not available: {situation} and the file is not in the local Hugging "
                                      "Face cache") from error
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise _unavailable(shown, f"was not found on the Hugging Face hub ({type(error).__name__}): check the "
                                  "repository, revision and path (a private or gated repository also needs a "
                                  "token)") from error
    except Exception as error:  # HTTP, connection and cache errors come in many library-specific types
        raise _unavailable(shown, f"could not be downloaded: {_short_reason(error)}") from error


def _unreadable(path: Path, reason: str) -> WeightsError:
    return WeightsError(f"{path} is not a readable checkpoint: {reason}")


def _read(path: Path) -> object:
    """Deserialize ``path`` without running code from it; safetensors files give a dict of tensors."""
    path = Path(path)
    if path.is_dir():
        raise _unreadable(path, "it is a directory")
    if not path.is_file():
        raise _unreadable(path, "no such file")
    if path.stat().st_size == 0:
        raise _unreadable(path, "the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError plus OS errors
            raise _unreadable(path, f"not a valid safetensors file ({_short_reason(error)})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise _unreadable(
                path,
                "it holds Python objects other than tensors, which are refused because checkpoints are loaded "
                "with weights_only=True (no code from the file is run)",
            ) from error
        raise _unreadable(path, f"corrupt or truncated ({_short_reason(error)})") from error
    except Exception as error:  # truncated zip archives, EOF, unknown formats: RuntimeError/EOFError/...
        raise _unreadable(path, f"corrupt or truncated ({_short_reason(error)})") from error


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{key: tensor}`` dict on the CPU, without running code from the file.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. A top-level ``"state_dict"`` or ``"model"``
    entry holding a dict is unwrapped. Raises :class:`WeightsError` ("<path> is not a readable checkpoint:
    <reason>") for empty, truncated, unsafe or non-tensor files.
    """
    path = Path(path)
    loaded = _read(path)
    if isinstance(loaded, Mapping):
        for wrapper in _STATE_DICT_WRAPPERS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise _unreadable(path, f"it holds a {type(loaded).__name__}, not a dict of tensors")
    if not loaded:
        raise _unreadable(path, "it holds no tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _unreadable(
                path, f"not a dict of tensors (entry {key!r} holds a {type(value).__name__})"
            )
    return dict(loaded)


def load_tensor(path: Path) -> torch.Tensor:
    """Read a file that holds one tensor (e.g. the official ``[K, P, E]`` class-embedding file) on the CPU.

    Same safety as :func:`load_state_dict`; a ``.safetensors`` file must hold exactly one tensor.
    """
    path = Path(path)
    loaded = _read(path)
    if isinstance(loaded, Mapping) and path.suffix == ".safetensors":
        if len(loaded) != 1:
            raise _unreadable(path, f"expected exactly one tensor, found {len(loaded)}")
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, torch.Tensor):
        raise _unreadable(path, f"it holds a {type(loaded).__name__}, not a single tensor")
    return loaded


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys ``"<prefix>.xxx"`` renamed to ``"xxx"``; keys without the prefix are dropped.

    Release files bundle several modules under different prefixes (e.g. ``fpn_neck.`` and
    ``mask_decoder.`` in one CLIP2SAM file), so other prefixes are expected and ignored.
    """
    dotted = prefix.rstrip(".") + "."
    return {key[len(dotted) :]: value for key, value in state.items() if key.startswith(dotted)}


def _listing(items: list[str], singular: str, plural: str) -> str:
    count = len(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", and {count - _MAX_LISTED} more" if count > _MAX_LISTED else ""
    return f"{count} {singular if count == 1 else plural} ({shown}{more})"


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ",".join(str(size) for size in tensor.shape) + "]"


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, source: str) -> None:
    """Load ``state`` into ``module`` after checking that keys and shapes match exactly.

    ``num_batches_tracked`` buffers are optional on both sides (some CLIP checkpoints lack them; the
    module keeps its own value). Any other missing key, unexpected key or shape difference raises
    :class:`WeightsError` listing them by name, e.g. ``"clip2sam weights from /x/y.pth do not fit this
    model: 3 missing keys (...), 1 unexpected key (...), 2 shape mismatches (a: file [768,256] vs model
    [64,256], ...). Is this the right file for the preset?"``. ``what`` names the part (``"clip2sam"``),
    ``source`` is where the file came from (redacted before printing).
    """
    expected = module.state_dict()
    optional = {key for key in expected if key.rsplit(".", 1)[-1] == _OPTIONAL_KEY_SUFFIX}
    given = {
        key: value
        for key, value in state.items()
        if key in expected or key.rsplit(".", 1)[-1] != _OPTIONAL_KEY_SUFFIX
    }
    missing = [key for key in expected if key not in given and key not in optional]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key}: file {_shape(value)} vs model {_shape(expected[key])}"
        for key, value in given.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = [
        _listing(names, singular, plural)
        for names, singular, plural in (
            (missing, "missing key", "missing keys"),
            (unexpected, "unexpected key", "unexpected keys"),
            (mismatched, "shape mismatch", "shape mismatches"),
        )
        if names
    ]
    if problems:
        raise WeightsError(
            f"{what} weights from {redact_uri(source)} do not fit this model: {', '.join(problems)}. "
            "Is this the right file for the preset?"
        )
    complete = {**{key: expected[key] for key in optional if key not in given}, **given}
    module.load_state_dict(complete, strict=True)
