"""--inductor KEY=VALUE: torch._inductor.config settings for every compiled case of a bench run."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from pfreeze import PfreezeError


def inductor_settings(specs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as torch._inductor.config settings (dotted keys as in
    `torch._inductor.config.patch`; each value read as the type of the setting's default). An
    unknown key is refused with the closest names: a typo must not measure the default
    silently."""
    known = torch._inductor.config.get_config_copy()
    out: dict[str, Any] = {}
    for spec in specs:
        key, eq, text = spec.partition("=")
        if not eq or key not in known:
            near = difflib.get_close_matches(key, list(known), n=3)
            raise PfreezeError(f"'{spec}' is not KEY=VALUE with an inductor config key" +
                               (f" (did you mean {', '.join(near)}?)" if near else ""),
                               "see torch._inductor.config for the names")
        out[key] = _as_type_of(known[key], text, spec)
    return out


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _as_type_of(default: Any, text: str, spec: str) -> Any:
    """`text` as a value of the setting's type: a typo such as combo_kernels=flase must not
    pass as a (truthy) string."""
    try:
        if isinstance(default, bool):
            return _BOOLS[text.lower()]
        if isinstance(default, int | float):
            return type(default)(text)
        if (isinstance(default, str) or default is None) and text:
            return None if default is None and text.lower() == "none" else text
    except (KeyError, ValueError):
        pass
    raise PfreezeError(f"'{spec}': not a value for this {type(default).__name__} setting",
                       f"give one like {default!r}")
