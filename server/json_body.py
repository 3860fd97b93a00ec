"""Request bodies parsed as JSON, with every way a body can be malformed answered by a 400.

Beyond what `json.loads` rejects, this refuses (each with a clear message, never a 500):
  * nesting deeper than MAX_DEPTH arrays/objects (json.loads would raise RecursionError
    around depth 1000, and deep values could break code further down the request's path);
  * integers longer than Python's int-to-str limit (4300 digits; json.loads raises a bare
    ValueError that used to be reported as "not UTF-8 text");
  * strings (values or keys) holding a lone UTF-16 surrogate such as "\\ud800": they are not
    Unicode text, cannot be tokenized or encoded into a response, and are reported by their
    JSON path (e.g. `messages[0].content`) in `param`, without echoing the string.
The extra checks cost O(body) in C-speed passes, plus a walk over the parsed value only when
the body holds a \\uD8xx-\\uDFxx escape.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any

from server.errors import APIError, bad_request

MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal, escapes included
_BRACKETS_ONLY = bytes(range(256)).translate(None, b"[]{}")  # every byte but brackets
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_body(raw: bytes) -> Any:
    """The parsed body. Raises APIError(400, code "invalid_json") naming the problem, with
    `param` set to the JSON path of a string holding a lone surrogate."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _invalid(f"it is nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise _invalid(exc.msg) from None
    except UnicodeDecodeError:
        raise _invalid("not UTF-8 text") from None
    except ValueError:  # the only other one: an integer past the int-to-str digit limit
        raise _invalid(f"a number has more than {sys.get_int_max_str_digits()} digits") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_exceeds(raw, MAX_DEPTH):
        raise _invalid(f"it is nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(raw):
        path = _lone_surrogate_path(value)
        if path is not None:
            raise APIError(400, f"{path or 'the request body'} holds a lone UTF-16 surrogate "
                                f"(a \\uD800-\\uDFFF escape not part of a pair): it is not valid "
                                f"Unicode text.", param=path or None, code="invalid_unicode")
    return value


def _invalid(reason: str) -> APIError:
    return bad_request(f"The request body is not valid JSON ({reason}).", code="invalid_json")


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether valid JSON `raw` nests deeper than `limit`. Strings are removed (brackets in
    them do not count), then innermost pairs are stripped, one level per pass: the depth is
    more than `limit` exactly when `limit` passes leave something. A run of r openers left
    after p passes proves a depth of at least p + r, which ends most deep inputs in a pass
    or two. Each pass is a few C-speed bytes.replace calls."""
    skeleton = _STRING.sub(b"", raw).translate(None, _BRACKETS_ONLY)
    for done in range(limit):
        run = limit - done + 1
        if b"[" * run in skeleton or b"{" * run in skeleton:
            return True
        # "." marks a removed pair, so a pair it uncovers ("{[]}") waits for the next pass
        stripped = skeleton.replace(b"[]", b".").replace(b"{}", b".").replace(b".", b"")
        if not stripped or stripped == skeleton:
            return bool(stripped)
        skeleton = stripped
    return bool(skeleton)


def _lone_surrogate_path(value: Any) -> str | None:
    """The JSON path of the first string (or key) holding a lone surrogate, "" for the body
    itself, None when there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _is_unicode(v):
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                sub = f"{path}.{k}" if path else k
                if not _is_unicode(k):
                    return path
                stack.append((sub, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v)
                         if isinstance(item, (str, dict, list)))
    return None


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
