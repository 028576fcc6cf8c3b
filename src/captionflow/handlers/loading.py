"""Turning a model reference (hub id, local directory, or any Beam filesystem URI) into a
directory or id that `from_pretrained` understands."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from typing import Any, ClassVar, TypeVar

import transformers
from apache_beam.io.filesystems import FileSystems
from packaging.version import Version

from captionflow.fatal import FatalError
from captionflow.handlers.torch_setup import (
    DeviceUnavailableError,
    allow_tf32,
    resolve_device,
    resolve_dtype,
)
from captionflow.listing import literal
from captionflow.paths import is_remote

logger = logging.getLogger(__name__)

# transformers renamed `torch_dtype` to `dtype` in 4.56; 5.x knows only `dtype`.
DTYPE_ARGUMENT = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

CACHE_DIR = os.path.join(tempfile.gettempdir(), "captionflow-models")


def localize(path: str) -> str:
    """A remote model directory (`gs://...`) is copied once per machine to a local cache."""
    path = path.removeprefix("file://")
    if not is_remote(path):
        return path
    target = os.path.join(CACHE_DIR, hashlib.sha256(path.encode()).hexdigest()[:16])
    if os.path.isdir(target):
        return target
    os.makedirs(CACHE_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(dir=CACHE_DIR)
    prefix = path.rstrip("/") + "/"
    for match in FileSystems.match([literal(prefix) + "**"])[0].metadata_list:
        local = os.path.join(staging, match.path[len(prefix) :])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with FileSystems.open(match.path) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    with contextlib.suppress(OSError):  # another process of this machine finished first
        os.rename(staging, target)
    return target


class ModelLoadError(FatalError):
    """A model that cannot be loaded: the job stops at once rather than failing every image."""


def load_error(flag: str, kind: str, path: str, error: Exception) -> ModelLoadError:
    """A loading failure that says what to do about it."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if isinstance(error, WrongModelKindError):
        hint = f"--{flag} takes a {kind} model"
    elif isinstance(error, DeviceUnavailableError):
        hint = "choose another --device (auto picks a GPU when there is one)"
    elif is_remote(path) or os.path.isdir(path.removeprefix("file://")):
        hint = (
            "the folder must hold a model saved with save_pretrained (config, weights, processor)"
        )
    else:
        hint = (
            f"if the Hugging Face Hub cannot be reached, download the model where it can "
            f"(`hf download {path} --local-dir DIR`) and pass --{flag} {kind}:DIR"
        )
    return ModelLoadError(f"could not load the {kind} model {path!r} ({reason}); {hint}")


class WrongModelKindError(ValueError):
    """The folder or hub id holds another kind of model (a CLIP given as the captioner)."""


def _check_kind(local: str, model_class: Any, *, trust_remote_code: bool) -> None:
    """The folder holds a model of `model_class`: its own type, or for an `AutoModel...`
    class, a type that class maps (remote code is left to the class to judge)."""
    config = transformers.AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:
        if not trust_remote_code and type(config) not in mapping:
            raise WrongModelKindError(
                f"it holds a {config.model_type!r} model, which {model_class.__name__} "
                "does not take"
            )
        return
    expected = model_class.config_class.model_type
    if config.model_type != expected:
        raise WrongModelKindError(f"it holds a {config.model_type!r} model, not a {expected!r} one")


def load_pretrained(
    path: str,
    model_class: Any,
    processor_class: Any,
    *,
    flag: str,
    kind: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """`(model, processor)` from a hub id, a local folder or a remote folder, on the resolved
    device and dtype; any failure becomes a `ModelLoadError` that says what to do."""
    try:
        torch_device = resolve_device(device, model_id=path)
        torch_dtype = resolve_dtype(dtype, torch_device)
        allow_tf32(torch_device, torch_dtype)
        local = localize(path)
        _check_kind(local, model_class, trust_remote_code=trust_remote_code)
        processor = processor_class.from_pretrained(local, trust_remote_code=trust_remote_code)
        model = model_class.from_pretrained(
            local, **{DTYPE_ARGUMENT: torch_dtype}, trust_remote_code=trust_remote_code
        ).to(torch_device)
    except Exception as error:  # whatever the cause, retrying the load would fail the same way
        raise load_error(flag, kind, path, error) from error
    logger.info("%s %s %s on %s (%s)", flag, kind, path, torch_device, torch_dtype)
    return model, processor


P = TypeVar("P", bound="Pretrained")


class Pretrained:
    """`from_pretrained(path, ...)` for a loaded-model class built as `cls(model, processor,
    **options)` from the classes it names: `model_class`, `processor_class`, its `kind` and
    `flag` (`captioner` or `ranker`) for the messages."""

    kind: ClassVar[str] = ""
    flag: ClassVar[str] = ""
    model_class: ClassVar[Any] = None
    processor_class: ClassVar[Any] = None

    @classmethod
    def from_pretrained(
        cls: type[P],
        path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **options: Any,
    ) -> P:
        model, processor = load_pretrained(
            path,
            cls.model_class,
            cls.processor_class,
            flag=cls.flag,
            kind=cls.kind,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        return cls(model, processor, **options)  # type: ignore[call-arg]


NOT_A_REFERENCE = "neither a folder here nor a Hugging Face hub id (org/name)"
NO_SUCH_DIRECTORY = "no such directory"


def check_available(model: str) -> str | None:
    """Why `model` cannot be loaded from here, or None when it can (local, cached or reachable).

    Called before a local run starts, so that an offline machine fails in a second, not after
    building the pipeline; remote URIs are left to the workers.
    """
    if is_remote(model) or os.path.isdir(model.removeprefix("file://")):
        return None
    if os.path.isabs(model) or model.startswith("."):
        return NO_SUCH_DIRECTORY
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
            return None
    except ValueError:  # huggingface_hub's HFValidationError: not an `org/name`
        return NOT_A_REFERENCE
    try:
        huggingface_hub.model_info(model, timeout=10)
    except Exception as error:
        return f"not in the local Hugging Face cache, and the Hub is unreachable ({error})"
    return None
