"""A small JSON Schema checker for the structured-output tests (the keywords they use; no dependency)."""
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def errors(v, s, path="$") -> list[str]:
    """Every way `v` breaks schema `s` (empty: valid)."""
    if s is True or s == {}:
        return []
    out = []
    if "anyOf" in s:
        if all(errors(v, o, path) for o in s["anyOf"]):
            out.append(f"{path}: matches no anyOf option")
    t = s.get("type")
    if t is not None:
        ts = t if isinstance(t, list) else [t]
        ok = any((isinstance(v, int) and not isinstance(v, bool)) if x == "integer" else
                 (isinstance(v, (int, float)) and not isinstance(v, bool)) if x == "number" else
                 isinstance(v, _TYPES[x]) for x in ts)
        if not ok:
            return out + [f"{path}: {v!r} is not of type {t}"]
    if "enum" in s and v not in s["enum"]:
        out.append(f"{path}: {v!r} not in {s['enum']}")
    if "const" in s and v != s["const"]:
        out.append(f"{path}: {v!r} != {s['const']!r}")
    if isinstance(v, dict):
        props = s.get("properties", {})
        out += [f"{path}: missing {k!r}" for k in s.get("required", []) if k not in v]
        for k, x in v.items():
            if k in props:
                out += errors(x, props[k], f"{path}.{k}")
            elif s.get("additionalProperties") is False:
                out.append(f"{path}: extra key {k!r}")
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", len(v)):
            out.append(f"{path}: {len(v)} items")
        out += [e for i, x in enumerate(v) for e in errors(x, s.get("items", {}), f"{path}[{i}]")]
    if isinstance(v, str) and not s.get("minLength", 0) <= len(v) <= s.get("maxLength", len(v)):
        out.append(f"{path}: length {len(v)}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < s.get("minimum", v) or v > s.get("maximum", v):
            out.append(f"{path}: {v} out of range")
    return out
