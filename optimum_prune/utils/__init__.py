"""Small helpers that keep the package working across the Transformers and Optimum versions users run."""

from .compat import (
    IS_TRANSFORMERS_V5,
    TRANSFORMERS_VERSION,
    fails_transformers_5_validation,
    legacy_field_names,
    legacy_rope_fields,
    make_checkpoint_portable,
)


__all__ = [
    "IS_TRANSFORMERS_V5",
    "TRANSFORMERS_VERSION",
    "fails_transformers_5_validation",
    "legacy_field_names",
    "legacy_rope_fields",
    "make_checkpoint_portable",
]
