"""JSON that comes from outside the process (MQTT payloads, bundle files, state files), parsed so that the only
exception a caller has to handle is ValueError.

``json.loads`` raises RecursionError, which is not a ValueError, on deeply nested input: a 5 KB payload of ``[``
is enough. A caller that catches ValueError, as every parser of a payload here does, would let it through and
end the thread that read the payload.
"""

from __future__ import annotations

import json
from typing import Any


def parse_untrusted_json(data: bytes | str) -> Any:
    """``data`` (UTF-8 bytes, or text) -> the JSON value. ValueError naming the problem: UnicodeDecodeError (a
    ValueError) when bytes are not UTF-8, json.JSONDecodeError when it is not JSON, a plain ValueError when it is
    nested more deeply than Python's parser can follow."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
