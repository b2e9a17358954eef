"""The schema as a readable table (`qformer config --keys`): key, type, default, notes."""
from __future__ import annotations

from qformer.config.explain import inline_yaml
from qformer.config.schema import IGNORED, REQUIRED, SCHEMA, Key


def _type_text(spec: Key) -> str:
    text = spec.kind if not spec.items else f"list[{spec.items}]"
    if spec.choices:
        text = "|".join(str(c).lower() if isinstance(c, bool) else str(c) for c in spec.choices)
    bounds = [f"{op}{v:g}" for op, v in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le), ("<", spec.lt))
              if v is not None]
    return text + (f" ({', '.join(bounds)})" if bounds else "") + (" or null" if spec.null else "")


def describe_schema() -> str:
    rows = [("KEY", "TYPE", "DEFAULT", "NOTES")]
    for key, spec in SCHEMA.items():
        default = "required" if spec.default is REQUIRED else inline_yaml(spec.default)
        rows.append((key, _type_text(spec), default, spec.doc))
    rows += [(key, "any", "-", f"ignored (LAVIS): {why}") for key, why in IGNORED.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
                     for r in rows) + "\n"
