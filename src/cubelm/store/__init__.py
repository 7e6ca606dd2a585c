"""The model store: ``$CUBELM_HOME`` (default ``~/.cache/cubelm``) holds ``models/<name>/`` directories.

The default model (the ``tiny`` recipe cubelm trains itself on the standard library) lives at
``models/default``; ``cubelm generate`` without ``--model`` uses it. ``cubelm build-default --instruct`` puts a
LoRA instruct adapter for it (peft format) at ``models/default-instruct``.

Models published elsewhere come in with ``cubelm pull SRC`` (s3://, gs://, http(s)://, file://; verified by a
sha256 manifest, downloaded once per digest even by concurrent processes, resumable) and go out with
``cubelm push DIR DEST``; ``cubelm models`` lists the store. Layout: cubelm.store.paths; manifest format:
cubelm.store.manifest; locations: cubelm.store.remote; the pull itself: cubelm.store.pull.
"""

from cubelm.store.paths import (DEFAULT_MODEL_NAME, INSTRUCT_ADAPTER_NAME, cubelm_home, is_complete_model_dir,
                                model_path, models_dir)


def is_remote(model: str) -> bool:
    """A ``--model`` that names a location to pull from rather than a local directory."""
    return "://" in model


def pull_model(src: str, name: str | None = None, digest: str | None = None):
    from cubelm.store.pull import pull_model as pull
    return pull(src, name=name, digest=digest)


__all__ = ["DEFAULT_MODEL_NAME", "INSTRUCT_ADAPTER_NAME", "cubelm_home", "is_complete_model_dir", "is_remote",
           "model_path", "models_dir", "pull_model"]
