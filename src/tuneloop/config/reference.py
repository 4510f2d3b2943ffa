"""The configuration reference (README, `tuneloop config-reference`), generated from the field help texts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tuneloop.config.run import RunConfig

def reference_markdown() -> str:
    """Every config key with its type, default and help text (the README's configuration reference)."""
    import typing

    out = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key, ann = f"{prefix}{name}", f.annotation
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            args = typing.get_args(ann)
            item = args[-1] if args else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"| `{key}` | section | | {f.description or ''} |")
                walk(ann, key + ".")
            elif isinstance(item, type) and issubclass(item, BaseModel):
                shape = "list" if typing.get_origin(ann) is list else "mapping of name ->"
                out.append(f"| `{key}` | {shape} {item.__name__} | {default} | {f.description or ''} |")
                walk(item, key + ("[]." if shape == "list" else ".<name>."))
            else:
                out.append(f"| `{key}` | {_type_name(ann)} | {default} | {f.description or ''} |")
    walk(RunConfig, "")
    return "\n".join(out)


def _type_name(ann: Any) -> str:
    s = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
    return s.replace("|", "\\|")
