"""On/off environment variables of the native kernels (``DYNLOSS_NATIVE``,
``DYNLOSS_NATIVE_POOL``): one set of words, and a value that is neither is said.

>>> import os
>>> from dynloss.kernels.native._env import switched_on
>>> os.environ["DYNLOSS_EXAMPLE"] = "Off"
>>> switched_on("DYNLOSS_EXAMPLE", "the example stays on")
False
>>> del os.environ["DYNLOSS_EXAMPLE"]
>>> switched_on("DYNLOSS_EXAMPLE", "the example stays on")  # unset: on
True
"""

from __future__ import annotations

import os
import warnings

from ..._warn import caller_stacklevel

ON = ("1", "true", "on", "yes", "enable", "enabled")
OFF = ("0", "false", "off", "no", "none", "disable", "disabled")


def switched_on(name: str, what: str) -> bool:
    """Whether ``$name`` is on: unset, empty or one of :data:`ON` (any case); one of
    :data:`OFF` turns it off; anything else leaves it on and warns, ending with ``what``
    ("the buffer pool stays on"): a typo, ``flase``, must not pass silently."""
    value = os.environ.get(name, "").strip()
    if value.lower() in OFF:
        return False
    if value and value.lower() not in ON:
        warnings.warn(f"dynloss: {name}={value!r} is neither on ({', '.join(ON)}) nor off "
                      f"({', '.join(OFF)}): {what}", RuntimeWarning,
                      stacklevel=caller_stacklevel())
    return True
